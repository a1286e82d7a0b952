"""The sink's bulk column conversion gives exactly what the per-value chain gives (no server needed)."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from integrand_postgres.columns import bulk, chain, read_path
from integrand_postgres.schema import Column, converter

from integrand.connector import Event
from integrand.routes import dig

digits = st.from_regex(r"\A-?[0-9]{1,25}\Z")
decimals = st.from_regex(r"\A-?[0-9]{1,12}\.[0-9]{1,6}\Z")
dates = st.dates().map(lambda d: d.isoformat())
json_values: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.just(""),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e-290, max_value=1e-290),
    st.text(max_size=12),
    digits,
    decimals,
    dates,
    st.from_regex(r"\A ?2026-0[1-9]-[0-3][0-9] ?\Z"),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)

CASES = [
    (base, conv, empty)
    for base in ("text", "varchar", "int2", "int4", "int8", "numeric", "float8", "date", "timestamptz", "bool", "jsonb")
    for conv in ((), ("str",), ("int",), ("number",), ("int", "number"))
    for empty in (True, False)
]
CASE = st.sampled_from(CASES)


def _same(a: Any) -> Any:
    return (type(a), repr(a))


@settings(max_examples=800, deadline=None)
@given(case=CASE, vals=st.lists(json_values, max_size=8))
@example(case=("int2", ("int",), True), vals=["40000"])  # digits that parse but do not fit the column
@example(case=("numeric", ("number",), True), vals=[5.242405565056739e16])  # a whole float, read through repr
def test_bulk_equals_the_per_value_chain(case: tuple[str, tuple[str, ...], bool], vals: list[Any]) -> None:
    base, conv, empty = case
    tconv = converter(Column("c", base, base, False, False, "b"))
    slow = chain(conv, tconv, empty_is_null=empty)
    fast = bulk(base, conv, slow, empty_is_null=empty)
    expected: list[Any] = []
    refused = False
    for v in vals:
        try:
            expected.append(slow(v))
        except Exception:
            refused = True
            break
    try:
        got = fast(list(vals))
    except Exception:
        return  # the sink then redoes the column value by value, with the exact error: always allowed
    assert not refused, f"the bulk path took a value the chain refuses: {vals!r} → {got!r}"
    assert [_same(g) for g in got] == [_same(e) for e in expected]


@settings(max_examples=200, deadline=None)
@given(
    data=st.recursive(
        st.one_of(st.none(), st.integers(), st.text(max_size=3)),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["a", "b", "0", "1"]), inner, max_size=3)
        ),
        max_leaves=8,
    ),
    path=st.lists(st.sampled_from(["a", "b", "0", "1", "-1"]), min_size=1, max_size=3),
)
def test_read_path_reads_as_the_mapping_engine_digs(data: Any, path: list[str]) -> None:
    ev = Event(id="e", source="s", type="t", data=data if isinstance(data, dict) else {"a": data})
    p = "data." + ".".join(path)
    assert read_path(p)([ev]) == [dig(ev.data, ".".join(path))]
    assert read_path("nothing.a")([ev]) == [None]
