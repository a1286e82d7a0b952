"""Events enter the store one way (``intake``): a version integrand cannot order is refused with a clear 400,
answer, alone, and nothing of that webhook is stored; the others go on."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from .helpers import DEMO_SECRET, hook_url, post_signed, read_jsonl, running, settings_for, wait_for

VERSIONED = f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "{DEMO_SECRET}"
entity_field = "object"
entity_id_field = "id"
version_field = "version"

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "demo"
to = ["out"]
"""


async def test_a_webhook_whose_version_cannot_be_ordered_gets_a_clear_400(tmp_path: Path) -> None:
    async with running(settings_for(tmp_path, VERSIONED)) as d, aiohttp.ClientSession() as s:
        url = hook_url(d, "demo")
        assert (await post_signed(s, url, {"object": "c", "id": "1", "version": "1767225600000"}, "m1"))[0] == 200
        status, got = await post_signed(s, url, {"object": "c", "id": "1", "version": "2026-06-01T00:00:00Z"}, "m2")
        assert status == 400
        assert "cannot be stored" in got["error"] and "one form of version" in got["error"], got
        status, got = await post_signed(s, url, {"object": "c", "id": "2", "version": "v7"}, "m3")
        assert (status, "neither a number nor an ISO-8601 time" in got["error"]) == (400, True), got
        # Others are not disturbed, and the refused ones were not stored (a retry gets the same answer).
        assert (await post_signed(s, url, {"object": "c", "id": "1", "version": "1767225600001"}, "m4"))[0] == 200
        assert (await post_signed(s, url, {"object": "c", "id": "1", "version": "2026-06-01T00:00:00Z"}, "m2"))[
            0
        ] == 400
        await wait_for(lambda: len(read_jsonl(tmp_path / "var" / "out.jsonl")) == 2)
    assert [e["id"] for e in read_jsonl(tmp_path / "var" / "out.jsonl")] == ["m1", "m4"]
