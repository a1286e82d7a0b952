"""Work per webhook, counted: the daemon's loop thread under cProfile while wrk sends signed webhooks end to end.

Timing figures on a shared machine move by a third from run to run; the number of Python calls each webhook
costs moves much less (only with batch sizes, which follow the throughput). This runs ``integrand run`` (the
tree on ``PYTHONPATH``, or ``--src``) with cProfile on the loop thread (timed by the thread's CPU clock, so
preemption is not counted; the profiler's own overhead is), sends wrk's signed webhooks for ``--seconds``,
waits until the jsonl sink has written every stored event, stops the daemon and prints calls and profiled
CPU per event by function and by module, so two trees can be compared (``--compare A.json B.json``).

    python bench/count_work.py --src /work/wt/before769/daemon --json /tmp/before.json
    python bench/count_work.py --json /tmp/after.json
    python bench/count_work.py --compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import http_bench  # noqa: E402

RUNNER = """
import cProfile, sys, time
prof = cProfile.Profile(time.thread_time_ns, 1e-9)  # the loop thread's CPU time: preemption does not count
from integrand.cli import main
prof.enable()
try:
    rc = main(["run", "--config", sys.argv[1]])
finally:
    prof.disable()
    prof.dump_stats(sys.argv[2])
sys.exit(rc)
"""


def _label(key: tuple[str, int, str]) -> str:
    file, _line, name = key
    if file == "~":
        return name  # a builtin: "<method 'execute' of 'sqlite3.Connection' objects>"
    parts = Path(file).parts
    for anchor in ("integrand", "aiohttp", "asyncio", "multidict", "yarl", "prometheus_client", "orjson"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return f"{'/'.join(parts[i:])}:({name})"  # no line number: two trees' functions line up
    return f"{Path(file).name}:({name})"


def measure(src: Path | None, seconds: float, connections: int, keep: Path | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    port = http_bench.free_port()
    with tempfile.TemporaryDirectory(prefix="integrand-count-") as tmp:
        work = Path(tmp)
        cfg = work / "config.toml"
        cfg.write_text(http_bench.CONFIG.format(port=port, secret=http_bench.SECRET) + http_bench.ROUTE)
        prof = work / "daemon.prof"
        log = (work / "server.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(cfg), str(prof)], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            http_bench.wait_port(port, proc)
            url = f"http://127.0.0.1:{port}/hooks/demo"
            cpu0 = http_bench.proc_cpu(proc.pid)
            res = http_bench.run_wrk(url, connections, seconds, f"cw{int(time.time() * 1000)}")
            db, jsonl = work / "var" / "integrand.db", work / "var" / "events.jsonl"
            counter = http_bench.LineCounter(jsonl)
            deadline = time.monotonic() + 120
            while counter.poll() < http_bench.count_events(db):
                if time.monotonic() > deadline:
                    raise RuntimeError("the sink did not catch up")
                time.sleep(0.05)
            cpu = http_bench.proc_cpu(proc.pid) - cpu0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
            if proc.poll() is None:
                proc.kill()
            log.close()
        events = counter.lines
        stats = pstats.Stats(str(prof))
        if keep is not None:
            keep.write_bytes(prof.read_bytes())
    funcs: dict[str, list[float]] = {}
    for key, (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        f = funcs.setdefault(_label(key), [0.0, 0.0, 0.0])
        f[0] += nc / events
        f[1] += tt / events * 1e6
        f[2] += ct / events * 1e6
    return {
        "src": str(src) if src else "(PYTHONPATH)",
        "events": events,
        "requests": res["requests"],
        "cpu_us_per_event_profiled": cpu / events * 1e6,
        "calls_per_event": sum(f[0] for f in funcs.values()),
        "funcs": funcs,
    }


def by_module(funcs: dict[str, list[float]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for label, (n, tt, _ct) in funcs.items():
        mod = label.split(":", 1)[0] if ":" in label else "(builtins)"
        out[mod][0] += n
        out[mod][1] += tt
    return out


def compare(a: dict[str, Any], b: dict[str, Any], top: int) -> None:
    print(
        f"A {a['src']}: {a['events']} events, {a['calls_per_event']:.0f} calls/event, "
        f"{a['cpu_us_per_event_profiled']:.0f} us CPU/event under the profiler"
    )
    print(
        f"B {b['src']}: {b['events']} events, {b['calls_per_event']:.0f} calls/event, "
        f"{b['cpu_us_per_event_profiled']:.0f} us CPU/event under the profiler"
    )
    ma, mb = by_module(a["funcs"]), by_module(b["funcs"])
    rows = sorted(set(ma) | set(mb), key=lambda m: -abs(mb.get(m, [0, 0])[1] - ma.get(m, [0, 0])[1]))
    print(
        f"\nby module (self time, us/event; calls/event), largest change first\n{'module':58} {'A us':>8} {'B us':>8} {'A calls':>8} {'B calls':>8}"
    )
    for m in rows[:top]:
        x, y = ma.get(m, [0, 0]), mb.get(m, [0, 0])
        print(f"{m[:58]:58} {x[1]:8.1f} {y[1]:8.1f} {x[0]:8.1f} {y[0]:8.1f}")
    fa, fb = a["funcs"], b["funcs"]
    rows = sorted(set(fa) | set(fb), key=lambda f: -abs(fb.get(f, [0, 0, 0])[1] - fa.get(f, [0, 0, 0])[1]))
    print(
        f"\nby function (self time, us/event; calls/event), largest change first\n{'function':90} {'A us':>7} {'B us':>7} {'A n':>6} {'B n':>6}"
    )
    for f in rows[:top]:
        x, y = fa.get(f, [0, 0, 0]), fb.get(f, [0, 0, 0])
        print(f"{f[:90]:90} {x[1]:7.2f} {y[1]:7.2f} {x[0]:6.2f} {y[0]:6.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="a daemon/ directory to run (default: whatever PYTHONPATH gives)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--json", type=Path, help="write the per-event figures here")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--keep", type=Path, help="keep the raw cProfile output here (pstats)")
    args = ap.parse_args()
    if args.compare:
        compare(json.loads(args.compare[0].read_text()), json.loads(args.compare[1].read_text()), args.top)
        return 0
    http_bench.ensure_wrk()
    res = measure(args.src, args.seconds, args.connections, args.keep)
    if args.json:
        args.json.write_text(json.dumps(res))
    print(
        f"{res['events']} events, {res['calls_per_event']:.0f} calls/event on the loop thread, "
        f"{res['cpu_us_per_event_profiled']:.0f} us CPU/event (under the profiler)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
