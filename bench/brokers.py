"""Brokers through integrand beside the same broker driven directly by its Python client, same guarantees.

    python bench/brokers.py [--runs 3] [--messages 10000] [--rate 1000] [--write]

For NATS JetStream (127.0.0.1:4222) and RabbitMQ (127.0.0.1:5672, a quorum queue in a vhost of its own):

publish   N events to the broker. integrand: N events already in its store, its sink publishing
          them (a delivery is done only with its PubAck / publisher confirm); timed from the daemon's
          start to the last message on the broker. direct: the client publishing N persistent
          messages, 256 in flight, each awaited for its PubAck / confirm.
consume   N messages waiting on the broker. integrand: its streaming source storing them (every one
          committed to its SQLite store, fsync on commit) and acking after the commit; timed to the
          last one stored. direct: the client fetching / consuming and acking after "processing"
          (nothing: the bare client's ceiling).
latency   messages published at a steady rate (--rate/s, 5 s) carrying their send time; p50/p99 of
          send → committed in integrand's store (integrand) or send → acked by the consumer (direct).

Figures are medians of --runs. --write puts the table into docs/benchmarks.md between its markers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from integrand.config import load_config
from integrand.events import Event
from integrand.store import Store
from integrand.testing import running_daemon

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- brokers:begin -->", "<!-- brokers:end -->"
NATS_URL = "nats://127.0.0.1:4222"

BASE = """
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"
log_level = "warning"

[admin]
enabled = false
"""


async def until(pred: Callable[[], Awaitable[bool]], limit: float = 300.0, every: float = 0.02) -> None:
    deadline = time.monotonic() + limit
    while not await pred():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not met in time")
        await asyncio.sleep(every)


def events(n: int) -> list[Event]:
    return [
        Event(
            id=f"b{i}",
            source="bench",
            type="order.created",
            data={"n": i, "pad": "x" * 200},
            entity="order",
            entity_id=f"o{i % 500}",
            version=str(i),
        )
        for i in range(n)
    ]


def stored(db: Path, source: str) -> int:
    with sqlite3.connect(db) as c:
        return int(c.execute("SELECT COUNT(*) FROM events WHERE source = ?", (source,)).fetchone()[0])


def commit_latencies(db: Path, source: str) -> list[float]:
    """send time (in the payload) → the store's received_at of the committed row, per message, in ms."""
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT received_at, body FROM events WHERE source = ?", (source,)).fetchall()
    return [(at - orjson.loads(body)["data"]["t"]) * 1000 for at, body in rows]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def preload(root: Path, sink: str, n: int) -> None:
    """N events with a ready delivery to ``sink``, as a webhook burst would have left them."""
    store = Store(root / "var" / "integrand.db")
    await store.open()
    try:
        evs = events(n)
        for i in range(0, n, 1000):
            await store.enqueue([(e, [sink]) for e in evs[i : i + 1000]])
    finally:
        await store.close()


# --- NATS ---------------------------------------------------------------------------------------


async def nats_stream() -> tuple[Any, Any, str]:
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    name = f"bench_{secrets.token_hex(3)}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], duplicate_window=120.0))
    return nc, js, name


async def nats_publish_direct(n: int) -> float:
    nc, js, stream = await nats_stream()
    try:
        payloads = [orjson.dumps(e.to_dict()) for e in events(n)]
        t0 = time.perf_counter()
        futs: list[Any] = []
        for i, p in enumerate(payloads):
            futs.append(await js.publish_async(f"{stream}.order", p, headers={"Nats-Msg-Id": f"b{i}"}))
            if len(futs) >= 256:
                await asyncio.gather(*futs)
                futs = []
        await asyncio.gather(*futs)
        return n / (time.perf_counter() - t0)
    finally:
        await js.delete_stream(stream)
        await nc.close()


async def nats_publish_direct_lean(n: int) -> float:
    """The client's core publish with a reply subject of our own and one wildcard subscription gathering the
    PubAcks (what integrand's sink does), 256 in flight: the same guarantees without publish_async's per-message
    semaphore, future and PubAck object. For reference beside publish_async, the client's documented way."""
    nc, js, stream = await nats_stream()
    try:
        payloads = [orjson.dumps(e.to_dict()) for e in events(n)]
        prefix = nc.new_inbox() + "."
        left = 0
        done = asyncio.get_running_loop().create_future()
        errors: list[bytes] = []

        async def on_ack(msg: Any) -> None:
            nonlocal left
            if b'"error"' in msg.data or (msg.headers and msg.headers.get("Status") == "503"):
                errors.append(msg.data)
            left -= 1
            if left == 0 and not done.done():
                done.set_result(None)

        await nc.subscribe(prefix + "*", cb=on_ack)
        t0 = time.perf_counter()
        for lo in range(0, n, 256):
            chunk = payloads[lo : lo + 256]
            left = len(chunk)
            done = asyncio.get_running_loop().create_future()
            for i, p in enumerate(chunk, lo):
                await nc.publish(f"{stream}.order", p, reply=f"{prefix}{i}", headers={"Nats-Msg-Id": f"b{i}"})
            await asyncio.wait_for(done, 30)
        if errors:
            raise RuntimeError(f"{len(errors)} publishes refused: {errors[0]!r}")
        return n / (time.perf_counter() - t0)
    finally:
        await js.delete_stream(stream)
        await nc.close()


