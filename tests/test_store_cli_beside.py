"""The CLI's write commands beside a running daemon under webhook load: zero failed webhooks.

Before issue 9, a CLI command that stored one event (``integrand reconcile``) made every later
enqueue of the daemon collide on ``events.id`` (500s until a restart). Here real ``integrand``
subprocesses run ``reconcile``, ``dlq replay`` and ``cursor set`` against the daemon's store while
webhooks keep arriving.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp

from .fake_rest import FakeRest
from .helpers import DEMO_SECRET, hook_url, post_signed, read_jsonl, running, settings_for, wait_for
from .receiver import Receiver


def config(api: str, bad_sink: str) -> str:
    return f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
entity_field = "object"
entity_id_field = "id"

[sources.crm]
connector = "http-poll"
url = "{api}/records?since={{since}}"
page_param = "after"
items = "$.results[*]"
id = "$.id"
updated = "$.updated_at"
next_page = "$.next"
deleted = "$.archived"
entity = "contact"

[sources.crm.poll]
min_interval = "1h"
max_interval = "2h"
target_latency = "1h"
reconcile = "1h"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[sinks.refusing]
connector = "http"
url = "{bad_sink}"

[[routes]]
from = "demo"
to = ["out", "refusing"]

[[routes]]
from = "crm"
to = ["out"]
"""


async def cli(config_path: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from integrand.cli import main; sys.exit(main())",
        *args,
        "--config",
        str(config_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_cli_writes_beside_a_daemon_under_load_fail_no_webhook(tmp_path: Path) -> None:
    api = FakeRest(seed=9, page_size=20)
    base = await api.start()
    refusing = Receiver(status=400)  # every delivery to it is dead-lettered: something to replay
    await refusing.start()
    try:
        settings = settings_for(tmp_path, config(base, refusing.url))
        config_path = tmp_path / "config.toml"
        for i in range(10):
            await api.change(f"c{i}")
        async with running(settings) as d, aiohttp.ClientSession() as s:
            # The daemon polls once at start, then not for an hour: changes made after that are found
            # only by the CLI's reconcile, which stores them, as an operator's `integrand reconcile` does.
            await wait_for(lambda: len(read_jsonl(tmp_path / "var" / "out.jsonl")) >= 10)
            statuses: list[int] = []
            sent: list[str] = []
            done = asyncio.Event()

            async def producer(p: int) -> None:
                # Senders keep going until every CLI command has run: each runs under load, not after it.
                i = p
                while not done.is_set() or i < 400:
                    sent.append(f"m{i}")
                    status, _ = await post_signed(s, hook_url(d, "demo"), {"object": "o", "id": f"e{i % 50}"}, f"m{i}")
                    statuses.append(status)
                    i += 8

            producers = asyncio.gather(*(producer(p) for p in range(8)))
            runs = []
            during: list[int] = []  # webhooks answered while each command ran
            for n in range(3):
                for i in range(5):
                    await api.change(f"r{n}-{i}")
                for args in (
                    ("reconcile", "crm", "--full"),
                    ("dlq", "replay", "--all"),
                    ("cursor", "set", "crm", f'{{"n": {n}}}'),
                ):
                    before = len(statuses)
                    runs.append(await cli(config_path, *args))
                    during.append(len(statuses) - before)
            done.set()
            await producers
            assert [r[0] for r in runs] == [0] * len(runs), runs
            assert min(during) > 0, during
            # The first reconcile stored the 5 changes the daemon had not polled (a `cursor set` may
            # make the daemon poll again, so later ones may find less to store).
            assert "missed=5" in runs[0][1], runs[0]
            assert len(statuses) >= 400 and statuses == [200] * len(statuses), sorted(set(statuses))
            await wait_for(
                lambda: {e["id"] for e in read_jsonl(tmp_path / "var" / "out.jsonl")} >= set(sent),
                timeout=30,
            )
            # The daemon still takes webhooks after the CLI is gone.
            assert (await post_signed(s, hook_url(d, "demo"), {"object": "o", "id": "after"}, "after"))[0] == 200
    finally:
        await refusing.stop()
        await api.close()
