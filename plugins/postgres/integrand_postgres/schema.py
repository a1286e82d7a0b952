"""What a target table looks like (columns, types, unique keys, privileges) and how JSON values become its types.

The sink never alters a user's table: it reads the catalog, says precisely what is
missing, and ``integrand postgres schema SINK`` prints the ``CREATE TABLE`` it would need.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg
import orjson

from .pg import qualified, quote_ident


@dataclass(frozen=True)
class Column:
    name: str
    base_type: str  # pg_type.typname after domains are unwrapped (int8, numeric, _text, …)
    display: str  # format_type(): what a person wrote (numeric(12,2), character varying(40))
    not_null: bool
    has_default: bool
    type_kind: str  # pg_type.typtype: b base, e enum, c composite, …
    default: str | None = None  # the default's expression as PostgreSQL prints it (``now()``), if any


@dataclass(frozen=True)
class TableInfo:
    name: str
    columns: Mapping[str, Column]
    unique_keys: Sequence[frozenset[str]]
    privileges: frozenset[str]
    schema: str = ""  # the two parts of ``name``, unquoted
    relname: str = ""


_COLUMNS_SQL = """
SELECT a.attname, coalesce(bt.typname, t.typname), format_type(a.atttypid, a.atttypmod), a.attnotnull,
       a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '', coalesce(bt.typtype, t.typtype)::text,
       pg_get_expr(d.adbin, d.adrelid)
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_UNIQUE_SQL = """
SELECT array_agg(a.attname::text)
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) AS k(attnum)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
GROUP BY i.indexrelid
"""


async def inspect(con: asyncpg.Connection, table: str) -> TableInfo | None:
    """The table as the catalog describes it, or None if it does not exist (or is not a table)."""
    found = await con.fetchrow(
        "SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
        qualified(table),
    )
    if found is None:
        return None
    oid, schema, name = found
    cols = {r[0]: Column(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in await con.fetch(_COLUMNS_SQL, oid)}
    uniques = [frozenset(r[0]) for r in await con.fetch(_UNIQUE_SQL, oid)]
    privs = set()
    for p in ("SELECT", "INSERT", "UPDATE", "DELETE"):
        if await con.fetchval("SELECT has_table_privilege($1::oid, $2)", oid, p):
            privs.add(p)
    return TableInfo(f"{schema}.{name}", cols, uniques, frozenset(privs), schema, name)


# --- JSON values → the Python types asyncpg's binary codecs take -------------------------------------


class ValueRejected(ValueError):
    """A value that cannot be stored in its column's type."""


def _number(v: Any) -> Decimal:
    if isinstance(v, bool):
        raise ValueRejected("a boolean is not a number")
    if isinstance(v, Decimal):
        return v
    try:
        d = Decimal(str(v).strip())
    except InvalidOperation:
        raise ValueRejected(f"{v!r} is not a number") from None
    return d


def _int(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    d = _number(v)
    if not d.is_finite() or d != d.to_integral_value():
        raise ValueRejected(f"{v!r} is not a whole number")
    return int(d)


def _float(v: Any) -> float:
    if isinstance(v, float):
        return v
    return float(_number(v))


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "t", "yes", "y", "1", "on"):
        return True
    if s in ("false", "f", "no", "n", "0", "off"):
        return False
    raise ValueRejected(f"{v!r} is not a boolean")


def _instant(v: Any) -> datetime:
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=UTC)
    if isinstance(v, bool):
        raise ValueRejected("a boolean is not a time")
    if isinstance(v, int | float):
        return datetime.fromtimestamp(v / 1000 if abs(v) > 1e11 else v, UTC)
    try:
        text = str(v).strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        d = datetime.fromisoformat(text)
    except ValueError:
        raise ValueRejected(f"{v!r} is not an ISO-8601 time") from None
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def _timestamp(v: Any) -> datetime:
    return _instant(v).astimezone(UTC).replace(tzinfo=None)


def _date(v: Any) -> date:
    if isinstance(v, date) and not isinstance(v, datetime):
        return v
    if isinstance(v, str) and len(v.strip()) == 10:
        try:
            return date.fromisoformat(v.strip())
        except ValueError:
            raise ValueRejected(f"{v!r} is not a date") from None
    return _instant(v).date()


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, dict | list):
        return orjson.dumps(v).decode()
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _uuid(v: Any) -> uuid.UUID:
    try:
        return v if isinstance(v, uuid.UUID) else uuid.UUID(str(v))
    except ValueError:
        raise ValueRejected(f"{v!r} is not a UUID") from None


def _json(v: Any) -> Any:
    return v


def _int_range(name: str, lo: int, hi: int) -> Callable[[Any], int]:
    """A whole number that fits the column (asyncpg would refuse it while encoding, which reads as an outage)."""

    def conv(v: Any) -> int:
        i = _int(v)
        if not lo <= i <= hi:
            raise ValueRejected(f"{v!r} is out of range for {name}")
        return i

    return conv


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "int2": _int_range("smallint", -(2**15), 2**15 - 1),
    "int4": _int_range("integer", -(2**31), 2**31 - 1),
    "int8": _int_range("bigint", -(2**63), 2**63 - 1),
    "oid": _int_range("oid", 0, 2**32 - 1),
    "numeric": _number,
    **dict.fromkeys(("float4", "float8"), _float),
    "bool": _bool,
    "timestamptz": _instant,
    "timestamp": _timestamp,
    "date": _date,
    **dict.fromkeys(("text", "varchar", "bpchar", "name", "citext"), _text),
    "uuid": _uuid,
    **dict.fromkeys(("json", "jsonb"), _json),
}


def converter(col: Column) -> Callable[[Any], Any] | None:
    """How a JSON value becomes this column's Python type; None for a type the sink does not write."""
    if col.type_kind == "e":  # an enum: its text form
        return _text
    if col.base_type.startswith("_"):  # an array of a supported element type
        elem = _CONVERTERS.get(col.base_type[1:])
        if elem is None:
            return None

        def array(v: Any, elem: Callable[[Any], Any] = elem) -> list[Any]:
            if not isinstance(v, list):
                raise ValueRejected(f"{v!r} is not a list")
            return [None if x is None else elem(x) for x in v]

        return array
    return _CONVERTERS.get(col.base_type)


TIME_TYPES = frozenset({"timestamptz", "timestamp"})
TEXT_TYPES = frozenset({"text", "varchar", "bpchar", "name", "citext"})


def create_table_sql(
    table: str,
    columns: Mapping[str, str],
    key: Sequence[str],
    comment: str = "",
) -> str:
    """A ``CREATE TABLE`` with these columns (name → SQL type) and a primary key."""
    width = max(len(quote_ident(c)) for c in columns)
    lines = [f"    {quote_ident(c).ljust(width)} {t}" for c, t in columns.items()]
    lines.append(f"    PRIMARY KEY ({', '.join(quote_ident(k) for k in key)})")
    head = f"-- {comment}\n" if comment else ""
    return f"{head}CREATE TABLE {qualified(table)} (\n" + ",\n".join(lines) + "\n);"