async def nats_publish_integrand(n: int, root: Path) -> float:
    nc, js, stream = await nats_stream()
    try:
        cfg = root / "config.toml"
        cfg.write_text(BASE + f'[sinks.bus]\nconnector = "nats"\nsubject = "{stream}.{{entity}}"\n')
        await preload(root, "bus", n)

        async def all_there() -> bool:
            return bool((await js.stream_info(stream)).state.messages >= n)

        async with running_daemon(load_config(cfg)):
            t0 = time.perf_counter()
            await until(all_there)
            return n / (time.perf_counter() - t0)
    finally:
        await js.delete_stream(stream)
        await nc.close()


async def nats_fill(js: Any, stream: str, n: int, rate: float | None = None) -> None:
    futs: list[Any] = []
    t_start = time.time()
    for i in range(n):
        if rate is not None:
            wait = t_start + i / rate - time.time()
            if wait > 0:
                await asyncio.gather(*futs)
                futs = []
                await asyncio.sleep(wait)
        body = orjson.dumps({"n": i, "t": time.time(), "pad": "x" * 200})
        futs.append(await js.publish_async(f"{stream}.order", body, headers={"Nats-Msg-Id": f"m{i}"}))
        if len(futs) >= 256:
            await asyncio.gather(*futs)
            futs = []
    await asyncio.gather(*futs)


async def nats_consume_direct(n: int, rate: float | None = None) -> tuple[float, list[float]]:
    nc, js, stream = await nats_stream()
    try:
        sub = await js.pull_subscribe(
            f"{stream}.>",
            durable="direct",
            stream=stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=256),
        )
        filler = None
        if rate is None:
            await nats_fill(js, stream, n)
        else:
            filler = asyncio.create_task(nats_fill(js, stream, n, rate))
        lat: list[float] = []
        got = 0
        t0 = time.perf_counter()
        while got < n:
            try:
                msgs = await sub.fetch(256, timeout=1)
            except TimeoutError:
                continue
            for m in msgs:
                await m.ack()
                lat.append((time.time() - orjson.loads(m.data)["t"]) * 1000)
            got += len(msgs)
        await nc.flush()
        elapsed = time.perf_counter() - t0
        if filler is not None:
            await filler
        return n / elapsed, lat
    finally:
        await js.delete_stream(stream)
        await nc.close()


async def nats_consume_integrand(n: int, root: Path, rate: float | None = None) -> tuple[float, list[float]]:
    nc, js, stream = await nats_stream()
    try:
        cfg = root / "config.toml"
        cfg.write_text(BASE + f'[sources.bus]\nconnector = "nats"\nstream = "{stream}"\ndurable = "integrand"\n')
        if rate is None:
            await nats_fill(js, stream, n)
        db = root / "var" / "integrand.db"
        async with running_daemon(load_config(cfg)):
            filler = asyncio.create_task(nats_fill(js, stream, n, rate)) if rate is not None else None
            t0 = time.perf_counter()

            async def all_stored() -> bool:
                return stored(db, "bus") >= n

            await until(all_stored, every=0.05)
            elapsed = time.perf_counter() - t0
            if filler is not None:
                await filler
        return n / elapsed, commit_latencies(db, "bus")
    finally:
        await js.delete_stream(stream)
        await nc.close()


# --- RabbitMQ -----------------------------------------------------------------------------------


def ctl(*args: str) -> None:
    subprocess.run([shutil.which("rabbitmqctl") or "rabbitmqctl", "-q", *args], check=True, capture_output=True)


async def amqp_queue(vhost: str) -> tuple[Any, Any, str]:
    conn = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:5672/{vhost}")
    ch = await conn.channel(publisher_confirms=True)
    name = f"bench_{secrets.token_hex(3)}"
    await ch.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    return conn, ch, name


