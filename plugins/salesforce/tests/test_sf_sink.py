"""The sink: sObject Collections with per-record outcomes, single upserts (201/200/300), deletes, the daily limit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from sf_support import sf_env

from integrand.connector import Event, PermanentError, RetryableError


def ev(n: int, **data: Any) -> Event:
    return Event(id=f"e{n}", source="crm", type="customer.updated", data=data)


async def test_a_collection_upsert_with_mixed_results_decides_each_record(tmp_path: Path) -> None:
    async with sf_env(tmp_path) as env:
        env.fake.create("Account", Name="Old", ExtId__c="A-2")
        env.fake.record_rules.append(
            lambda t, r: (
                ("REQUIRED_FIELD_MISSING", "Required fields are missing: [Name]") if not r.get("Name") else None
            )
        )
        env.fake.record_rules.append(
            lambda t, r: (
                ("UNABLE_TO_LOCK_ROW", "unable to obtain exclusive access to this record")
                if r.get("Name") == "Locked"
                else None
            )
        )
        sink = await env.connector("dst", role="sink", object="Account", external_id_field="ExtId__c")
        results = await sink.deliver_batch(
            [
                ev(1, ExtId__c="A-1", Name="New"),
                ev(2, ExtId__c="A-2", Name="Updated"),
                ev(3, ExtId__c="A-3", Name=""),
                ev(4, ExtId__c="A-4", Name="Locked"),
            ]
        )
        assert results[0] is None and results[1] is None
        assert isinstance(results[2], PermanentError) and "REQUIRED_FIELD_MISSING" in str(results[2])
        assert isinstance(results[3], RetryableError) and "UNABLE_TO_LOCK_ROW" in str(results[3])
        assert [r["Name"] for r in env.fake.find("Account", "ExtId__c", "A-1")] == ["New"]
        assert [r["Name"] for r in env.fake.find("Account", "ExtId__c", "A-2")] == ["Updated"]
        assert env.fake.find("Account", "ExtId__c", "A-3") == []
        patches = [p for m, p in env.fake.requests if m == "PATCH"]
        assert patches == ["/services/data/v62.0/composite/sobjects/Account/ExtId__c"], "one call for the batch"


async def test_collections_hold_at_most_200_records_and_never_repeat_an_external_id(tmp_path: Path) -> None:
    async with sf_env(tmp_path) as env:
        sink = await env.connector("dst", role="sink", object="Account", external_id_field="ExtId__c")
        batch = [ev(i, ExtId__c=f"X-{i}", Name=f"N{i}") for i in range(450)]
        batch += [ev(999, ExtId__c="X-449", Name="second version")]
        results = await sink.deliver_batch(batch)
        assert results == [None] * 451
        patches = [p for m, p in env.fake.requests if m == "PATCH"]
        assert len(patches) == 4  # 200 + 200 + 50, then X-449's second version in a call of its own, after
        assert env.fake.find("Account", "ExtId__c", "X-449")[0]["Name"] == "second version"


async def test_single_upsert_created_updated_and_several_matches(tmp_path: Path) -> None:
    async with sf_env(tmp_path) as env:
        sink = await env.connector("dst", role="sink", object="Contact", external_id_field="Email__c")
        await sink.deliver(ev(1, Email__c="a@x.com", LastName="A"))
        await sink.deliver(ev(2, Email__c="a@x.com", LastName="B"))
        [rec] = env.fake.find("Contact", "Email__c", "a@x.com")
        assert rec["LastName"] == "B"
        twin1 = env.fake.create("Contact", Email__c="dup@x.com", LastName="1")
        twin2 = env.fake.create("Contact", Email__c="dup@x.com", LastName="2")
        with pytest.raises(PermanentError) as e:
            await sink.deliver(ev(3, Email__c="dup@x.com", LastName="C"))
        assert twin1["Id"] in str(e.value) and twin2["Id"] in str(e.value) and "nothing was changed" in str(e.value)
        assert {r["LastName"] for r in env.fake.find("Contact", "Email__c", "dup@x.com")} == {"1", "2"}
        with pytest.raises(PermanentError, match="has no Email__c"):
            await sink.deliver(ev(4, LastName="no key"))


async def test_deletes_by_external_id_are_idempotent(tmp_path: Path) -> None:
    async with sf_env(tmp_path) as env:
        env.fake.create("Account", Name="Doomed", ExtId__c="D-1")
        sink = await env.connector("dst", role="sink", object="Account", external_id_field="ExtId__c")
        gone = Event(id="d1", source="crm", type="customer.deleted", data={"ExtId__c": "D-1"})
        assert await sink.deliver_batch([gone]) == [None]
        assert env.fake.find("Account", "ExtId__c", "D-1") == []
        assert await sink.deliver_batch([gone]) == [None], "already gone is done"


async def test_the_daily_limit_is_a_wait_for_the_whole_org_not_an_auth_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with sf_env(tmp_path, api_limit=3) as env:
        # Limits are the org's: every connector of the org states the same wait (the first one started sets it).
        src = await env.connector("src", objects=["Account"], daily_limit_wait="2h")
        sink = await env.connector(
            "dst", role="sink", object="Account", external_id_field="ExtId__c", daily_limit_wait="2h"
        )
        caplog.set_level(logging.WARNING)
        for i in range(3):
            await sink.deliver(ev(i, ExtId__c=f"L-{i}", Name="n"))
        with pytest.raises(RetryableError) as e:
            await sink.deliver(ev(9, ExtId__c="L-9", Name="n"))
        assert e.value.retry_after == 7200
        assert "REQUEST_LIMIT_EXCEEDED" in str(e.value)
        assert "daily API request limit reached (api-usage 3/3)" in caplog.text
        seen = len(env.fake.requests)
        # The poller of the same org waits too, without spending a request on a known answer.
        with pytest.raises(RetryableError, match="daily API request limit reached"):
            await src.poll(None)
        [batch] = [await sink.deliver_batch([ev(10, ExtId__c="L-10", Name="n")])]
        assert isinstance(batch[0], RetryableError)
        assert len(env.fake.requests) == seen
        assert caplog.text.count("daily API request limit reached") == 1, "reported once per pause"


async def test_the_daily_limit_pause_survives_a_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from integrand_salesforce import auth, client

    async with sf_env(tmp_path, api_limit=2) as env:
        sink = await env.connector("dst", role="sink", object="Account", external_id_field="ExtId__c")
        for i in range(2):
            await sink.deliver(ev(i, ExtId__c=f"R-{i}", Name="n"))
        with pytest.raises(RetryableError):
            await sink.deliver(ev(5, ExtId__c="R-5", Name="n"))
        stored = await env.store.state_get("sink:dst", client.PAUSE_KEY)
        assert stored["until"] == pytest.approx(env.fake.clock() + 3600, abs=5)
        # A restart: a new process has neither the shared client nor the session; the store is reopened.
        await env.store.close()
        client._CLIENTS.clear()
        auth._MANAGERS.clear()
        await env.store.open()
        env.fake.api_usage = 0  # even if the allocation came back early, the stored pause is honoured
        caplog.set_level(logging.WARNING)
        seen = len(env.fake.requests)
        sink = await env.connector("dst", role="sink", object="Account", external_id_field="ExtId__c")
        with pytest.raises(RetryableError, match="daily API request limit reached") as e:
            await sink.deliver(ev(6, ExtId__c="R-6", Name="n"))
        assert e.value.retry_after is not None and 3500 < e.value.retry_after <= 3600
        assert len(env.fake.requests) == seen, "no request spent on an allocation known to be gone"
        assert "before the restart" in caplog.text
        # Once the stored time has passed, requests go out again.
        await env.store.state_set("sink:dst", client.PAUSE_KEY, {"until": env.fake.clock() - 1, "reason": "x"})
        client._CLIENTS.clear()
        auth._MANAGERS.clear()
        sink = await env.connector("dst", role="sink", object="Account", external_id_field="ExtId__c")
        await sink.deliver(ev(7, ExtId__c="R-7", Name="n"))
        assert env.fake.find("Account", "ExtId__c", "R-7")


async def test_the_concurrent_long_request_limit_is_a_short_wait(tmp_path: Path) -> None:
    async with sf_env(tmp_path) as env:
        sink = await env.connector("dst", role="sink", object="Account", external_id_field="ExtId__c")
        env.fake.fail(
            403, body=[{"message": "ConcurrentPerOrgLongTxn Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
        )
        with pytest.raises(RetryableError) as e:
            await sink.deliver(ev(1, ExtId__c="C-1", Name="n"))
        assert e.value.retry_after == 20
        await sink.deliver(ev(1, ExtId__c="C-1", Name="n"))  # no org-wide pause: the next call goes out


async def test_requests_in_flight_stay_under_the_cap(tmp_path: Path) -> None:
    import asyncio

    async with sf_env(tmp_path) as env:
        env.fake.latency = 0.05
        sink = await env.connector("dst", role="sink", object="Account", external_id_field="ExtId__c", max_concurrent=3)
        await asyncio.gather(*(sink.deliver(ev(i, ExtId__c=f"P-{i}", Name="n")) for i in range(12)))
        assert env.fake.max_in_flight == 3
