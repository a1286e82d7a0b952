"""Events → typed column values for a whole batch at once: the sink's hot loop, compiled once per sink.

Each column gets a *bulk* function (a list of raw values → a list of stored values) built when the
sink binds to its table: the path is split once, and the common cases — a non-empty string into a
text column, an int into an integer column, a JSON number into numeric, an ISO date into a date —
are list comprehensions with an inline type test and no per-value call. Anything else in a value
goes through the exact per-value chain (the mapping's conversions, then the column's converter),
and a value that raises makes the caller redo that column row by row with the precise error, so
the fast path never changes what is stored, only how quickly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date
from decimal import Decimal
from operator import attrgetter
from typing import Any

from integrand.connector import Event
from integrand.routes import CONVERSIONS, dig

Bulk = Callable[[list[Any]], list[Any]]
Chain = Callable[[Any], Any]

# Event attributes a path may start with (anything else reads as missing, as the mapping engine does).
FIELDS = frozenset(
    ("id", "source", "type", "data", "received_at", "entity", "entity_id", "version", "occurred_at", "meta")
)
_INT_RANGE = {"int2": (-(2**15), 2**15 - 1), "int4": (-(2**31), 2**31 - 1), "int8": (-(2**63), 2**63 - 1)}
_TEXT = frozenset({"text", "varchar", "bpchar", "name", "citext"})
_BIG = 10**308  # routes.MAX_EXPONENT: the mapping's number conversions refuse anything larger


def read_path(path: str) -> Callable[[Sequence[Event]], list[Any]]:
    """The values at ``path`` for every event (None where it leads nowhere), one pass per path step."""
    head, *rest = path.split(".")
    if head not in FIELDS:
        return lambda events: [None] * len(events)
    get = attrgetter(head)

    def read(events: Sequence[Event]) -> list[Any]:
        vals = list(map(get, events))
        for p in rest:
            # A dict step inline; lists (numeric steps) and other mappings as routes.dig reads them.
            vals = [v.get(p) if type(v) is dict else (None if v is None else dig(v, p)) for v in vals]
        return vals

    return read


def read_attr(attr: str) -> Callable[[Sequence[Event]], list[Any]]:
    get = attrgetter(attr)
    return lambda events: list(map(get, events))


def chain(convert: Sequence[str], tconv: Chain | None, *, empty_is_null: bool) -> Chain:
    """The exact per-value semantics: "" and None → NULL (for paths), the mapping's conversions, the column's type."""
    convs = [CONVERSIONS[n] for n in convert]

    def one(v: Any) -> Any:
        if v is None or (empty_is_null and v == ""):
            return None
        for c in convs:
            v = c(v)
        return v if tconv is None else tconv(v)

    return one


def bulk(base_type: str, convert: Sequence[str], slow: Chain, *, empty_is_null: bool) -> Bulk:
    """A whole column at once: inline fast paths for the common JSON types, ``slow`` for every other value.

    Each fast path gives exactly what ``slow`` gives for the values it takes (tests compare the two)."""
    conv = tuple(convert)
    if base_type in _TEXT and conv in ((), ("str",)):
        if empty_is_null:
            return lambda vals: [v if type(v) is str and v else slow(v) for v in vals]
        return lambda vals: [v if type(v) is str else slow(v) for v in vals]
    if base_type in _INT_RANGE and set(conv) <= {"int", "number"}:
        lo, hi = _INT_RANGE[base_type]
        if not conv:
            return lambda vals: [v if type(v) is int and lo <= v <= hi else slow(v) for v in vals]

        # An id sent as a string of ASCII digits ("42") is read by int() as the mapping's Decimal would read it.
        def ints(vals: list[Any]) -> list[Any]:
            out: list[Any] = []
            add = out.append
            for v in vals:
                t = type(v)
                if t is int and lo <= v <= hi:
                    add(v)
                elif t is str and v.isdigit() and v.isascii() and len(v) < 19 and lo <= (i := int(v)) <= hi:
                    add(i)
                else:
                    add(slow(v))
            return out

        return ints
    if base_type == "numeric" and conv == ():
        # _number: Decimal(str(v)); for an int that is Decimal(v), for a float str() is repr().
        return lambda vals: [
            Decimal(v) if type(v) is int else Decimal(repr(v)) if type(v) is float else slow(v) for v in vals
        ]
    if base_type == "numeric" and conv == ("number",):
        # routes' number: an int stays an int (up to 1e308), a finite float becomes an int when whole; a float
        # too small for the mapping's exponent limit (1e-308) goes the slow way, which refuses it.
        def numbers(vals: list[Any]) -> list[Any]:
            out: list[Any] = []
            add = out.append
            for v in vals:
                t = type(v)
                if t is float and (1e-300 <= v <= 1e300 or -1e300 <= v <= -1e-300 or v == 0):
                    d = Decimal(repr(v))
                    add(Decimal(int(d)) if v.is_integer() else d)
                elif t is int and -_BIG < v < _BIG:
                    add(Decimal(v))
                else:
                    add(slow(v))
            return out

        return numbers
    if base_type == "date" and conv == ():
        return lambda vals: [date.fromisoformat(v) if type(v) is str and len(v) == 10 else slow(v) for v in vals]
    return lambda vals: [slow(v) for v in vals]
