"""The queue: enqueue (with dedup and the stale guard), lease with a fencing token, complete, reclaim, cursors.

Per-entity order: a (sink, entity key) line has one *head* (``deliveries.head = 1``), its oldest
active delivery or the one in flight; only heads are leased, and the next one becomes head when a
head is done or dead. Which change is stale, and what a delete is, is the ledger's rule.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import orjson

from ..events import Event, VersionError, canonical_version, version_key
from .engine import Conn, Engine, GroupedOp, _chunks
from .ledger import data_hash, is_delete, judge, read_entities
from .records import CursorRow, EnqueueResult, EntityVersion, Leased, Outcome, UnstorableEvent

log = logging.getLogger("integrand.store")


class _Prepared(NamedTuple):
    """An event with its version made canonical before it is queued (a bad version fails its caller at once)."""

    event: Event
    sinks: Sequence[str]
    version: str | None  # canonical (events.canonical_version), for events with an entity only


def _prepare(items: Sequence[tuple[Event, Sequence[str]]]) -> list[_Prepared]:
    out = []
    for ev, sinks in items:
        version = None
        for text in (ev.id, ev.source, ev.type, ev.entity, ev.entity_id, ev.version):
            # The columns SQLite binds must be UTF-8 (a header's undecodable bytes arrive as surrogates).
            if text is not None and not text.isascii():
                try:
                    text.encode()
                except UnicodeEncodeError as e:
                    raise UnstorableEvent(
                        f"event {ev.id!r} of source {ev.source!r} cannot be stored: a field is not valid UTF-8 ({e})"
                    ) from e
        if ev.entity_id is not None and ev.version is not None:
            try:
                version = canonical_version(ev.version)
            except VersionError as e:
                raise UnstorableEvent(f"event {ev.id!r} of source {ev.source!r} cannot be stored: {e}") from e
        out.append(_Prepared(ev, sinks, version))
    return out


def _serialised(ev: Event) -> tuple[bytes, str | None]:
    """The event's JSON and (with an entity) its content hash, or UnstorableEvent naming it.

    Done by the writer, between commits: on the caller's side it would run while a COMMIT is on
    the store's thread and compete with it for the GIL. A failure here fails the merged enqueues,
    which are then applied one savepoint each, so only this event's caller gets the error."""
    try:
        return ev.to_json(), (data_hash(ev) if ev.entity_id is not None else None)
    except TypeError as e:  # orjson.JSONEncodeError is a TypeError
        raise UnstorableEvent(
            f"event {ev.id!r} of source {ev.source!r} cannot be stored: it is not JSON-serialisable ({e})"
        ) from e


class _EnqueueOp(GroupedOp):
    """Enqueues are grouped: a commit's enqueues share one dedup query and a few multi-row inserts."""

    __slots__ = ("_queue", "cursor", "items", "new", "request_id")

    def __init__(
        self,
        queue: Queue,
        items: Sequence[_Prepared],
        cursor: tuple[str, str, bytes] | None = None,
        request_id: str | None = None,
    ):
        future: asyncio.Future[EnqueueResult] = asyncio.get_running_loop().create_future()
        super().__init__(queue._apply_enqueues, max(1, len(items)), future)
        self.items = items
        self.cursor = cursor
        self.request_id = request_id  # the webhook request these events arrived in (their story shows it)
        self.new = False  # whether it stored deliveries (set by the group's function)
        self._queue = queue

    def committed(self, _result: Any) -> None:
        if self.new:
            self._queue.deliveries_ready.set()


_CURSOR_UPSERT = (
    "INSERT INTO cursors (source, kind, value, updated_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (source, kind) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
)


