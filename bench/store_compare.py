"""Before vs after, in the same run: the store benchmark, the end-to-end benchmark and the loop holds,
each against two checkouts of ``daemon/`` taken in turn (A, B, A, B, …) so the machine's drift hits both.

``--before DIR`` is a ``daemon/`` directory of the code to compare with (e.g. ``git archive <commit>
daemon | tar -x -C /tmp/before``); the other side is this checkout. Every measurement runs in a
subprocess whose ``PYTHONPATH`` puts that tree first (the daemon subprocesses of the end-to-end
benchmark inherit it), so both sides run the same benchmark code. Medians of ``--runs`` are reported.

Usage: python bench/store_compare.py --before /tmp/before/daemon [--after DIR] [--runs 3] [--events 20000] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
AFTER = HERE.parent / "daemon"

STORE = """
import json, sys
sys.path.insert(0, {bench!r})
import store_bench
e2e = store_bench.e2e_once("integrand", {events})
backlog = store_bench.backlog_once("integrand", 20000, 1000)
print(json.dumps({{"enqueue_rate": e2e["enqueue_rate"], "drain_rate": e2e["drain_rate"],
                  "backlog_first_rate": backlog["rate"], "backlog_drain_rate": backlog["drain_all_rate"]}}))
"""

E2E = """
import json, sys
sys.path.insert(0, {bench!r})
import http_bench
res = http_bench.e2e_once(64, {seconds}, "cmp")
print(json.dumps({{"e2e_eps": res["e2e_eps"]}}))
"""

HOLDS = [sys.executable, str(HERE / "store_holds.py"), "--runs", "10", "--json", "--src"]


def run(code: list[str], src: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(code, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise SystemExit(f"benchmark failed under {src}:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, type=Path)
    ap.add_argument("--after", type=Path, default=AFTER, help="the daemon/ to compare (default: this checkout's)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    if not args.skip_e2e:
        sys.path.insert(0, str(HERE))
        import http_bench

        http_bench.ensure_wrk()
    results: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()
    for r in range(args.runs):
        for side, src in sides.items():
            parts = [
                run([sys.executable, "-c", STORE.format(bench=str(HERE), events=args.events)], src),
                run([*HOLDS, str(src)], src),
            ]
            if not args.skip_e2e:
                parts.append(run([sys.executable, "-c", E2E.format(bench=str(HERE), seconds=args.seconds)], src))
            for part in parts:
                for k, v in part.items():
                    if isinstance(v, int | float):
                        results[side].setdefault(k, []).append(float(v))
            print(f"run {r + 1}/{args.runs} {side}: " + json.dumps({k: v[-1] for k, v in results[side].items()}))
    print(f"\nstarted {started}, load average before {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, after", end=" ")
    print(" ".join(f"{x:.1f}" for x in os.getloadavg()))
    print(f"{'measure (median of ' + str(args.runs) + ')':36} {'before':>12} {'after':>12} {'after/before':>13}")
    for k in results["after"]:
        b, a = statistics.median(results["before"][k]), statistics.median(results["after"][k])
        print(f"{k:36} {b:12.2f} {a:12.2f} {a / b if b else float('nan'):13.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
