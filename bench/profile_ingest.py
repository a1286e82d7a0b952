"""Where integrand spends its time under wrk: py-spy samples the daemon, this prints a summary.

    pip install py-spy    # not in the bench extra: it is only needed when a target is missed
    python bench/profile_ingest.py [integrand|integrand-noroute] [--connections 64] [--seconds 10]

Prints CPU per thread and the functions with the most samples (self and inclusive), and
keeps the raw collapsed stacks (flamegraph.pl input) in the file named by --out.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import http_bench  # noqa: E402


def summarize(raw: Path, top: int) -> None:
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        n = int(n_text)
        total += n
        frames = stack.split(";")
        threads[frames[0].split(":", 1)[-1].strip()] += n
        self_c[frames[-1]] += n
        for f in set(frames[1:]):
            incl[f] += n
    print(f"{total} samples (py-spy counts a thread only while it is not idle)")
    for name, n in threads.most_common():
        print(f"  {n:6}  {name}")
    print(f"\ntop {top} by self samples:")
    for f, n in self_c.most_common(top):
        print(f"  {n:6}  {f}")
    print(f"\ntop {top} by inclusive samples:")
    for f, n in incl.most_common(top):
        print(f"  {n:6}  {f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", nargs="?", default="integrand", choices=["integrand", "integrand-noroute"])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("/tmp/integrand-profile.txt"))
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        sys.exit("needs py-spy: pip install py-spy")
    with http_bench.server(args.kind) as srv:
        http_bench.run_wrk(srv.url, args.connections, 2, f"pw{int(time.time())}")
        result: dict[str, object] = {}
        load = threading.Thread(
            target=lambda: result.update(
                http_bench.run_wrk(srv.url, args.connections, args.seconds, f"p{int(time.time())}")
            )
        )
        load.start()
        time.sleep(0.5)
        cmd = [pyspy, "record", "-p", str(srv.proc.pid), "-d", str(args.seconds - 2), "-r", "200", "--threads"]
        cmd += ["-f", "raw", "-o", str(args.out)]
        subprocess.run(
            cmd,
            check=True,
            timeout=args.seconds + 30,
            capture_output=True,
        )
        load.join(timeout=args.seconds + 60)
    print(f"{args.kind}: {result.get('rps', 0):.0f} req/s, p99 {int(result.get('p99_us', 0)) / 1000:.1f} ms")  # type: ignore[call-overload]
    summarize(args.out, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