async def amqp_fill(ch: Any, queue: str, n: int, rate: float | None = None, mid: str = "m") -> None:
    futs: list[Any] = []
    t_start = time.time()
    for i in range(n):
        if rate is not None:
            wait = t_start + i / rate - time.time()
            if wait > 0:
                await asyncio.gather(*futs)
                futs = []
                await asyncio.sleep(wait)
        body = orjson.dumps({"n": i, "t": time.time(), "pad": "x" * 200})
        msg = aio_pika.Message(body, message_id=f"{mid}{i}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        futs.append(asyncio.ensure_future(ch.default_exchange.publish(msg, queue)))
        if len(futs) >= 256:
            await asyncio.gather(*futs)
            futs = []
    await asyncio.gather(*futs)


async def amqp_count(ch: Any, queue: str) -> int:
    q = await ch.declare_queue(queue, passive=True)
    return int(q.declaration_result.message_count)


async def amqp_publish_direct(n: int, vhost: str) -> float:
    conn, ch, q = await amqp_queue(vhost)
    try:
        t0 = time.perf_counter()
        await amqp_fill(ch, q, n)
        return n / (time.perf_counter() - t0)
    finally:
        await ch.queue_delete(q)
        await conn.close()


async def amqp_publish_integrand(n: int, root: Path, vhost: str) -> float:
    conn, ch, q = await amqp_queue(vhost)
    try:
        cfg = root / "config.toml"
        cfg.write_text(
            BASE + f'[sinks.bus]\nconnector = "amqp"\nvhost = "{vhost}"\nexchange = ""\nrouting_key = "{q}"\n'
        )
        await preload(root, "bus", n)

        async def all_there() -> bool:
            return await amqp_count(ch, q) >= n

        async with running_daemon(load_config(cfg)):
            t0 = time.perf_counter()
            await until(all_there, every=0.05)
            return n / (time.perf_counter() - t0)
    finally:
        await ch.queue_delete(q)
        await conn.close()


async def amqp_consume_direct(n: int, vhost: str, rate: float | None = None) -> tuple[float, list[float]]:
    conn, ch, q = await amqp_queue(vhost)
    try:
        cch = await conn.channel()
        await cch.set_qos(prefetch_count=512)
        queue = await cch.get_queue(q)
        filler = None
        if rate is None:
            await amqp_fill(ch, q, n)
        else:
            filler = asyncio.create_task(amqp_fill(ch, q, n, rate))
        lat: list[float] = []
        done = asyncio.Event()

        async def on_message(m: Any) -> None:
            await m.ack()
            lat.append((time.time() - orjson.loads(m.body)["t"]) * 1000)
            if len(lat) >= n:
                done.set()

        t0 = time.perf_counter()
        await queue.consume(on_message)
        await done.wait()
        elapsed = time.perf_counter() - t0
        if filler is not None:
            await filler
        return n / elapsed, lat
    finally:
        await ch.queue_delete(q)
        await conn.close()


async def amqp_consume_integrand(
    n: int, root: Path, vhost: str, rate: float | None = None
) -> tuple[float, list[float]]:
    conn, ch, q = await amqp_queue(vhost)
    try:
        cfg = root / "config.toml"
        cfg.write_text(BASE + f'[sources.bus]\nconnector = "amqp"\nvhost = "{vhost}"\nqueue = "{q}"\n')
        if rate is None:
            await amqp_fill(ch, q, n)
        db = root / "var" / "integrand.db"
        async with running_daemon(load_config(cfg)):
            filler = asyncio.create_task(amqp_fill(ch, q, n, rate)) if rate is not None else None
            t0 = time.perf_counter()

            async def all_stored() -> bool:
                return stored(db, "bus") >= n

            await until(all_stored, every=0.05)
            elapsed = time.perf_counter() - t0
            if filler is not None:
                await filler
        return n / elapsed, commit_latencies(db, "bus")
    finally:
        await ch.queue_delete(q)
        await conn.close()


# --- the run ------------------------------------------------------------------------------------


async def main(runs: int, n: int, rate: float) -> dict[str, Any]:
    vhost = f"bench_{secrets.token_hex(3)}"
    ctl("add_vhost", vhost)
    ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    res: dict[str, list[Any]] = {}

    def add(key: str, value: Any) -> None:
        res.setdefault(key, []).append(value)
        print(f"  {key}: {value if not isinstance(value, tuple) else value[0]:.0f}", flush=True)

    def tmp() -> Path:
        return Path(tempfile.mkdtemp(prefix="integrand-bench-"))

    latency_n = int(rate * 5)
    try:
        for r in range(runs):
            load = os.getloadavg()[0]
            res.setdefault("load", []).append(load)
            print(f"run {r + 1}/{runs} (load average {load:.1f})", flush=True)
            add("nats.publish.direct", await nats_publish_direct(n))
            add("nats.publish.direct_lean", await nats_publish_direct_lean(n))
            add("nats.publish.integrand", await nats_publish_integrand(n, tmp()))
            add("nats.consume.direct", (await nats_consume_direct(n))[0])
            add("nats.consume.integrand", (await nats_consume_integrand(n, tmp()))[0])
            add("amqp.publish.direct", await amqp_publish_direct(n, vhost))
            add("amqp.publish.integrand", await amqp_publish_integrand(n, tmp(), vhost))
            add("amqp.consume.direct", (await amqp_consume_direct(n, vhost))[0])
            add("amqp.consume.integrand", (await amqp_consume_integrand(n, tmp(), vhost))[0])
            for broker, direct, through in (
                (
                    "nats",
                    lambda: nats_consume_direct(latency_n, rate),
                    lambda: nats_consume_integrand(latency_n, tmp(), rate),
                ),
                (
                    "amqp",
                    lambda: amqp_consume_direct(latency_n, vhost, rate),
                    lambda: amqp_consume_integrand(latency_n, tmp(), vhost, rate),
                ),
            ):
                for who, fn in (("direct", direct), ("integrand", through)):
                    _, lat = await fn()
                    res.setdefault(f"{broker}.latency.{who}", []).append((pct(lat, 50), pct(lat, 99)))
                    print(f"  {broker}.latency.{who}: p50 {pct(lat, 50):.1f} ms p99 {pct(lat, 99):.1f} ms", flush=True)
    finally:
        ctl("delete_vhost", vhost)
    return {"runs": runs, "messages": n, "rate": rate, "results": res}


def table(out: dict[str, Any]) -> str:
    r = out["results"]
    med = {k: statistics.median(v) for k, v in r.items() if not isinstance(v[0], tuple)}
    loads = r.get("load", [])
    lines = [
        f"{BEGIN}",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores; how busy: the load averages "
        f"below), Python {platform.python_version()}; NATS server and RabbitMQ "
        f"{_rabbit_version()} on 127.0.0.1. `python bench/brokers.py --runs {out['runs']} --messages "
        f"{out['messages']} --rate {out['rate']:g}`; medians of {out['runs']} runs, shipped defaults. "
        f"Load average (1 min) at the start of each run: {', '.join(f'{x:.1f}' for x in loads) or '?'}.",
        "",
        "| broker | direction | direct client (msg/s) | through integrand (msg/s) | ratio | ratio per run | target ≥ 0.5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for broker, label in (("nats", "NATS JetStream"), ("amqp", "RabbitMQ (quorum queue)")):
        for d in ("publish", "consume"):
            a, b = med[f"{broker}.{d}.direct"], med[f"{broker}.{d}.integrand"]
            per_run = ", ".join(
                f"{y / x:.2f}" for x, y in zip(r[f"{broker}.{d}.direct"], r[f"{broker}.{d}.integrand"], strict=True)
            )
            lines.append(
                f"| {label} | {d} | {a:,.0f} | {b:,.0f} | {b / a:.2f} | {per_run} "
                f"| {'met' if b / a >= 0.5 else 'not met'} |"
            )
    if "nats.publish.direct_lean" in med:
        a, b = med["nats.publish.direct_lean"], med["nats.publish.integrand"]
        per_run = ", ".join(
            f"{y / x:.2f}" for x, y in zip(r["nats.publish.direct_lean"], r["nats.publish.integrand"], strict=True)
        )
        lines.append(
            f"| NATS JetStream, for reference | publish, the direct client on the sink's lean PubAck path "
            f"| {a:,.0f} | {b:,.0f} | {b / a:.2f} | {per_run} | — |"
        )
    lines += [
        "",
        f"Latency at a steady {out['rate']:g} msg/s for 5 s (median over runs of each run's percentile):",
        "",
        "| broker | direct: send → acked, p50 / p99 (ms) | integrand: send → committed in its store, p50 / p99 (ms) |",
        "|---|---|---|",
    ]
    for broker, label in (("nats", "NATS JetStream"), ("amqp", "RabbitMQ (quorum queue)")):
        d = r[f"{broker}.latency.direct"]
        i = r[f"{broker}.latency.integrand"]
        lines.append(
            f"| {label} | {statistics.median(x[0] for x in d):.1f} / {statistics.median(x[1] for x in d):.1f} "
            f"| {statistics.median(x[0] for x in i):.1f} / {statistics.median(x[1] for x in i):.1f} |"
        )
    lines.append(END)
    return "\n".join(lines)


def _rabbit_version() -> str:
    try:
        out = subprocess.run(["rabbitmqctl", "-q", "version"], capture_output=True, text=True, timeout=30).stdout
        return out.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--write", action="store_true", help="put the table into docs/benchmarks.md")
    a = ap.parse_args()
    result = asyncio.run(main(a.runs, a.messages, a.rate))
    (ROOT / "bench" / "brokers.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    text = table(result)
    print(text)
    if a.write:
        doc = DOC.read_text()
        if BEGIN in doc:
            head, rest = doc.split(BEGIN, 1)
            doc = head + text + rest.split(END, 1)[1]
        else:
            doc += "\n## Message brokers (`bench/brokers.py`)\n\n" + text + "\n"
        DOC.write_text(doc)
    sys.exit(0)
