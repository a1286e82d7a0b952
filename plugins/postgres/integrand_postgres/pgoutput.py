"""A decoder of ``pgoutput`` (protocol version 1), PostgreSQL's built-in logical decoding output.

Message formats are those of the PostgreSQL manual, "Logical Replication Message Formats": Begin,
Commit, Relation, Insert, Update, Delete, Truncate (Type, Origin and Message are skipped). Column
values arrive in their text form and become JSON values by type (integers, floats, numerics,
booleans and json/jsonb parsed; everything else kept as text), close to what ``to_jsonb`` gives.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from integrand.connector import PermanentError

PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds

# Type oids whose text form becomes a JSON number, boolean or structure.
_INTS = {20, 21, 23, 26}  # int8, int2, int4, oid
_FLOATS = {700, 701}  # float4, float8
_NUMERIC = 1700
_BOOL = 16
_JSON = {114, 3802}  # json, jsonb
_INT64 = 2**63


class PgoutputError(PermanentError):
    """A message the decoder cannot read (truncated, an unknown relation, a change outside a transaction):
    the stream stops with this alert rather than an unexplained exception (found by fuzzing)."""


def value(type_oid: int, text: str) -> Any:
    if type_oid in _INTS:
        return int(text)
    if type_oid in _FLOATS:
        return float(text)
    if type_oid == _NUMERIC:
        d = Decimal(text)
        if not d.is_finite():
            return text
        if d == d.to_integral_value() and "." not in text and -_INT64 <= d < _INT64:
            return int(d)
        # Past 64 bits a JSON integer cannot be stored (orjson): a float, as the outbox mode's to_jsonb gives.
        return float(d)
    if type_oid == _BOOL:
        return text == "t"
    if type_oid in _JSON:
        return orjson.loads(text)
    return text


@dataclass
class Relation:
    oid: int
    schema: str
    name: str
    columns: list[tuple[str, int, bool]]  # (name, type oid, part of the replica identity key)


@dataclass
class Change:
    op: str  # c, u, d, or t (TRUNCATE: one per table it named, no row)
    relation: Relation
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    cascade: bool = False  # TRUNCATE … CASCADE
    restart_identity: bool = False  # TRUNCATE … RESTART IDENTITY


@dataclass
class Transaction:
    xid: int
    commit_lsn: int  # the commit record's LSN: orders transactions
    end_lsn: int = 0  # just past the commit: where the slot is advanced to once stored
    commit_ts_ms: int = 0
    changes: list[Change] = field(default_factory=list)


class Reader:
    """Bytes of one message, read front to back."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes):
        self.buf = buf
        self.pos = 0

    def byte(self) -> str:
        b = self.buf[self.pos : self.pos + 1].decode()
        self.pos += 1
        return b

    def int8(self) -> int:
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def int16(self) -> int:
        (v,) = struct.unpack_from("!h", self.buf, self.pos)
        self.pos += 2
        return int(v)

    def int32(self) -> int:
        (v,) = struct.unpack_from("!i", self.buf, self.pos)
        self.pos += 4
        return int(v)

    def uint32(self) -> int:
        (v,) = struct.unpack_from("!I", self.buf, self.pos)
        self.pos += 4
        return int(v)

    def int64(self) -> int:
        (v,) = struct.unpack_from("!q", self.buf, self.pos)
        self.pos += 8
        return int(v)

    def string(self) -> str:
        end = self.buf.index(b"\0", self.pos)
        s = self.buf[self.pos : end].decode()
        self.pos = end + 1
        return s

    def tuple(self, rel: Relation, old: dict[str, Any] | None = None) -> dict[str, Any]:
        n = self.int16()
        out: dict[str, Any] = {}
        for i in range(n):
            name, typ, _key = rel.columns[i]
            kind = self.byte()
            if kind == "n":
                out[name] = None
            elif kind == "u":  # an unchanged TOASTed value: not sent; keep the old one if we have it
                out[name] = old.get(name) if old else None
            elif kind == "t":
                length = self.int32()
                out[name] = value(typ, self.buf[self.pos : self.pos + length].decode())
                self.pos += length
            else:
                raise ValueError(f"pgoutput: unexpected tuple data kind {kind!r}")
        return out