class Queue(Engine):
    """The queue's operations, on the engine's writer."""

    def _init_queue(self) -> None:
        self._leases = itertools.count(1)  # with ``owner``, a fencing token unique to each lease

    async def _opened_as_daemon(self, conn: Conn) -> int:
        """The run before this one is dead (the lock says so): its leases are released."""
        return await self._release_leases(conn, owner=None)

    async def _apply_enqueues(self, conn: Conn, ops: list[_EnqueueOp]) -> list[EnqueueResult]:
        by_source: dict[str, set[str]] = {}
        for op in ops:
            op.new = False
            for it in op.items:
                by_source.setdefault(it.event.source, set()).add(it.event.id)
        seen: set[tuple[str, str]] = set()
        stored: dict[tuple[str, str], int] = {}  # already in the store: (source, event id) -> row
        for source, ids in by_source.items():
            id_list = list(ids)
            for i in range(0, len(id_list), 500):
                chunk = id_list[i : i + 500]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT id, event_id FROM events WHERE source = ? AND event_id IN ({marks})"  # noqa: S608
                stored.update(((source, r[1]), r[0]) for r in await conn.execute_fetchall(sql, (source, *chunk)))
        seen.update(stored)
        repeats: list[tuple[str, str, str | None]] = []  # pushed again (a provider's retry): the event's story says so
        entities = await self._entity_versions_for(conn, [it.event for op in ops for it in op.items])
        # Event ids from the table itself, inside this transaction: BEGIN IMMEDIATE holds the write lock,
        # so no other process (a CLI command) can insert meanwhile, and nothing is remembered between
        # transactions that another writer could overtake. (INSERT … RETURNING costs 60 % more per row.)
        [(last,)] = await conn.execute_fetchall("SELECT COALESCE(MAX(id), 0) FROM events")
        now = self.clock()
        event_rows: list[tuple[Any, ...]] = []
        delivery_rows: list[tuple[Any, ...]] = []
        entity_rows: list[tuple[Any, ...]] = []
        cursor_rows: list[tuple[Any, ...]] = []
        fanout: list[tuple[int, str, str, str, Sequence[str], bool]] = []
        results = []
        for op in ops:
            accepted = dup = stale = 0
            for ev, sinks, version in op.items:
                k = (ev.source, ev.id)
                if k in seen:
                    dup += 1
                    if op.cursor is None:  # not a poll's look-back overlap, which repeats by design
                        repeats.append((*k, op.request_id))
                    continue
                seen.add(k)
                body, h = _serialised(ev)
                if ev.entity_id is not None:
                    ek = (ev.source, ev.entity or "", ev.entity_id)
                    assert h is not None
                    known = entities.get(ek)
                    deleted = is_delete(ev)
                    try:
                        is_stale, keep = judge(known, version, h, deleted)
                    except VersionError as e:
                        assert known is not None and known.version is not None and version is not None
                        raise UnstorableEvent(
                            f"event {ev.id!r} of source {ev.source!r} cannot be stored: its version {ev.version!r} "
                            f"is a {version_key(version)[0]} but entity {ev.entity or ''}:{ev.entity_id} was last "
                            f"seen at version {known.version!r}, a {version_key(known.version)[0]}: a source must "
                            "give one form of version"
                        ) from e
                    if is_stale:
                        stale += 1
                        continue
                    entities[ek] = EntityVersion(keep, h, deleted, ev.id, now)
                    entity_rows.append((*ek, keep, h, int(deleted), ev.id, now))
                accepted += 1
                op.new = op.new or bool(sinks)
                ekey = ev.entity_key
                row = last + len(event_rows) + 1
                event_rows.append((row, ev.source, ev.id, ev.type, ekey, now, body, op.request_id))
                fanout.append((row, ev.source, ev.id, ekey, sinks, ev.entity_id is not None))
            if op.cursor is not None:
                cursor_rows.append((*op.cursor, now))
            results.append(EnqueueResult(accepted, dup, stale))
        if event_rows:
            await conn.insert_rows(
                "INSERT INTO events (id, source, event_id, type, entity_key, received_at, body, request_id)", event_rows
            )
            # A new delivery heads its line unless the line already has an active delivery (or an
            # earlier one in this batch); an event without an entity is a line of its own.
            busy = await _busy_lines(conn, {(sink, f[3]) for f in fanout if f[5] for sink in f[4]})
            for row, _source, _event_id, ekey, sinks, ordered in fanout:
                for sink in sinks:
                    head: int | None = 1
                    if ordered:
                        line = (sink, ekey)
                        if line in busy:
                            head = None
                        else:
                            busy.add(line)
                    delivery_rows.append((row, sink, ekey, "ready", now, now, now, head))
        if delivery_rows:
            await conn.insert_rows(
                "INSERT INTO deliveries (event, sink, entity_key, state, created_at, next_attempt_at, updated_at, head)",
                delivery_rows,
            )
        if repeats:
            rows = {**stored, **{(f[1], f[2]): f[0] for f in fanout}}  # a repeat of a stale event has no row
            dup_rows = [
                (now, rows[(src, eid)], None, "deduplicated", _again(rid))
                for src, eid, rid in repeats
                if (src, eid) in rows
            ]
            if dup_rows:
                await conn.insert_rows("INSERT INTO audit (at, event, delivery, action, detail)", dup_rows)
        if entity_rows:
            await conn.insert_rows(
                "INSERT INTO entity_versions (source, entity, entity_id, version, hash, deleted, event_id, seen_at)",
                entity_rows,
                " ON CONFLICT (source, entity, entity_id) DO UPDATE SET "
                "version = excluded.version, hash = excluded.hash, deleted = excluded.deleted, "
                "event_id = excluded.event_id, seen_at = excluded.seen_at",
            )
        if cursor_rows:
            await conn.executemany(_CURSOR_UPSERT, cursor_rows)
        return results

    @staticmethod
    async def _entity_versions_for(conn: Conn, events: Sequence[Event]) -> dict[tuple[str, str, str], EntityVersion]:
        keys = {(ev.source, ev.entity or "", ev.entity_id) for ev in events if ev.entity_id is not None}
        return await read_entities(conn, keys)

    async def enqueue(
        self, items: Sequence[tuple[Event, Sequence[str]]], *, request_id: str | None = None
    ) -> EnqueueResult:
        """Store events with one delivery per sink; returns once committed. Duplicates are no-ops.

        ``request_id`` names the webhook request they arrived in, kept with each event for its story."""
        if not self._writing():
            raise self._unwritable()
        if not items:
            return EnqueueResult(0, 0)
        op = _EnqueueOp(self, _prepare(items), request_id=request_id)
        assert op.future is not None
        self._queue.put_nowait(op)  # what _submit_grouped does, without a second coroutine and writable check
        result: EnqueueResult = await op.future
        return result

    async def enqueue_with_cursor(
        self, items: Sequence[tuple[Event, Sequence[str]]], source: str, cursor: Any, kind: str = "poll"
    ) -> EnqueueResult:
        """Store a poll's events and its new cursor in one transaction: both or neither survive a crash."""
        if not self._writing():
            raise self._unwritable()
        prepared, blob = _prepare(items), orjson.dumps(cursor)
        result: EnqueueResult = await self._submit_grouped(_EnqueueOp(self, prepared, (source, kind, blob)))
        return result

    async def lease(
        self,
        limit: int,
        lease_seconds: float,
        *,
        exclude: Iterable[str] = (),
        only: str | None = None,
        due_only: bool = True,
    ) -> list[Leased]:
        """Lease up to ``limit`` due deliveries that head their (sink, entity) line, oldest first.

        ``due_only=False`` takes the heads that fall due soonest even if not due yet: a breaker's
        probe tests the sink, and the backoffs it would wait out were caused by the outage."""
        excluded = sorted(exclude)

        async def op(conn: Conn) -> list[Leased]:
            now = self.clock()
            token = f"{self.owner}.{next(self._leases)}"
            where = ["d.state = 'ready'", "d.head = 1"]
            if due_only:
                where.append("d.next_attempt_at <= :now")
            params: dict[str, Any] = {
                "now": now,
                "until": now + lease_seconds,
                "owner": token,
                "limit": limit,
            }
            if only is not None:
                where.append("d.sink = :only")
                params["only"] = only
            if excluded:
                marks = []
                for i, s in enumerate(excluded):
                    params[f"x{i}"] = s
                    marks.append(f":x{i}")
                where.append(f"d.sink NOT IN ({','.join(marks)})")
            sql = f"""
                UPDATE deliveries SET state = 'leased', lease_until = :until, lease_owner = :owner, updated_at = :now
                WHERE id IN (
                    SELECT d.id FROM deliveries d
                    WHERE {" AND ".join(where)}
                    ORDER BY d.next_attempt_at, d.id
                    LIMIT :limit)
            """  # noqa: S608 - only placeholders are interpolated
            if not (await conn.execute(sql, params)).rowcount:
                return []
            # The rows just leased with their events' bodies, in one statement: this lease's rows are the
            # leased ones with its expiry (the deliveries_leased index) and its token.
            rows = await conn.execute_fetchall(
                "SELECT d.id, d.event, d.sink, d.attempts, d.created_at, e.body FROM deliveries d "
                "JOIN events e ON e.id = d.event "
                "WHERE d.state = 'leased' AND d.lease_until = :until AND d.lease_owner = :owner ORDER BY d.id",
                params,
            )
            return [Leased(r[0], r[1], r[2], r[3], r[4], Event.from_json(r[5]), token) for r in rows]

        return await self._submit(op, rows=limit)

    async def complete(self, outcomes: Sequence[Outcome]) -> None:
        """Record what happened to leased deliveries, with an audit line each."""
        if not outcomes:
            return

        async def op(conn: Conn) -> bool:
            now = self.clock()
            # The deliveries done (nearly all of them) are checked and updated in one statement per chunk;
            # the others' leases are checked first, since their audit lines name only the ones still held.
            held = await _done_if_held(conn, [o for o in outcomes if o.kind == "done"], now)
            rest = [o for o in outcomes if o.kind != "done"]
            if rest:
                held |= await _still_held(conn, rest)
            retry: list[tuple[Any, ...]] = []
            dead: list[tuple[Any, ...]] = []
            release: list[tuple[Any, ...]] = []
            audit: list[tuple[Any, ...]] = []
            for o in rest:
                d = o.delivery
                if d.id not in held:
                    continue
                if o.kind == "retry":
                    inc = 1 if o.count_attempt else 0
                    retry.append((inc, o.next_attempt_at or now, now, o.error, d.id))
                    audit.append((now, d.event_row, d.id, "retry" if inc else "deferred", o.error))
                elif o.kind == "dead":
                    dead.append((now, o.error, d.id))
                    audit.append((now, d.event_row, d.id, "dead", o.error))
                else:
                    release.append((now, d.id))
            if retry:
                await conn.executemany(
                    "UPDATE deliveries SET state = 'ready', attempts = attempts + ?, next_attempt_at = ?, "
                    "updated_at = ?, last_error = ?, lease_until = NULL, lease_owner = NULL WHERE id = ?",
                    retry,
                )
            if dead:
                await conn.executemany(
                    "UPDATE deliveries SET state = 'dead', active = NULL, head = NULL, attempts = attempts + 1, "
                    "updated_at = ?, "
                    "last_error = ?, lease_until = NULL, lease_owner = NULL WHERE id = ?",
                    dead,
                )
            if release:
                await conn.executemany(
                    "UPDATE deliveries SET state = 'ready', updated_at = ?, lease_until = NULL, lease_owner = NULL "
                    "WHERE id = ?",
                    release,
                )
            if audit:
                await conn.insert_rows("INSERT INTO audit (at, event, delivery, action, detail)", audit)
            finished = [o.delivery for o in outcomes if o.delivery.id in held and o.kind in ("done", "dead")]
            promoted = await _promote_heads(conn, finished)
            return bool(release or retry or promoted)

        if await self._submit(op, rows=len(outcomes)):
            self.deliveries_ready.set()  # after the commit, not inside the op: a rolled-back retry is no news

    async def _release_leases(self, conn: Conn, owner: str | None, expired_before: float | None = None) -> int:
        now = self.clock()
        sql = "UPDATE deliveries SET state = 'ready', lease_until = NULL, lease_owner = NULL, updated_at = ? "
        sql += "WHERE state = 'leased'"
        params: list[Any] = [now]
        if owner is not None:  # every token of this run is ``owner.n``
            sql += " AND substr(lease_owner, 1, ?) = ?"
            params += [len(owner) + 1, owner + "."]
        if expired_before is not None:
            sql += " AND lease_until < ?"
            params.append(expired_before)
        cur = await conn.execute(sql, params)
        return cur.rowcount

    async def release_owned(self) -> int:
        """Hand back every lease this process holds (clean shutdown)."""
        return await self._submit(lambda c: self._release_leases(c, owner=self.owner))

    async def reclaim_expired(self) -> int:
        """Make deliveries whose lease ran out ready again (their worker died or hung)."""
        n = await self._submit(lambda c: self._release_leases(c, owner=None, expired_before=self.clock()))
        if n:
            log.warning("reclaimed %d deliveries whose lease expired", n)
            self.deliveries_ready.set()
        return n

    async def expedite(self, sink: str) -> int:
        """Make a sink's waiting retries due now (its breaker just closed: it is back)."""

        async def op(conn: Conn) -> int:
            now = self.clock()
            cur = await conn.execute(
                "UPDATE deliveries SET next_attempt_at = ? WHERE state = 'ready' AND sink = ? AND next_attempt_at > ?",
                (now, sink, now),
            )
            return cur.rowcount

        n = await self._submit(op)
        if n:
            self.deliveries_ready.set()
        return n

    async def next_due(self, exclude: Iterable[str] = ()) -> float | None:
        """When the earliest leasable delivery falls due (None if none): heads of their entity line only,
        and not on the ``exclude``d (paused) sinks, so a blocked or paused delivery never causes a busy wait."""
        excluded = sorted(exclude)
        not_in = f"AND d.sink NOT IN ({','.join('?' * len(excluded))}) " if excluded else ""
        sql = f"""
            SELECT d.next_attempt_at FROM deliveries d WHERE d.state = 'ready' AND d.head = 1 {not_in}
            ORDER BY d.next_attempt_at LIMIT 1
        """  # noqa: S608 - only placeholders are interpolated
        async with self._read().execute(sql, excluded) as cur:
            row = await cur.fetchone()
        return float(row[0]) if row else None

    async def cursor_get(self, source: str, kind: str = "poll") -> Any:
        """A source's committed cursor (None if it has none: the next poll starts from the beginning)."""
        async with self._read().execute(
            "SELECT value FROM cursors WHERE source = ? AND kind = ?", (source, kind)
        ) as cur:
            row = await cur.fetchone()
        return orjson.loads(row[0]) if row else None

    async def cursor_set(self, source: str, value: Any, kind: str = "poll") -> None:
        """Set a cursor by hand (``integrand cursor set``); None resets it (backfill from the start)."""
        blob = orjson.dumps(value)

        async def op(conn: Conn) -> None:
            if value is None:
                await conn.execute("DELETE FROM cursors WHERE source = ? AND kind = ?", (source, kind))
            else:
                await conn.execute(_CURSOR_UPSERT, (source, kind, blob, self.clock()))

        await self._submit(op)

    async def cursors(self) -> list[CursorRow]:
        async with self._read().execute(
            "SELECT source, kind, value, updated_at FROM cursors ORDER BY source, kind"
        ) as cur:
            return [CursorRow(r[0], r[1], orjson.loads(r[2]), r[3]) for r in await cur.fetchall()]

    async def entity_versions(
        self, source: str, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], EntityVersion]:
        """What the entity table holds for (entity, entity_id) pairs of one source; missing ones are absent."""
        found = await read_entities(self._read(), {(source, e, i) for e, i in keys})
        return {(k[1], k[2]): v for k, v in found.items()}


