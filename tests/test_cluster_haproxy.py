"""examples/cluster/ as shipped: the real HAProxy (``make haproxy``) in front of three ``integrand run``
nodes on one PostgreSQL store, signed webhooks through it, one node stopped in the middle.

HAProxy's config is the example's, with only its ports changed to free ones; so are the nodes'.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest

from integrand.store.postgres import PgStore

from .daemon_proc import DaemonProcess, jsonl_ids
from .helpers import DEMO_SECRET, signed_headers, wait_for
from .pgdb import fresh_schema

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cluster"
CLIENT = "127.0.0.5"  # the "provider": not HAProxy's address, so only X-Forwarded-For can name it


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or str(ROOT / ".venv" / "tools" / "usr" / "sbin" / "haproxy")
    if not os.access(found, os.X_OK):
        pytest.fail("haproxy is not installed: run `make haproxy` (Debian's package, unpacked under .venv/tools)")
    return found


def nginx_binary() -> str:
    found = shutil.which("nginx") or str(ROOT / ".venv" / "tools" / "usr" / "sbin" / "nginx")
    if not os.access(found, os.X_OK):
        pytest.fail("nginx is not installed: run `make haproxy` (Debian's packages, unpacked under .venv/tools)")
    return found


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def test_the_example_configs_are_valid(tmp_path: Path) -> None:
    check = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(EXAMPLE / "haproxy.cfg")], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    ngx = subprocess.run(
        [nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(EXAMPLE / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ngx.returncode == 0 and "test is successful" in ngx.stderr, ngx.stderr
    for n in (1, 2, 3):
        text = (EXAMPLE / f"node{n}.toml").read_text()
        assert f'listen = "127.0.0.1:818{n}"' in text and f'listen = "127.0.0.1:918{n}"' in text
        assert f"server node{n} 127.0.0.1:818{n} check port 918{n}" in (EXAMPLE / "haproxy.cfg").read_text()


def stats(port: int) -> dict[str, dict[str, str]]:
    """HAProxy's per-server CSV (``/stats;csv``) as {server: row}."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats;csv", timeout=5) as resp:
        text = resp.read().decode().lstrip("# ")
    return {r["svname"]: r for r in csv.DictReader(io.StringIO(text)) if r["pxname"] == "integrand"}


async def test_three_nodes_behind_haproxy_take_every_webhook_while_one_stops(
    tmp_path: Path, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    haproxy = haproxy_binary()
    schema = await fresh_schema(pg_database)
    dsn = f"{pg_database}?search_path={schema}"
    monkeypatch.setenv("INTEGRAND_STORE_DSN", dsn)
    monkeypatch.setenv("DEMO_WEBHOOK_SECRET", DEMO_SECRET)
    front, stats_port, *node_ports = free_ports(8)
    cfg = (EXAMPLE / "haproxy.cfg").read_text()
    cfg = cfg.replace("127.0.0.1:8080", f"127.0.0.1:{front}").replace("127.0.0.1:8404", f"127.0.0.1:{stats_port}")
    nodes = []
    for n in (1, 2, 3):
        web, admin = node_ports[2 * (n - 1)], node_ports[2 * (n - 1) + 1]
        cfg = cfg.replace(f"127.0.0.1:818{n} check port 918{n}", f"127.0.0.1:{web} check port {admin}")
        text = (EXAMPLE / f"node{n}.toml").read_text()
        text = text.replace(f"127.0.0.1:818{n}", f"127.0.0.1:{web}").replace(f"127.0.0.1:918{n}", f"127.0.0.1:{admin}")
        (tmp_path / f"node{n}.toml").write_text(text)
        nodes.append(DaemonProcess(tmp_path / f"node{n}.toml", tmp_path / f"node{n}.log"))
    (tmp_path / "haproxy.cfg").write_text(cfg)
    log = (tmp_path / "haproxy.log").open("wb")
    proxy = await asyncio.create_subprocess_exec(
        haproxy, "-f", str(tmp_path / "haproxy.cfg"), "-db", stdout=log, stderr=log
    )
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        await wait_for(lambda: all(r["status"] == "UP" for r in stats(stats_port).values() if r["svname"].startswith("node")), timeout=30, interval=0.2)  # fmt: skip
        url = f"http://127.0.0.1:{front}/hooks/demo"
        ids = [f"msg_{i:04d}" for i in range(300)]
        statuses: Counter[int] = Counter()
        queue: asyncio.Queue[str] = asyncio.Queue()
        for i in ids:
            queue.put_nowait(i)
        stopped = asyncio.Event()

        async def sender(session: aiohttp.ClientSession) -> None:
            while not queue.empty():
                msg_id = queue.get_nowait()
                body = orjson.dumps({"type": "customer.updated", "data": {"id": f"c{int(msg_id[4:]) % 20}"}})
                async with session.post(url, data=body, headers=signed_headers(body, msg_id)) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
                if statuses[200] == 100 and not stopped.is_set():
                    stopped.set()
                    nodes[1].signal(signal.SIGTERM)  # node2 leaves mid-load: HAProxy sends its share elsewhere

        connector = aiohttp.TCPConnector(local_addr=(CLIENT, 0), limit=16)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            await asyncio.gather(*(sender(session) for _ in range(16)))
            body = b'{"type": "forged"}'
            async with session.post(url, data=body, headers=signed_headers(body, "forged", secret="whsec_" + "A" * 32)) as r:  # fmt: skip
                assert r.status == 401
        assert statuses == Counter({200: len(ids)}), statuses  # every webhook taken, none refused
        assert await nodes[1].wait() == 0

        sinks = [tmp_path / "var" / f"node{n}" / "events.jsonl" for n in (1, 2, 3)]

        def delivered() -> Counter[str]:
            return Counter(i for s in sinks for i in jsonl_ids(s))

        await wait_for(lambda: set(delivered()) >= set(ids), timeout=60, interval=0.1)
        assert max(delivered().values()) == 1, "a webhook was delivered twice"
        seen = stats(stats_port)
        assert all(int(seen[f"node{n}"]["stot"]) > 0 for n in (1, 2, 3)), {k: v["stot"] for k, v in seen.items()}
        await wait_for(lambda: stats(stats_port)["node2"]["status"].startswith("DOWN"), timeout=10, interval=0.2)

        pg = PgStore(dsn, role="reader")
        await pg.open()
        try:
            [refused] = await pg.rejections()
            [found] = await pg.find_events("demo:msg_0042")
        finally:
            await pg.close()
        assert (refused.status, refused.remote) == (401, CLIENT)  # X-Forwarded-For believed from HAProxy only
        assert found.request_id is not None and re.fullmatch(r"[0-9A-F]+:[0-9A-F]+_[0-9A-F]+:[0-9A-F]+_.+", found.request_id)  # fmt: skip
    finally:
        proxy.terminate()
        await asyncio.wait_for(proxy.wait(), 10)
        log.close()
        for node in nodes:
            await node.kill()
