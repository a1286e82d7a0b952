"""Change Data Capture over the (fake) Pub/Sub API: Avro with GetSchema, flow control, headers, gaps, loop guard."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from integrand_salesforce.cdc import Schema, bitmap
from integrand_salesforce.config import SalesforceConfig
from integrand_salesforce.fake_pubsub import change_event_schema
from integrand_salesforce.streaming import SalesforceCDC
from integrand_salesforce.testing import RunningFake, fake_salesforce

from integrand.app import ScopedState
from integrand.connector import ConnectorContext, Event, HttpPool, PositionLost, StreamBatch
from integrand.store import Store

FIELDS = ["Name", "Phone", "Source_Id__c", "LastModifiedDate"]


@asynccontextmanager
async def cdc(tmp_path: Path, **extra: Any) -> AsyncIterator[tuple[RunningFake, SalesforceCDC]]:
    async with fake_salesforce(pubsub=True, keepalive=0.2) as sf:
        assert sf.pubsub is not None
        sf.pubsub.enable("Account", FIELDS)
        sf.pubsub.enable("Contact", ["LastName", "Email"])
        store = Store(tmp_path / "s.db")
        await store.open()
        pool = HttpPool(timeout=10)
        await pool.start()
        cfg = SalesforceConfig.model_validate(sf.cdc_table(objects=["Account"], **extra))
        ctx = ConnectorContext(
            name="cdc", role="source", base_dir=tmp_path, state=ScopedState(store, "source:cdc"),
            http=pool.for_connector(logging.getLogger("t")),
        )  # fmt: skip
        conn = SalesforceCDC(cfg, ctx)
        await conn.start()
        try:
            yield sf, conn
        finally:
            await conn.close()
            await pool.close()
            await store.close()


async def take(stream: AsyncGenerator[StreamBatch, None], conn: SalesforceCDC, n: int) -> list[Event]:
    """Events from the stream (acking each batch, as integrand does after its commit) until ``n`` arrived."""
    out: list[Event] = []
    async for batch in stream:
        out += batch.events
        await conn.ack(batch)
        if len(out) >= n:
            return out
    raise AssertionError("stream ended")


def gen(it: AsyncIterator[StreamBatch]) -> AsyncGenerator[StreamBatch, None]:
    """``stream()`` is an async generator (it can be closed); typed as the AsyncIterator the interface names."""
    assert isinstance(it, AsyncGenerator)
    return it


def test_bitmaps_name_fields_by_their_schema_position() -> None:
    schema = Schema(__import__("orjson").dumps(change_event_schema("Account", FIELDS)).decode())
    assert schema.fields[0] == "ChangeEventHeader"
    assert schema.names(bitmap(schema.fields, ["Phone", "LastModifiedDate"])) == ["Phone", "LastModifiedDate"]
    assert schema.names(["0x6"]) == ["Name", "Phone"]
    assert schema.names(["2-0x01"]) == ["Phone"], "a compound field's sub-bitmap names the compound field"


async def test_changes_stream_with_headers_one_event_per_record_and_flow_control(tmp_path: Path) -> None:
    async with cdc(tmp_path, cdc_batch=50) as (sf, conn):
        stream = gen(conn.stream(None))  # LATEST: what happens from now on
        first = stream.__anext__()
        import asyncio

        task = asyncio.ensure_future(first)
        await asyncio.sleep(0.3)  # the subscription is open (a keepalive may come first)
        a = sf.fake.create("Account", Name="Acme", Phone="1")
        b = sf.fake.create("Account", Name="Beta")
        sf.fake.update("Account", a["Id"], Phone="2")
        assert sf.pubsub is not None
        sf.pubsub.publish("Account", [a["Id"], b["Id"]], "UPDATE", {"Name": "Same"}, ["Name"], transaction="tx1")
        batch = await task
        events = list(batch.events)
        await conn.ack(batch)
        events += await take(stream, conn, 5 - len(events))
        assert [(e.type, e.entity_id) for e in events] == [
            ("account.created", a["Id"]),
            ("account.created", b["Id"]),
            ("account.updated", a["Id"]),
            ("account.updated", a["Id"]),
            ("account.updated", b["Id"]),
        ]
        now = sf.fake.get("Account", a["Id"]) or {}
        assert events[2].data == {"Id": a["Id"], "Phone": "2", "LastModifiedDate": now["LastModifiedDate"]}
        assert events[3].meta["transaction_key"] == events[4].meta["transaction_key"] == "tx1"
        assert events[3].id != events[4].id, "several recordIds: several events, each its own id"
        assert events[0].version is not None and events[2].version is not None
        assert events[0].version <= events[2].version
        assert max(sf.pubsub.requested) <= 100 and sf.pubsub.requested[0] == 50
        await stream.aclose()


async def test_integrands_own_writes_are_not_echoed_and_gap_events_are_fetched(tmp_path: Path) -> None:
    import asyncio

    async with cdc(tmp_path, external_id_field="Source_Id__c") as (sf, conn):
        assert sf.pubsub is not None
        rec = sf.fake.create("Account", Name="Original", Phone="9")
        stream = gen(conn.stream({"preset": "earliest"}))
        [created] = await take(stream, conn, 1)
        assert created.data["Name"] == "Original"
        # integrand's sink writes through REST with Sforce-Call-Options client=integrand: not echoed.
        sink = conn
        await sink.deliver(
            Event(id="w1", source="crm", type="x", data={"Source_Id__c": "S-1", "Name": "From CRM"}, entity="Account")
        )
        sf.fake.records["Account"][rec["Id"]]["Name"] = "Changed quietly"  # the gap event's record as it is now
        sf.pubsub.publish_gap("Account", [rec["Id"]], "GAP_UPDATE")
        [gap] = await take(stream, conn, 1)
        assert conn.echoes_skipped == 1
        assert gap.entity_id == rec["Id"] and gap.meta["gap"] is True
        assert gap.data["Name"] == "Changed quietly", "a gap event is completed by fetching the record"
        sf.pubsub.publish_gap("Account", ["001NOTFETCHED0000"], "GAP_DELETE")
        [gone] = await take(stream, conn, 1)
        assert gone.type == "account.deleted" and gone.meta["deleted"] is True
        await stream.aclose()
        await asyncio.sleep(0)


async def test_an_expired_or_corrupted_replay_id_is_position_lost_and_resync_reads_everything(tmp_path: Path) -> None:
    async with cdc(tmp_path) as (sf, conn):
        assert sf.pubsub is not None
        for i in range(3):
            sf.fake.create("Account", Name=f"A{i}")
        stream = gen(conn.stream({"preset": "earliest"}))
        got = await take(stream, conn, 3)
        position = {"replay_id": got and (await _position(conn, stream))}
        await stream.aclose()
        sf.pubsub.expire_events()
        with pytest.raises(PositionLost) as lost:
            await conn.stream(position).__anext__()
        assert "replayid.corrupted" in str(lost.value)
        with pytest.raises(PositionLost):
            await conn.stream({"replay_id": "bm90IGEgcmVwbGF5IGlk"}).__anext__()
        batches = [b async for b in conn.resync(lost.value)]
        names = sorted(e.data["Name"] for b in batches for e in b.events)
        assert names == ["A0", "A1", "A2"]
        assert batches[-1].position == {"preset": "earliest"}


async def _position(conn: SalesforceCDC, stream: AsyncGenerator[StreamBatch, None]) -> str:
    """The next keepalive's position (the stream is idle after what was taken)."""
    batch = await stream.__anext__()
    assert not batch.events
    return str(batch.position["replay_id"])
