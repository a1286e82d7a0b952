"""Through the running daemon: SOQL polling with deletes into one org, collection upserts with mixed results into another."""

from __future__ import annotations

from pathlib import Path

import orjson
from integrand_salesforce.testing import fake_salesforce

from integrand.testing import daemon_config, running_daemon, wait_for


async def test_poll_into_a_collection_sink_with_per_record_outcomes(tmp_path: Path) -> None:
    async with fake_salesforce() as src, fake_salesforce(org_id="00D5g000004OTHERAA") as dst:
        dst.fake.record_rules.append(
            lambda t, r: (
                ("FIELD_CUSTOM_VALIDATION_EXCEPTION", "Name may not be Bad") if r.get("Name") == "Bad" else None
            )
        )
        cfg = daemon_config(
            tmp_path,
            f"""
[sources.sf]
{src.toml(objects=["Account"], initial_lookback="1m", fields={"Account": ["Name", "AccountNumber"]})}

[sources.sf.poll]
min_interval = "100ms"
max_interval = "500ms"
target_latency = "500ms"

[sinks.copy]
{dst.toml(object="Account", external_id_field="Source_Id__c")}

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[[routes]]
from = "sf"
to = ["out"]

[[routes]]
from = "sf"
to = ["copy"]

[routes.map]
Source_Id__c = {{ path = "entity_id", required = true }}
Name = "data.Name"
""",
        )
        out = tmp_path / "var" / "out.jsonl"

        def seen() -> list[dict[str, object]]:
            return [orjson.loads(x) for x in out.read_bytes().splitlines()] if out.exists() else []

        async with running_daemon(cfg) as d:
            good = [src.fake.create("Account", Name=f"Good {i}", AccountNumber=str(i)) for i in range(5)]
            bad = src.fake.create("Account", Name="Bad")
            await wait_for(lambda: len(dst.fake.records.get("Account", {})) == 5, timeout=20)
            await wait_for(lambda: len(seen()) == 6, timeout=20)
            src.fake.delete("Account", good[0]["Id"])
            await wait_for(lambda: any(e["type"] == "account.deleted" for e in seen()), timeout=20)
            await wait_for(lambda: len(dst.fake.records.get("Account", {})) == 4, timeout=20)

            async def dead() -> bool:
                return len(await d.store.dead_letters("copy")) == 1

            await wait_for(dead, timeout=20)
            [letter] = await d.store.dead_letters("copy")
            assert "FIELD_CUSTOM_VALIDATION_EXCEPTION: Name may not be Bad" in letter.last_error
            assert bad["Id"] in letter.last_error
            assert letter.attempts <= 1, "a validation refusal is not retried"
        copied = {r["Source_Id__c"] for r in dst.fake.records["Account"].values()}
        assert copied == {g["Id"] for g in good[1:]}
        patches = [p for m, p in dst.fake.requests if m == "PATCH" and "/composite/sobjects/" in p]
        assert patches, "the sink wrote through sObject Collections"
