"""The admin API: one event's story, sources and sinks, refused webhooks, errors, and the token off loopback."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from integrand.config import load_config
from integrand.store import REJECTIONS_BUFFERED

from .fake_rest import FakeRest
from .helpers import admin_url, hook_url, post_signed, running, wait_for, write_config
from .receiver import Receiver
from .test_dlq_cli import Cli
from .test_http_poll import poll_config

TOKEN = "adm_5fJ2kQ9xLr7Tz3Wc"


def story_config(receiver: Receiver) -> str:
    return f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

[sinks.crm]
connector = "http"
url = "{receiver.url}"
retry = {{base = "10ms", cap = "20ms"}}

[[routes]]
from = "demo"
to = ["crm"]
"""


async def get(s: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    async with s.get(url, **kw) as r:
        return r.status, await r.json()


async def post(s: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> tuple[int, Any]:
    async with s.post(url, json=body, **kw) as r:
        return r.status, await r.json()


async def test_one_events_story_through_the_api_and_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    receiver = Receiver(per_event={"e1": [(503, {}), (400, {"X-Request-Id": "crm-req-9"})]})
    receiver.gate = asyncio.Event()  # the first attempt waits until the provider's retry has come in
    await receiver.start()
    cfg = write_config(tmp_path, story_config(receiver))
    cli = Cli(cfg, capsys)
    try:
        async with running(load_config(cfg)) as d, aiohttp.ClientSession() as s:
            assert (await post_signed(s, hook_url(d), {"type": "customer.updated", "n": 1}, "e1"))[0] == 200
            assert (await post_signed(s, hook_url(d), {"type": "customer.updated", "n": 1}, "e1"))[0] == 200  # dup
            assert (await post_signed(s, hook_url(d), {"type": "other"}, "e2"))[0] == 200
            receiver.gate.set()
            await wait_for(lambda: _dead_count(d, 1), timeout=10)
            status, dlq = await get(s, admin_url(d, "/api/dlq"))
            assert status == 200 and [x["event_id"] for x in dlq] == ["e1"]
            assert dlq[0]["updated_at"].endswith("Z") and "HTTP 400" in dlq[0]["last_error"]

            # Replay over HTTP; the delivery goes out and the story ends in "delivered".
            status, res = await post(s, admin_url(d, "/api/dlq/replay"), {"ids": [dlq[0]["id"]]})
            assert (status, res) == (200, {"replayed": 1, "superseded": []})
            await wait_for(lambda: [r.status for r in receiver.log if r.event["id"] == "e1"] == [503, 400, 200])
            await wait_for(lambda: _state(d, dlq[0]["id"], "done"))

            status, stories = await get(s, admin_url(d, "/api/events/e1"))
            assert status == 200 and len(stories) == 1
            story = stories[0]
            assert story["event"]["source"] == "demo" and story["event"]["id"] == "e1"
            actions = [h["action"] for h in story["history"]]
            assert actions == ["received", "routed", "deduplicated", "retry", "dead", "replayed", "delivered"]
            details = {h["action"]: h["detail"] for h in story["history"]}
            assert "HTTP 503" in details["retry"]
            assert "HTTP 400" in details["dead"] and "request id crm-req-9" in details["dead"]
            assert details["routed"] == "to sink crm"
            # Received with the source and the webhook request's id (answered as X-Request-Id), as stored;
            # the provider's retry came in another request, which the deduplicated line names.
            rid = story["event"]["request_id"]
            assert len(rid) == 32 and details["received"] == f"source=demo request_id={rid}"
            assert details["deduplicated"].startswith("received again (request ")
            assert rid not in details["deduplicated"]
            # By integrand's own number and by source:id, the same story.
            row = story["event"]["row"]
            assert (await get(s, admin_url(d, f"/api/events/{row}")))[1] == stories
            assert (await get(s, admin_url(d, "/api/events/demo:e1")))[1] == stories

            # The CLI tells the same story, one line per step.
            rc, out, _ = await cli("events", "show", "e1")
            assert rc == 0
            lines = out.splitlines()
            assert lines[0] == f"event {row}: demo:e1 (customer.updated)"
            steps = [ln.split()[2] for ln in lines[lines.index("  story:") + 1 :]]
            assert steps == actions
            [received] = [ln for ln in lines[lines.index("  story:") + 1 :] if ln.split()[2] == "received"]
            assert received.endswith(f"source=demo request_id={rid}")
            rc, out, _ = await cli("events", "show", "e1", "--json")  # for scripts: the API's answer
            assert rc == 0 and orjson.loads(out) == stories
            rc, out, _ = await cli("status", "--json")
            assert rc == 0 and orjson.loads(out)["daemon"] is True
            rc, out, _ = await cli("dlq", "list", "--json")
            assert (rc, orjson.loads(out)) == (0, [])
            rc, out, err = await cli("events", "show", "nope")
            assert (rc, out) == (1, "") and err.startswith("error: no event nope")

            rc, out, _ = await cli("events", "list", "--source", "demo", "--since", "1h")
            assert rc == 0 and [ln.split()[2] for ln in out.splitlines()[1:]] == ["e2", "e1"]
            rc, out, _ = await cli("events", "list", "--state", "dead")
            assert (rc, out.strip()) == (0, "no events match")
            rc, out, _ = await cli("events", "list", "--since", "1h", "--source", "other")
            assert out.strip() == "no events match"

            # Bad questions get precise answers.
            assert (await get(s, admin_url(d, "/api/events?since=soon")))[0] == 400
            assert (await get(s, admin_url(d, "/api/dlq/999999")))[0] == 404
            assert (await get(s, admin_url(d, "/api/events?limit=0")))[0] == 400
            async with s.post(admin_url(d, "/api/dlq/replay"), data="ids=1") as r:
                assert r.status == 415
            assert (await post(s, admin_url(d, "/api/dlq/replay"), {"ids": "all"}))[0] == 400
            assert (await post(s, admin_url(d, "/api/dlq/purge"), ["x"]))[0] == 400
            # DNS rebinding: a page whose own name now points at 127.0.0.1 is refused, whatever it asks.
            rebound = {"Host": "evil.example:8081"}
            assert (await post(s, admin_url(d, "/api/dlq/purge"), {"all": True}, headers=rebound))[0] == 403
            assert (await get(s, admin_url(d, "/api/dlq"), headers=rebound))[0] == 403
            assert (await get(s, admin_url(d, "/api/dlq"), headers={"Host": "localhost"}))[0] == 200
    finally:
        await receiver.stop()


async def _refused(s: aiohttp.ClientSession, d: Any) -> bool:
    return bool((await get(s, admin_url(d, "/api/rejections")))[1])


async def _dead_count(d: Any, n: int) -> bool:
    return len(await d.store.dead_letters()) == n


async def _state(d: Any, delivery: int, state: str) -> bool:
    detail = await d.store.delivery(delivery)
    return detail is not None and detail.state == state


async def test_sources_sinks_and_refused_webhooks(tmp_path: Path) -> None:
    api = FakeRest(seed=4, page_size=5)
    base = await api.start()
    receiver = Receiver()
    receiver.gate = asyncio.Event()  # deliveries wait at the sink: a backlog with an age
    await receiver.start()
    body = poll_config(base) + story_config(receiver).replace('to = ["crm"]', 'to = ["crm"]', 1)
    body = body.replace("[sinks.crm]", "[sinks.crmhttp]").replace('to = ["crm"]', 'to = ["crmhttp"]')
    cfg = write_config(tmp_path, body)
    try:
        async with running(load_config(cfg)) as d, aiohttp.ClientSession() as s:
            for i in range(3):
                await api.change(f"c{i}")
            await wait_for(lambda: d.pollers["crm"].last_ok_at is not None and d.pollers["crm"].polls >= 2)
            assert (await post_signed(s, hook_url(d), {"type": "t"}, "w1"))[0] == 200
            await wait_for(lambda: receiver.pending == 1)
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}", "X-Trace": "abc"}
            async with s.post(hook_url(d), data=b"{}", headers=headers) as r:
                assert r.status == 401

            status, sources = await get(s, admin_url(d, "/api/sources"))
            assert status == 200
            crm = next(x for x in sources if x["name"] == "crm")
            assert crm["polling"] is True and crm["connector"] == "http-poll"
            assert crm["last_poll"].endswith("Z") and crm["next_poll"].endswith("Z")
            assert 0 < crm["interval"] <= 0.3 and crm["target_latency"] == 0.1
            assert crm["cursor"] is not None and crm["poll_lag"] is not None
            demo = next(x for x in sources if x["name"] == "demo")
            assert demo["webhooks"] is True and demo["pending"] == 1 and demo["lag"] > 0

            status, sinks = await get(s, admin_url(d, "/api/sinks"))
            http = next(x for x in sinks if x["name"] == "crmhttp")
            assert http["breaker"]["status"] == "closed" and http["healthy"] is True
            assert http["backlog"] == 1 and http["oldest_pending_age"] > 0

            await wait_for(lambda: _refused(s, d))  # recorded without making the sender wait
            status, refused = await get(s, admin_url(d, "/api/rejections"))
            assert status == 200 and refused[0]["status"] == 401 and refused[0]["source"] == "demo"
            assert refused[0]["headers"]["Authorization"] == "***" and refused[0]["headers"]["X-Trace"] == "abc"
            async with s.get(admin_url(d, "/api/rejections")) as r:
                assert TOKEN not in await r.text()
            receiver.gate.set()
            await wait_for(lambda: receiver.pending == 0 and len(receiver.log) == 1)
    finally:
        receiver.gate.set()
        await receiver.stop()
        await api.close()


async def test_the_token_is_enforced_off_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTEGRAND_TEST_ADMIN_TOKEN", TOKEN)
    receiver = Receiver()
    await receiver.start()
    cfg = write_config(
        tmp_path,
        story_config(receiver),
        base="""
[daemon]
listen = "127.0.0.1:0"
state_dir = "var"

[admin]
listen = "0.0.0.0:0"
token = {env = "INTEGRAND_TEST_ADMIN_TOKEN"}
""",
    )
    try:
        async with running(load_config(cfg)) as d, aiohttp.ClientSession() as s:
            url = admin_url(d, "/api/status")
            async with s.get(url) as r:
                assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
            for wrong in ("Bearer nope", f"Bearer {TOKEN}x", TOKEN, f"Basic {TOKEN}"):
                async with s.get(url, headers={"Authorization": wrong}) as r:
                    assert r.status == 401, wrong
            for path in ("/metrics", "/api/dlq", "/api/events/x"):
                async with s.get(admin_url(d, path)) as r:
                    assert r.status == 401, path
            async with s.post(admin_url(d, "/api/dlq/replay"), json={"all": True}) as r:
                assert r.status == 401
            good = {"Authorization": f"Bearer {TOKEN}"}
            assert (await get(s, url, headers=good))[0] == 200
            assert (await post(s, admin_url(d, "/api/dlq/replay"), {"all": True}, headers=good)) == (
                200,
                {"replayed": 0, "superseded": []},
            )
            async with s.get(admin_url(d, "/api/state/sink:crm/tokens"), headers=good) as r:
                assert r.status == 403  # connector state (OAuth tokens) never over TCP, token or not
            async with s.get(admin_url(d, "/healthz")) as r:  # probes need no token
                assert r.status == 200
            # The page asks for the token; a right one becomes a same-site, HttpOnly cookie.
            async with s.get(admin_url(d, "/")) as r:
                assert r.status == 401 and "Admin token" in await r.text()
            async with s.post(admin_url(d, "/login"), data={"token": "wrong"}, allow_redirects=False) as r:
                assert r.status == 401
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:  # IP hosts
                async with browser.post(admin_url(d, "/login"), data={"token": TOKEN}, allow_redirects=False) as r:
                    assert r.status == 303
                    cookie = r.headers["Set-Cookie"]
                    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
                async with browser.get(admin_url(d, "/")) as r:
                    assert r.status == 200 and "Dead-letter queue" in await r.text()
            # The unix socket (mode 0600: only the service's user) needs no token.
            sock = aiohttp.UnixConnector(path=str(tmp_path / "var" / "admin.sock"))
            async with aiohttp.ClientSession(connector=sock) as local:
                assert (await get(local, "http://integrand/api/status"))[0] == 200
                # A connector's state, as `integrand auth` writes it beside the daemon.
                state = "http://integrand/api/state/sink:crm/tokens"
                async with local.put(state, json={"value": {"refresh": "r1"}}) as r:
                    assert r.status == 200
                assert (await get(local, state)) == (200, {"value": {"refresh": "r1"}})
                assert await d.store.state_get("sink:crm", "tokens") == {"refresh": "r1"}
                async with local.put("http://integrand/api/state/sink:nope/tokens", json={"value": 1}) as r:
                    assert r.status == 404
                async with local.put("http://integrand/api/state/connection:nope/tokens", json={"value": 1}) as r:
                    assert r.status == 404  # no source or sink is connected through [connections.nope]
                async with local.put(state, json={"other": 1}) as r:
                    assert r.status == 400
    finally:
        await receiver.stop()


async def test_metrics_types_and_values_move_as_events_flow(tmp_path: Path) -> None:
    receiver = Receiver()
    receiver.gate = asyncio.Event()
    await receiver.start()
    cfg = write_config(tmp_path, story_config(receiver))
    try:
        async with running(load_config(cfg)) as d, aiohttp.ClientSession() as s:

            async def scrape() -> dict[str, Any]:
                async with s.get(admin_url(d, "/metrics")) as r:
                    assert r.status == 200
                    text = await r.text()
                return {f.name: f for f in text_string_to_metric_families(text)}

            def value(fams: dict[str, Any], name: str, sample: str, **labels: str) -> float:
                for smp in fams[name].samples:
                    if smp.name == sample and all(smp.labels.get(k) == v for k, v in labels.items()):
                        return float(smp.value)
                raise AssertionError(f"no sample {sample} {labels}")

            before = await scrape()
            types = {n: f.type for n, f in before.items()}
            for name, kind in {
                "integrand_webhooks": "counter",
                "integrand_deliveries": "counter",
                "integrand_events_enqueued": "counter",
                "integrand_store_commits": "counter",
                "integrand_store_ops": "counter",
                "integrand_store_inline_checkpoints": "counter",
                "integrand_store_rejections_dropped": "counter",
                "integrand_store_pruned": "counter",
                "integrand_build_info": "gauge",  # the text format has no info type
                "process_resident_memory_bytes": "gauge",
                "process_cpu_seconds": "counter",
                "process_open_fds": "gauge",
                "integrand_sink_backlog": "gauge",
                "integrand_sink_oldest_pending_seconds": "gauge",
                "integrand_source_lag_seconds": "gauge",
                "integrand_breaker_open_seconds": "gauge",
                "integrand_dead_letters": "gauge",
                "integrand_deliveries_current": "gauge",
            }.items():
                assert types.get(name) == kind, (name, types.get(name))
            from integrand import __version__

            assert value(before, "integrand_build_info", "integrand_build_info", version=__version__) == 1
            assert value(before, "integrand_sink_backlog", "integrand_sink_backlog", sink="crm") == 0
            commits0 = value(before, "integrand_store_commits", "integrand_store_commits_total")

            for i in range(3):
                assert (await post_signed(s, hook_url(d), {"type": "t"}, f"m{i}"))[0] == 200
            await wait_for(lambda: receiver.pending >= 1)
            held = await scrape()
            assert value(held, "integrand_webhooks", "integrand_webhooks_total", source="demo", status="200") == 3
            assert value(held, "integrand_sink_backlog", "integrand_sink_backlog", sink="crm") == 3
            age = value(
                held, "integrand_sink_oldest_pending_seconds", "integrand_sink_oldest_pending_seconds", sink="crm"
            )
            assert age > 0
            assert value(held, "integrand_source_lag_seconds", "integrand_source_lag_seconds", source="demo") > 0
            assert value(held, "integrand_store_commits", "integrand_store_commits_total") > commits0
            t0 = time.monotonic()
            await wait_for(lambda: time.monotonic() - t0 > 0.05)
            later = await scrape()
            assert (
                value(
                    later, "integrand_sink_oldest_pending_seconds", "integrand_sink_oldest_pending_seconds", sink="crm"
                )
                > age
            )

            receiver.gate.set()
            await wait_for(lambda: len(receiver.log) == 3)

            async def drained() -> bool:
                f = await scrape()
                return value(f, "integrand_sink_backlog", "integrand_sink_backlog", sink="crm") == 0

            await wait_for(drained)
            after = await scrape()
            assert value(after, "integrand_deliveries", "integrand_deliveries_total", sink="crm", outcome="done") == 3
            assert (
                value(
                    after, "integrand_sink_oldest_pending_seconds", "integrand_sink_oldest_pending_seconds", sink="crm"
                )
                == 0
            )
            assert (
                value(after, "integrand_deliveries_current", "integrand_deliveries_current", sink="crm", state="done")
                == 3
            )

            # Retention deletes the three delivered events: counted by kind.
            assert value(after, "integrand_store_pruned", "integrand_store_pruned_total", kind="events") == 0
            while await d.store.prune(time.time() + 1) > 0:
                pass
            pruned = await scrape()
            assert value(pruned, "integrand_store_pruned", "integrand_store_pruned_total", kind="events") == 3
            assert value(pruned, "integrand_store_pruned", "integrand_store_pruned_total", kind="tombstones") == 0
            # A flood of refusals faster than the writer: what its buffer cannot hold is dropped, and counted.
            dropped = "integrand_store_rejections_dropped"
            assert value(pruned, dropped, dropped + "_total") == 0
            for i in range(REJECTIONS_BUFFERED + 25):  # no await: the writer cannot flush meanwhile
                d.store.record_rejection("demo", 401, f"bad signature {i}", "127.0.0.1", {}, 10)
            assert value(await scrape(), dropped, dropped + "_total") == 25
    finally:
        receiver.gate.set()
        await receiver.stop()


async def test_cursor_set_waits_for_a_poll_in_flight(tmp_path: Path) -> None:
    """A poll that started from the old cursor must not commit its own over the one an operator just set."""
    api = FakeRest(seed=6, page_size=50)
    base = await api.start()
    entered, release = asyncio.Event(), asyncio.Event()
    plain = api.list_records

    async def held(request: Any) -> Any:
        entered.set()
        await release.wait()
        return await plain(request)

    cfg = write_config(tmp_path, poll_config(base))
    try:
        for i in range(3):
            await api.change(f"c{i}")
        async with running(load_config(cfg)) as d, aiohttp.ClientSession() as s:
            poller = d.pollers["crm"]
            await wait_for(lambda: poller.polls >= 1)
            api.list_records = held  # type: ignore[method-assign]
            await wait_for(entered.is_set)  # a poll is in flight, holding the old cursor
            url = admin_url(d, "/api/cursors/crm")
            later = {"since": "2030-01-01T00:00:00.000000Z", "page": None, "high": None}  # http-poll's cursor shape
            put = asyncio.create_task(s.put(url, json={"value": later}))
            await wait_for(lambda: poller.cursor_lock.locked() and len(poller.cursor_lock._waiters or ()) == 1)
            assert not put.done()  # it waits for the poll
            api.list_records = plain  # type: ignore[method-assign]
            release.set()
            resp = await put
            assert resp.status == 200
            body = await resp.json()
            assert body["new"] == later and body["old"] is not None and body["old"] != later
            resp.release()
            n = poller.polls
            await wait_for(lambda: poller.polls >= n + 2)  # later polls start from the cursor set
            assert (await d.store.cursor_get("crm"))["since"] >= later["since"]
    finally:
        release.set()
        await api.close()