class Decoder:
    """Feeds on messages in slot order and hands out whole transactions at their Commit."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self.current: Transaction | None = None

    def feed(self, data: bytes) -> Transaction | None:
        r = Reader(data)
        try:
            return self._feed(r)
        except PgoutputError:
            raise
        except (struct.error, IndexError, KeyError, ValueError, ArithmeticError) as e:  # UnicodeError is a ValueError
            kind = data[:1].decode("latin-1") or "(empty)"
            raise PgoutputError(
                f"pgoutput: cannot read a {kind!r} message at byte {r.pos} of {len(data)}: {type(e).__name__}: {e}"
            ) from None

    def _feed(self, r: Reader) -> Transaction | None:
        kind = r.byte()
        if kind == "B":
            final_lsn, ts, xid = r.int64(), r.int64(), r.uint32()
            self.current = Transaction(xid, final_lsn, commit_ts_ms=_ms(ts))
        elif kind == "C":
            r.int8()
            commit_lsn, end_lsn, ts = r.int64(), r.int64(), r.int64()
            tx = self.current or Transaction(0, commit_lsn)
            tx.commit_lsn, tx.end_lsn, tx.commit_ts_ms = commit_lsn, end_lsn, _ms(ts)
            self.current = None
            return tx
        elif kind == "R":
            oid, schema, name = r.uint32(), r.string(), r.string()
            r.int8()  # replica identity setting
            cols = []
            for _ in range(r.int16()):
                flags = r.int8()
                cname, typ = r.string(), r.uint32()
                r.int32()  # typmod
                cols.append((cname, typ, bool(flags & 1)))
            self.relations[oid] = Relation(oid, schema, name, cols)
        elif kind in ("I", "U", "D"):
            oid = r.uint32()
            rel = self.relations.get(oid)
            if rel is None:
                raise PgoutputError(f"pgoutput: a {kind!r} message for relation {oid}, which no Relation message named")
            if self.current is None:
                raise PgoutputError(f"pgoutput: a {kind!r} message outside a transaction")
            before: dict[str, Any] | None = None
            after: dict[str, Any] | None = None
            if kind == "I":
                r.byte()  # 'N'
                after = r.tuple(rel)
            elif kind == "U":
                marker = r.byte()
                if marker in ("K", "O"):
                    before = r.tuple(rel)
                    marker = r.byte()
                after = r.tuple(rel, before)
            else:
                r.byte()  # 'K' or 'O'
                before = r.tuple(rel)
            self.current.changes.append(Change({"I": "c", "U": "u", "D": "d"}[kind], rel, before, after))
        elif kind == "T":
            n = r.int32()
            options = r.int8()  # bit 1: CASCADE, bit 2: RESTART IDENTITY
            assert self.current is not None, "a TRUNCATE outside a transaction"
            for _ in range(n):
                found = self.relations.get(r.uint32())
                if found is not None:
                    self.current.changes.append(
                        Change("t", found, None, None, cascade=bool(options & 1), restart_identity=bool(options & 2))
                    )
        # 'Y' (type), 'O' (origin), 'M' (logical message): nothing to do.
        return None


def _ms(pg_us: int) -> int:
    """A pgoutput timestamp (microseconds since 2000) in Unix milliseconds; beyond year 9999 it is garbage."""
    ms = (pg_us + PG_EPOCH_US) // 1000
    if not -62_135_596_800_000 <= ms <= 253_402_300_799_000:
        raise ValueError(f"timestamp {pg_us} is out of range")
    return ms


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_int(text: str) -> int:
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def transactions(rows: Iterator[bytes], decoder: Decoder) -> Iterator[Transaction]:
    for data in rows:
        tx = decoder.feed(data)
        if tx is not None:
            yield tx
