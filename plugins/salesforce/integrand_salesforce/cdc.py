"""Change Data Capture events: Avro payloads decoded with their schema, ``ChangeEventHeader`` made into Events.

A change event is Avro, written with the schema ``GetSchema(schema_id)`` returns (cached per id, as
schema ids are fingerprints). Its ``ChangeEventHeader`` says what changed: ``entityName``,
``recordIds`` (several records changed the same way in one transaction share one event: they become
one integrand event each), ``changeType`` (``CREATE``/``UPDATE``/``DELETE``/``UNDELETE`` and the gap
events ``GAP_*``, whose data must be fetched, plus ``GAP_OVERFLOW``), ``changedFields`` /
``nulledFields`` / ``diffFields`` as bitmaps of field positions in the schema, ``changeOrigin``
(``…;client=<id>`` of the API client that wrote), ``commitTimestamp`` (ms), ``commitNumber``,
``transactionKey`` and ``sequenceNumber`` (order within a transaction). (Reference: third-party-apis.md,
Salesforce "Change Data Capture"; Salesforce "Change Data Capture Developer Guide": Change Event
Header Fields, and "Event Deserialization Considerations" for the bitmap fields.)

fastavro decodes (``schemaless_reader``): the maintained C-accelerated Avro implementation.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fastavro

GAP_TYPES = frozenset({"GAP_CREATE", "GAP_UPDATE", "GAP_DELETE", "GAP_UNDELETE"})
VERBS = {"CREATE": "created", "UPDATE": "updated", "DELETE": "deleted", "UNDELETE": "undeleted"}


def b64(replay_id: bytes) -> str:
    """A replay id as the JSON position integrand stores (opaque bytes, never computed on)."""
    return base64.b64encode(replay_id).decode()


def unb64(position: str) -> bytes:
    return base64.b64decode(position.encode(), validate=True)


class Schema:
    """One parsed Avro schema and its top-level field names (the bitmaps index them)."""

    def __init__(self, schema_json: str):
        import orjson

        raw = orjson.loads(schema_json)
        self.parsed = fastavro.parse_schema(raw)
        self.fields = [str(f["name"]) for f in raw.get("fields", [])]

    def decode(self, payload: bytes) -> dict[str, Any]:
        record = fastavro.schemaless_reader(io.BytesIO(payload), self.parsed)
        if not isinstance(record, dict):
            raise ValueError("a change event payload must decode to a record")
        return record

    def names(self, bitmaps: list[str]) -> list[str]:
        """Field names from ``changedFields``-style bitmaps: hex strings whose bit *i* is field *i*.

        Entries like ``"3-0x01"`` address the sub-fields of a compound field (a Name or an Address):
        they name the compound field by its top-level position.
        """
        out: list[str] = []
        for entry in bitmaps:
            if "-" in entry:
                parent = int(entry.split("-", 1)[0])
                if 0 <= parent < len(self.fields) and self.fields[parent] not in out:
                    out.append(self.fields[parent])
                continue
            bits = int(entry, 16)
            i = 0
            while bits:
                if bits & 1 and i < len(self.fields) and self.fields[i] not in out:
                    out.append(self.fields[i])
                bits >>= 1
                i += 1
        return out


def bitmap(fields: list[str], names: list[str]) -> list[str]:
    """The inverse of ``Schema.names`` for top-level fields (the fake writes its events with it)."""
    bits = 0
    for n in names:
        if n in fields:
            bits |= 1 << fields.index(n)
    return [hex(bits)] if bits else []


@dataclass(frozen=True)
class Change:
    """One record's part of a change event."""

    entity: str
    record_id: str
    change_type: str
    data: dict[str, Any]
    header: dict[str, Any]
    changed: list[str]

    @property
    def gap(self) -> bool:
        return self.change_type in GAP_TYPES

    @property
    def verb(self) -> str:
        return VERBS.get(self.change_type.removeprefix("GAP_"), self.change_type.lower())

    @property
    def version(self) -> str:
        """commitTimestamp (ms) as sortable UTC ISO-8601: the entity version integrand compares."""
        ms = int(self.header.get("commitTimestamp") or 0)
        dt = datetime.fromtimestamp(ms / 1000, UTC)
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def changes(schema: Schema, record: dict[str, Any]) -> list[Change]:
    """One Change per record id of the event; the data holds the changed fields (nulled ones as None)."""
    header = dict(record.get("ChangeEventHeader") or {})
    entity = str(header.get("entityName", ""))
    ctype = str(header.get("changeType", ""))
    changed = schema.names(list(header.get("changedFields") or []))
    nulled = schema.names(list(header.get("nulledFields") or []))
    body = {k: v for k, v in record.items() if k != "ChangeEventHeader" and v is not None}
    if ctype in ("UPDATE", "GAP_UPDATE") and changed:
        body = {k: v for k, v in body.items() if k in changed}
    for name in nulled:
        body[name] = None
    return [
        Change(entity, str(rid), ctype, {**body, "Id": str(rid)}, header, changed)
        for rid in header.get("recordIds") or []
    ]
