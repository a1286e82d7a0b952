"""Coverage-guided fuzzing (atheris, libFuzzer) of the targets in tests/fuzz_targets.py.

    make fuzz                      # every target, FUZZ_SECONDS each (default 120)
    .venv/bin/python bench/fuzz.py --seconds 600 webhook

Starts from the corpus kept in tests/fuzz_corpus/<target>/ (replayed by ``make test``). Inputs that
reach new code are written to bench/fuzz-work/<target>/; an input that breaks a property is written
to bench/fuzz-findings/ and should be copied into the kept corpus with its fix (and a test). Figures
(executions, seconds, findings per target) go to bench/results-fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["webhook", "config", "mapping", "listing", "outbound", "cdc", "nats", "amqp", "pgoutput", "outbox"]


def run_one(target: str) -> None:
    """In this process: instrument integrand, then hand the target to libFuzzer (which exits the process)."""
    import atheris

    sys.path.insert(0, str(ROOT))
    with atheris.instrument_imports(
        include=[
            "integrand",
            "integrand_hubspot",
            "integrand_quickbooks",
            "integrand_salesforce",
            "integrand_nats",
            "integrand_amqp",
            "integrand_postgres",
            "tests",
        ]
    ):
        from tests import fuzz_targets

    fn = fuzz_targets.TARGETS[target]
    fuzz_targets.webhook_sources()  # built once, outside the measured inputs
    atheris.Setup(sys.argv[:1] + sys.argv[sys.argv.index("--") + 1 :], fn)
    atheris.Fuzz()


def campaign(targets: list[str], seconds: int) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    findings = ROOT / "bench" / "fuzz-findings"
    findings.mkdir(parents=True, exist_ok=True)
    for target in targets:
        work = ROOT / "bench" / "fuzz-work" / target
        work.mkdir(parents=True, exist_ok=True)
        seed = ROOT / "tests" / "fuzz_corpus" / target
        before = set(findings.iterdir())
        started = time.monotonic()
        cmd = [
            sys.executable,
            __file__,
            "--run",
            target,
            "--",
            str(work),
            str(seed),
            f"-max_total_time={seconds}",
            f"-artifact_prefix={findings}/{target}-",
            "-rss_limit_mb=2048",
            "-timeout=10",
            "-print_final_stats=1",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        out = proc.stdout + proc.stderr
        runs = re.findall(r"stat::number_of_executed_units:\s+(\d+)", out) or re.findall(r"Done (\d+) runs", out)
        new = sorted(str(p.relative_to(ROOT)) for p in set(findings.iterdir()) - before)
        results[target] = {
            "seconds": round(time.monotonic() - started, 1),
            "executions": int(runs[-1]) if runs else 0,
            "corpus_found": len(list(work.iterdir())),
            "findings": new,
            "exit": proc.returncode,
        }
        if new:
            tail = "\n".join(out.splitlines()[-40:])
            print(f"{target}: {len(new)} finding(s):\n{tail}", file=sys.stderr)
        print(f"{target}: {results[target]}", flush=True)
    return results


def main() -> int:
    if "--run" in sys.argv:
        run_one(sys.argv[sys.argv.index("--run") + 1])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=120, help="per target")
    ap.add_argument("targets", nargs="*", default=TARGETS)
    args = ap.parse_args()
    fresh = campaign(args.targets, args.seconds)
    out = ROOT / "bench" / "results-fuzz.json"
    at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    # Targets not run this time keep their last figures (each row says when it ran).
    results = json.loads(out.read_text()).get("targets", {}) if out.exists() else {}
    results.update({t: {**r, "at": at, "seconds_asked": args.seconds} for t, r in fresh.items()})
    out.write_text(json.dumps({"at": at, "targets": results}, indent=2))
    sys.path.insert(0, str(ROOT / "bench"))
    from reliability_doc import put_block

    rows = "\n".join(
        f"| {t} | {r.get('at', '')} | {r['executions']:,} | {r['seconds']:.0f} | {r['corpus_found']} | {len(r['findings'])} |"
        for t, r in results.items()
    )
    put_block(
        "fuzz",
        "`bench/fuzz.py` (atheris; 2 shared cores, run at nice 10 beside other work):\n\n"
        "| target | run at | executions | seconds | new corpus inputs | findings |\n|---|---|---|---|---|---|\n" + rows,
    )
    return 1 if any(r["findings"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
