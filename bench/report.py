"""Turns bench/results.json into the generated section of docs/benchmarks.md (medians, ratios, verdicts)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

BEGIN = "<!-- BEGIN GENERATED RESULTS: written by bench/run.py from bench/results.json; do not edit by hand -->"
END = "<!-- END GENERATED RESULTS -->"

SKELETON = f"""# Benchmarks

`make bench` reproduces everything on this page (see bench/run.py).

{BEGIN}
{END}
"""

# The targets of the foundation issue.
INGEST_RATIO = 0.5
INGEST_P99_MS = 25.0
E2E_EPS = 5000.0
BARE_REFERENCE_RPS = 26000.0  # bare aiohttp+uvloop at 64 connections where the targets were set (the issue)
STORE_EPS = 14000.0
STORE_X_HUEY = 5.0
FLAT_WITHIN = 0.20


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(med(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def machine_section(data: dict[str, Any]) -> list[str]:
    out = ["### Machine and runs", ""]
    out.append("| part | when (UTC) | commit | command | load average before → after |")
    out.append("|---|---|---|---|---|")
    m: dict[str, Any] = {}
    for part in ("ingest", "e2e", "store"):
        if part in data:
            d = data[part]
            m = d["machine"]
            out.append(
                f"| {part} | {d['started']} | {m['commit']} | `{d['command']}` | "
                f"{d['loadavg_before']} → {d['loadavg_after']} |"
            )
    if m:
        v = m["versions"]
        out += [
            "",
            f"- CPU: {m['nproc']} x {m['cpu']} (from /proc/cpuinfo), {m['mem_gib']} GiB RAM, Linux {m['kernel']}",
            f"- Python {m['python']}, SQLite {m['sqlite']}, aiohttp {v['aiohttp']}, uvloop {v['uvloop']}, "
            f"aiosqlite {v['aiosqlite']}, orjson {v['orjson']}, huey {v['huey']}, persist-queue {v['persist-queue']}, "
            f"{m['wrk']}",
            "- The machine is shared: other agents were running at the same time (see the load averages), and "
            "the load generator runs on the same 2 cores as the server it measures.",
        ]
    return [*out, ""]


def ingest_section(d: dict[str, Any], verdicts: list[str]) -> list[str]:
    from http_bench import TARGETS

    out = [
        "### Ingest: wrk → webhook endpoint",
        "",
        f"{d['runs']} runs per configuration, {d['seconds']:.0f} s measured after a {d['warmup_seconds']} s warm-up, "
        "fresh server and state dir each run, targets interleaved within a run. "
        "Every request is a 1 KB JSON body with a valid Standard Webhooks signature and a unique `webhook-id`. "
        "Figures are medians (min-max for req/s). Latency is wrk's (closed loop). CPU is cores used "
        "(CPU seconds ÷ wall seconds) by the server and by wrk during the measured window; CPU µs/req is the "
        "server's CPU time per answered request, the figure least disturbed by the other agents on the machine.",
        "",
    ]
    for c, by_kind in sorted(d["results"].items(), key=lambda kv: int(kv[0])):
        bare = med([r["rps"] for r in by_kind["bare"]])
        out += [
            f"**{c} connections**",
            "",
            "| target | req/s | p50 ms | p99 ms | VmRSS MiB | VmHWM MiB | server CPU | server CPU µs/req | wrk CPU "
            "| ratio to bare |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, runs in by_kind.items():
            rps = [r["rps"] for r in runs]
            secs = [r["duration_us"] / 1e6 for r in runs]
            ratio = "1" if kind == "bare" else f"{med(rps) / bare:.2f}"
            paired = [r["rps"] / b["rps"] for r, b in zip(runs, by_kind["bare"], strict=False)]
            if kind != "bare":
                ratio += " (per run: " + ", ".join(f"{p:.2f}" for p in paired) + ")"
            out.append(
                f"| {TARGETS.get(kind, kind)} | {spread(rps)} | {med([r['p50_us'] / 1000 for r in runs]):.1f} | "
                f"{med([r['p99_us'] / 1000 for r in runs]):.1f} | {med([r['VmRSS'] / 1024 for r in runs]):.0f} | "
                f"{med([r['VmHWM'] / 1024 for r in runs]):.0f} | "
                f"{med([r['server_cpu_s'] / s for r, s in zip(runs, secs, strict=True)]):.2f} | "
                f"{med([r['server_cpu_s'] / r['ok'] * 1e6 for r in runs]):.0f} | "
                f"{med([r['wrk_cpu_s'] / s for r, s in zip(runs, secs, strict=True)]):.2f} | {ratio} |"
            )
            bad = sum(r["errors_status"] for r in runs)
            if bad:
                out.append(f"| ↳ {bad} non-2xx answers in these runs | | | | | | | | | |")
        out.append("")
        if c == "64" and "integrand" in by_kind:
            for kind in ("integrand", "integrand-noroute"):
                if kind not in by_kind:
                    continue
                runs = by_kind[kind]
                ratio = med([r["rps"] for r in runs]) / bare
                p99 = med([r["p99_us"] / 1000 for r in runs])
                ok = ratio >= INGEST_RATIO and p99 <= INGEST_P99_MS
                verdicts.append(
                    f"| ingest ≥ {INGEST_RATIO} x bare at 64 connections with p99 ≤ {INGEST_P99_MS:.0f} ms "
                    f"({TARGETS[kind]}) | {ratio:.2f} x bare, p99 {p99:.1f} ms | {verdict(ok)} |"
                )
    stored = [
        (r.get("stored", 0), r["ok"])
        for by_kind in d["results"].values()
        for k, runs in by_kind.items()
        if k != "bare"
        for r in runs
    ]
    if stored:
        out.append(
            "Check: in every integrand run the store held at least as many events as wrk counted 2xx answers "
            f"(warm-up included): {all(s >= ok for s, ok in stored)}."
        )
        out.append("")
    return out


def e2e_section(d: dict[str, Any], verdicts: list[str]) -> list[str]:
    runs = d["results"]
    eps = [r["e2e_eps"] for r in runs]
    with_bare = all("bare_rps" in r for r in runs)
    out = [
        "### End to end: webhook in → jsonl sink written",
        "",
        f"wrk at {d['connections']} connections for {d['seconds']:.0f} s against a fresh integrand routing the "
        "source to a `jsonl` sink (fsync per batch); the clock runs from just before wrk starts to the "
        "modification time of the jsonl file once it holds every stored event."
        + (
            " Each run is preceded by the bare baseline (same connections and duration), so each run has "
            "its own measure of how fast the shared machine was."
            if with_bare
            else ""
        ),
        "",
        "| run | events | seconds | events/s | ingest req/s | sink done after load ends |"
        + (" bare req/s | events/s ÷ bare |" if with_bare else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if with_bare else ""),
    ]
    for i, r in enumerate(runs, 1):
        row = (
            f"| {i} | {r['lines']:,} | {r['e2e_seconds']:.2f} | {r['e2e_eps']:,.0f} | {r['rps']:,.0f} | "
            f"{r['drain_after_load_s']:.2f} s |"
        )
        if with_bare:
            row += f" {r['bare_rps']:,.0f} | {r['e2e_eps'] / r['bare_rps']:.2f} |"
        out.append(row)
    last = f"| **median** | | | **{med(eps):,.0f}** | {med([r['rps'] for r in runs]):,.0f} | |"
    ratio = ""
    if with_bare:
        ratios = [r["e2e_eps"] / r["bare_rps"] for r in runs]
        last += f" {med([r['bare_rps'] for r in runs]):,.0f} | {med(ratios):.2f} |"
        ratio = (
            f"; {med(ratios):.2f} x bare in the same runs (the target's machine: 5,000 at bare 26k = "
            f"{E2E_EPS / BARE_REFERENCE_RPS:.2f} x)"
        )
    out += [last, ""]
    verdicts.append(
        f"| end to end ≥ {E2E_EPS:,.0f} events/s sustained | {med(eps):,.0f} events/s{ratio} | "
        f"{verdict(med(eps) >= E2E_EPS)} |"
    )
    return out


def store_section(d: dict[str, Any], verdicts: list[str]) -> list[str]:
    from store_bench import QUEUES

    out = [
        "### The queue alone, beside what a Python user would otherwise pick",
        "",
        f"{d['events']:,} payloads of {d['payload_bytes']} bytes enqueued one per call by {d['producers']} concurrent "
        f"producers, then taken and acknowledged until empty by {d['consumers']} concurrent consumers "
        f"(integrand leases and completes up to {d['lease_batch']} per call; huey and persist-queue take one "
        "item per call, which is their API). `synchronous = FULL` for everyone, read back from each library's "
        f"connection. {d['runs']} runs, medians (min-max).",
        "",
        "| queue | synchronous | enqueue /s | take+ack /s | end to end /s | x huey |",
        "|---|---|---|---|---|---|",
    ]
    e2e = d["e2e"]
    notes: list[str] = []
    huey = med([r["e2e_rate"] for r in e2e["huey"]]) if "huey" in e2e else None
    for q, runs in e2e.items():
        rate = med([r["e2e_rate"] for r in runs])
        x = f"{rate / huey:.1f}" if huey else "-"
        sync = ",".join(sorted({str(r["synchronous"]) for r in runs}))
        capped = [r for r in runs if r.get("capped")]
        mark = " ‡" if capped else ""
        out.append(
            f"| {QUEUES.get(q, q)}{mark} | {sync} (FULL) | {spread([r['enqueue_rate'] for r in runs])} | "
            f"{spread([r['drain_rate'] for r in runs])} | {spread([r['e2e_rate'] for r in runs])} | {x} |"
        )
        if capped:
            notes.append(
                f"‡ {QUEUES.get(q, q)}: in {len(capped)} of {len(runs)} runs the drain was stopped after "
                f"{capped[0]['drain_s']:.0f} s, having taken "
                + ", ".join(f"{r['taken']:,}" for r in capped)
                + f" of {capped[0]['n']:,}; take+ack is the rate over that part and end to end counts all "
                "events at that rate. Its rate only falls as acked rows pile up, so this flatters it."
            )
    out += ["", *notes, ""] if notes else [""]
    if "integrand" in e2e and huey:
        rate = med([r["e2e_rate"] for r in e2e["integrand"]])
        ok = rate >= STORE_EPS and rate >= STORE_X_HUEY * huey
        verdicts.append(
            f"| store ≥ {STORE_EPS:,.0f} events/s end to end and ≥ {STORE_X_HUEY:.0f} x huey | "
            f"{rate:,.0f} events/s = {rate / huey:.1f} x huey ({huey:,.0f}/s) | {verdict(ok)} |"
        )
    bl = d["backlog"]
    take = d["backlog_take"]
    out += [
        f"**Under backlog**: 2,000 or 20,000 events are waiting (written untimed by an earlier process, in one "
        "transaction, with each library's own INSERT); then the rate of taking+acking the first "
        f"{take:,}, and of draining the whole backlog. {d.get('backlog_runs', d['runs'])} runs, medians (min-max).",
        "",
        "| queue | first 1,000: /s with 2,000 waiting | with 20,000 waiting | 20,000 / 2,000 "
        "| whole drain: /s of 2,000 | of 20,000 | 20,000 / 2,000 |",
        "|---|---|---|---|---|---|---|",
    ]
    backlog_notes: list[str] = []
    for q, by_n in bl.items():
        small = [r["rate"] for r in by_n["2000"]]
        big = [r["rate"] for r in by_n["20000"]]
        small_all = [r["drain_all_rate"] for r in by_n["2000"]]
        big_all = [r["drain_all_rate"] for r in by_n["20000"]]
        capped = [r for n in ("2000", "20000") for r in by_n[n] if r.get("capped")]
        mark = " ‡" if capped else ""
        out.append(
            f"| {QUEUES.get(q, q)}{mark} | {spread(small)} | {spread(big)} | {med(big) / med(small):.2f} | "
            f"{spread(small_all)} | {spread(big_all)} | {med(big_all) / med(small_all):.2f} |"
        )
        if capped:
            backlog_notes.append(
                f"‡ {QUEUES.get(q, q)}: the whole drain was stopped after 30 s in {len(capped)} runs, having "
                "drained " + ", ".join(f"{r['drained']:,}" for r in capped) + "; the rate is over that part."
            )
        if q == "integrand":
            ratio = min(med(big) / med(small), med(big_all) / med(small_all))
            verdicts.append(
                f"| flat under backlog: rate with 20,000 waiting within {FLAT_WITHIN:.0%} of the rate with 2,000 | "
                f"first 1,000: {med(big) / med(small):.2f}, whole drain: {med(big_all) / med(small_all):.2f} | "
                f"{verdict(ratio >= 1 - FLAT_WITHIN)} |"
            )
    return [*out, "", *backlog_notes, ""]


def render(data: dict[str, Any]) -> str:
    verdicts: list[str] = []
    body: list[str] = []
    if "ingest" in data:
        body += ingest_section(data["ingest"], verdicts)
    if "e2e" in data:
        body += e2e_section(data["e2e"], verdicts)
    if "store" in data:
        body += store_section(data["store"], verdicts)
    head = ["## Results", "", *machine_section(data), "### Against the targets", ""]
    head += ["| target | measured (medians) | verdict |", "|---|---|---|", *verdicts, ""]
    return "\n".join([BEGIN, *head, *body, END])


def write(doc: Path, data: dict[str, Any]) -> None:
    """Replace only the generated section; the hand-written reading around it stays."""
    text = doc.read_text() if doc.exists() else SKELETON
    if BEGIN not in text or END not in text:
        text = text.rstrip() + "\n\n" + BEGIN + "\n" + END + "\n"
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(before + render(data) + after)
