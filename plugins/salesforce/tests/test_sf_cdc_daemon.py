"""CDC through the running daemon: a restart resumes from the committed replay id; an expired one resyncs in full."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from integrand_salesforce.testing import RunningFake, fake_salesforce

from integrand.testing import daemon_config, running_daemon, wait_for


def config(tmp_path: Path, sf: RunningFake) -> Path:
    return daemon_config(
        tmp_path,
        f"""
[sources.sf]
{sf.toml(cdc=True, objects=["Account"], fields={"Account": ["Name"]})}

[sources.sf.poll]
enabled = false

[sources.sf.stream]
backoff_base = "50ms"
backoff_cap = "200ms"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "sf"
to = ["out"]
""",
    )


def lines(tmp_path: Path) -> list[dict[str, Any]]:
    out = tmp_path / "var" / "out.jsonl"
    return [orjson.loads(x) for x in out.read_bytes().splitlines()] if out.exists() else []


def names(tmp_path: Path) -> list[str]:
    return sorted(str(e["data"].get("Name")) for e in lines(tmp_path))


async def test_a_restart_resumes_from_the_committed_replay_id_nothing_lost_or_doubled(tmp_path: Path) -> None:
    async with fake_salesforce(pubsub=True, keepalive=0.2) as sf:
        assert sf.pubsub is not None
        sf.pubsub.enable("Account", ["Name"])
        cfg = config(tmp_path, sf)
        async with running_daemon(cfg) as d:
            await wait_for(lambda: sf.pubsub is not None and sf.pubsub.subscribes >= 1)
            for i in range(3):
                sf.fake.create("Account", Name=f"before {i}")
            await wait_for(lambda: len(lines(tmp_path)) == 3, timeout=20)
            sf.pubsub.disconnect()  # a dropped stream mid-way: reconnect from the committed position
            sf.fake.create("Account", Name="across the drop")
            await wait_for(lambda: len(lines(tmp_path)) == 4, timeout=20)
            position = d.streamers["sf"].status()["position"]
            assert position and "replay_id" in position
        for i in range(2):
            sf.fake.create("Account", Name=f"while stopped {i}")
        async with running_daemon(cfg):
            await wait_for(lambda: len(lines(tmp_path)) == 6, timeout=20)
            sf.fake.create("Account", Name="after")
            await wait_for(lambda: len(lines(tmp_path)) == 7, timeout=20)
        assert names(tmp_path) == sorted(
            ["before 0", "before 1", "before 2", "across the drop", "while stopped 0", "while stopped 1", "after"]
        )
        ids = [e["id"] for e in lines(tmp_path)]
        assert len(ids) == len(set(ids))
        assert sf.pubsub.subscribes >= 3


async def test_an_expired_replay_id_means_a_logged_full_resync(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with fake_salesforce(pubsub=True, keepalive=0.2) as sf:
        assert sf.pubsub is not None
        sf.pubsub.enable("Account", ["Name"])
        cfg = config(tmp_path, sf)
        async with running_daemon(cfg):
            await wait_for(lambda: sf.pubsub is not None and sf.pubsub.subscribes >= 1)
            sf.fake.create("Account", Name="seen")
            await wait_for(lambda: len(lines(tmp_path)) == 1, timeout=20)
        sf.fake.create("Account", Name="missed while down for 3 days")
        sf.pubsub.expire_events()  # 72 hours pass: the committed replay id is no longer on the bus
        caplog.set_level(logging.WARNING)
        async with running_daemon(cfg):
            await wait_for(lambda: "missed while down for 3 days" in names(tmp_path), timeout=20)
            sf.fake.create("Account", Name="after the resync")
            await wait_for(lambda: "after the resync" in names(tmp_path), timeout=20)
        assert "replayid.corrupted" in caplog.text and "full resync of Account" in caplog.text
        resynced = [e for e in lines(tmp_path) if e["meta"].get("via") == "resync"]
        assert {e["data"]["Name"] for e in resynced} >= {"missed while down for 3 days"}
