"""The ledger: THE rule for which change to an entity is newer, what a delete is, and what the store
last saw of each entity. The queue (the stale guard), replay and reconciliation all use it.

Versions are compared in their canonical form (``events.canonical_version``: a number, or a UTC time
with microseconds); two versions of different forms are a ``VersionError``, never misordered.
"""

from __future__ import annotations

import hashlib

import orjson

from ..events import Event, canonical_version, version_newer
from .engine import Conn, ReadConn
from .records import EntityVersion


def judge(known: EntityVersion | None, version: str | None, h: str, deleted: bool) -> tuple[bool, str | None]:
    """THE rule for a change to an entity: (is it stale, the version to record for the entity).

    Stale: an older version than the last seen; the same version with the same content (a repeat:
    look-back overlap, a webhook then a poll); the same version as a delete but not itself a delete
    (at one version, the delete wins). A change without a version is never stale (it cannot be
    judged) and keeps the entity's last version as the floor, so a delete without one (a
    reconciliation's, most webhooks') does not switch the guard off for a late older change.
    ``VersionError`` if the forms differ (a number after a time, or the reverse)."""
    if known is None:
        return False, version
    if version is None:
        return False, known.version
    if known.version is None:
        return False, version
    if version_newer(known.version, version):
        return True, known.version
    if canonical_version(known.version) == version:
        return known.hash == h or (known.deleted and not deleted), version
    return False, version


def is_delete(ev: Event) -> bool:
    """Whether an event reports that its entity was deleted (type ``….deleted`` or ``meta.deleted``)."""
    return bool(ev.meta.get("deleted")) or ev.type.rsplit(".", 1)[-1] in ("deleted", "delete", "removed")


def superseded(known: EntityVersion | None, ev: Event) -> bool:
    """Whether a stored change has since been overtaken by a newer version of its entity (replay's
    question); a change without a version, or whose entity has none, never is. ``VersionError`` if
    the forms differ."""
    if known is None or known.version is None or ev.version is None:
        return False
    return version_newer(known.version, ev.version)


def data_hash(ev: Event) -> str:
    """A content hash of an event's data (plus its deletedness) to tell a repeat from a change."""
    return hashlib.sha256(
        orjson.dumps(ev.data, option=orjson.OPT_SORT_KEYS) + (b"D" if is_delete(ev) else b"")
    ).hexdigest()[:32]


async def read_entities(
    conn: Conn | ReadConn, keys: set[tuple[str, str, str]]
) -> dict[tuple[str, str, str], EntityVersion]:
    out: dict[tuple[str, str, str], EntityVersion] = {}
    by_group: dict[tuple[str, str], list[str]] = {}
    for source, entity, eid in keys:
        by_group.setdefault((source, entity), []).append(eid)
    for (source, entity), ids in by_group.items():
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            sql = (
                "SELECT entity_id, version, hash, deleted, event_id, seen_at FROM entity_versions "  # noqa: S608
                f"WHERE source = ? AND entity = ? AND entity_id IN ({','.join('?' * len(chunk))})"
            )
            async with conn.execute(sql, (source, entity, *chunk)) as cur:
                for r in await cur.fetchall():
                    out[(source, entity, r[0])] = EntityVersion(r[1], r[2], bool(r[3]), r[4], r[5])
    return out
