"""The admin port: health, readiness, metrics and status, never on the webhook port."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from .helpers import admin_url, hook_url, post_signed, read_jsonl, running, settings_for, wait_for


async def test_admin_endpoints(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    out = tmp_path / "var" / "out.jsonl"
    async with running(settings) as d, aiohttp.ClientSession() as s:
        assert d.ports["admin"] != d.ports["webhooks"]
        async with s.get(admin_url(d, "/healthz")) as r:
            assert r.status == 200
        async with s.get(admin_url(d, "/readyz")) as r:
            assert (r.status, (await r.json())["status"]) == (200, "ready")
        await post_signed(s, hook_url(d), {"type": "t"}, "m1")
        async with s.post(hook_url(d), data=b"{}", headers={"Content-Type": "application/json"}) as r:
            assert r.status == 401
        await wait_for(lambda: len(read_jsonl(out)) == 1)

        async def settled() -> bool:
            # The line is written before its ack commits: wait for the state itself, not the file.
            async with s.get(admin_url(d, "/status")) as r:
                st = await r.json()
            return bool(st["recent_rejections"]) and st["deliveries"] == {"out": {"done": 1}}

        await wait_for(settled)
        async with s.get(admin_url(d, "/status")) as r:
            status = await r.json()
        assert status["deliveries"] == {"out": {"done": 1}}
        assert status["breakers"]["out"]["status"] == "closed"
        assert status["recent_rejections"][0]["status"] == 401
        async with s.get(admin_url(d, "/metrics")) as r:
            text = await r.text()
        assert 'integrand_webhooks_total{source="demo",status="200"} 1.0' in text
        # The webhook's group commit, at least, was timed and counted.
        commits = float(text.split("\nintegrand_store_commit_seconds_count ")[1].split()[0])
        assert commits >= 1
        assert float(text.split("\nintegrand_store_commit_ops_sum ")[1].split()[0]) >= commits
        assert "\nintegrand_store_inline_checkpoints_total 0.0" in text  # one webhook: nothing to fall behind on
        assert 'integrand_webhooks_total{source="demo",status="401"} 1.0' in text
        assert 'integrand_deliveries_total{outcome="done",sink="out"} 1.0' in text
        assert 'integrand_deliveries_current{sink="out",state="done"} 1.0' in text
        # The admin routes do not exist on the webhook port.
        async with s.get(f"http://127.0.0.1:{d.ports['webhooks']}/metrics") as r:
            assert r.status == 404