def _again(request_id: str | None) -> str:
    """The audit line of a repeated push (a provider's retry), with the request that repeated it."""
    via = f" (request {request_id})" if request_id else ""
    return f"received again{via}; acknowledged, not stored twice"


async def _busy_lines(conn: Conn, lines: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of these (sink, entity key) lines already have an active delivery."""
    by_sink: dict[str, list[str]] = {}
    for sink, key in lines:
        by_sink.setdefault(sink, []).append(key)
    out: set[tuple[str, str]] = set()
    for sink, keys in by_sink.items():
        keys.sort()
        for start, size in _chunks(len(keys)):
            marks = ",".join("?" * size)
            rows = await conn.execute_fetchall(
                f"SELECT DISTINCT entity_key FROM deliveries WHERE sink = ? AND entity_key IN ({marks}) AND active = 1",  # noqa: S608
                [sink, *keys[start : start + size]],
            )
            out.update((sink, r[0]) for r in rows)
    return out


async def _promote_heads(conn: Conn, finished: Sequence[Leased]) -> int:
    """The next delivery of each entity line whose head just finished becomes its head (unordered
    events have lines of one)."""
    by_sink: dict[str, list[str]] = {}
    for d in finished:
        if d.event.entity_id is not None:
            by_sink.setdefault(d.sink, []).append(d.event.entity_key)
    n = 0
    for sink, keys in by_sink.items():
        keys = sorted(set(keys))
        for start, size in _chunks(len(keys)):
            marks = ",".join("?" * size)
            cur = await conn.execute(
                "UPDATE deliveries SET head = 1 WHERE id IN (SELECT MIN(id) FROM deliveries "  # noqa: S608
                f"WHERE sink = ? AND entity_key IN ({marks}) AND active = 1 GROUP BY entity_key)",
                [sink, *keys[start : start + size]],
            )
            n += cur.rowcount
    return n


async def _settle_heads(conn: Conn, lines: set[tuple[str, str]]) -> None:
    """Make the oldest active delivery of each line its head, unless one of the line is in flight
    (then that one stays head: a replayed delivery is never leased beside its successor)."""
    for sink, key in sorted(lines):
        rows = await conn.execute_fetchall(
            "SELECT id, state, head FROM deliveries WHERE sink = ? AND entity_key = ? AND active = 1 "
            "AND (head = 1 OR id = (SELECT MIN(id) FROM deliveries WHERE sink = ? AND entity_key = ? AND active = 1))",
            (sink, key, sink, key),
        )
        if any(r[1] == "leased" and r[2] == 1 for r in rows):
            continue
        oldest = min(r[0] for r in rows)
        for r in rows:
            want = 1 if r[0] == oldest else None
            if r[2] != want:
                await conn.execute("UPDATE deliveries SET head = ? WHERE id = ?", (want, r[0]))


async def _done_if_held(conn: Conn, outcomes: Sequence[Outcome], now: float) -> set[int]:
    """Mark done the deliveries whose lease the outcome's token still holds; the ids marked (see ``_still_held``)."""
    if not outcomes:
        return set()
    by_token: dict[str, list[int]] = {}
    for o in outcomes:
        by_token.setdefault(o.delivery.token, []).append(o.delivery.id)
    held: set[int] = set()
    for token, ids in by_token.items():
        rows = await conn.update_ids_returning(
            "UPDATE deliveries SET state = 'done', active = NULL, head = NULL, attempts = attempts + 1, "
            "updated_at = ?, lease_until = NULL, lease_owner = NULL, last_error = NULL",
            "state = 'leased' AND lease_owner = ?",
            [now, token],
            ids,
        )
        held.update(r[0] for r in rows)
    _log_stale([o for o in outcomes if o.delivery.id not in held])
    return held


def _log_stale(stale: Sequence[Outcome]) -> None:
    for o in stale:
        log.warning(
            "stale %s for delivery %d ignored: its lease (%s) expired and was taken over",
            o.kind,
            o.delivery.id,
            o.delivery.token or "no token",
        )


async def _still_held(conn: Conn, outcomes: Sequence[Outcome]) -> set[int]:
    """The deliveries whose lease the outcome's token still holds; the others are logged and ignored.

    A worker whose lease expired may report after its delivery was reclaimed and leased again (or
    finished) by another: applying its outcome would put the delivery back without its place in line."""
    by_token: dict[str, list[int]] = {}
    for o in outcomes:
        by_token.setdefault(o.delivery.token, []).append(o.delivery.id)
    held: set[int] = set()
    for token, ids in by_token.items():
        rows = await conn.select_ids(
            "SELECT id FROM deliveries WHERE state = 'leased' AND lease_owner = ?", [token], ids
        )
        held.update(r[0] for r in rows)
    _log_stale([o for o in outcomes if o.delivery.id not in held])
    return held
