"""``[connections.NAME]``: one account's credentials and endpoints, shared by the sources and sinks that name it.

A QuickBooks company (or a Salesforce org) read by a source and written by a sink used to need its
OAuth setup twice. A connection holds the ``connector`` and its account keys once; a source or sink
table says ``connection = "NAME"`` and adds only its own keys (``entities``, ``entity``, ``poll`` …).
Everything that names one connection shares one state scope (``connection:NAME``: one token store,
so a rotated refresh token is never split between two copies) and, since connectors key their rate
limiters by account, one rate budget.
"""

from __future__ import annotations

from typing import Any

SCOPE_PREFIX = "connection:"


def expand(
    raw: dict[str, Any], core_keys: dict[str, frozenset[str]], problems: list[str]
) -> tuple[dict[str, Any], dict[tuple[str, str], str]]:
    """``raw`` with each ``connection = "NAME"`` table merged with its connection, and (plural, name) → connection."""
    from .config import NAME  # the one rule for names

    raw = {**raw, **{p: dict(raw[p]) for p in ("sources", "sinks") if isinstance(raw.get(p), dict)}}
    conns = raw.get("connections", {})
    if not isinstance(conns, dict):
        problems.append("connections: expected tables [connections.NAME]")
        conns = {}
    for name, table in conns.items():
        where = f"connections.{name}"
        if not NAME.match(name):
            problems.append(f"{where}: name must be letters, digits, '-' or '_'")
        elif not isinstance(table, dict):
            problems.append(f"{where}: expected a table")
        elif "connector" not in table:
            problems.append(f"{where}.connector: required key is missing")
    used: dict[tuple[str, str], str] = {}
    for plural in ("sources", "sinks"):
        tables = raw.get(plural)
        if not isinstance(tables, dict):
            continue
        for name, table in tables.items():
            if not isinstance(table, dict) or "connection" not in table:
                continue
            where = f"{plural}.{name}"
            conn_name = table["connection"]
            conn = conns.get(conn_name) if isinstance(conn_name, str) else None
            if not isinstance(conn, dict) or "connector" not in conn:
                known = ", ".join(sorted(conns)) or "none"
                problems.append(f"{where}.connection: no connection named {conn_name!r} (connections: {known})")
                continue
            if "connector" in table and table["connector"] != conn["connector"]:
                problems.append(
                    f"{where}.connector: {table['connector']!r} differs from connection {conn_name!r}'s "
                    f"{conn['connector']!r} (leave it out)"
                )
                continue
            misplaced = sorted(k for k in conn if k in core_keys[plural] and k != "connector")
            if misplaced:
                problems.append(
                    f"connections.{conn_name}.{misplaced[0]}: belongs in the {plural[:-1]} table, not the connection"
                )
                continue
            clash = sorted(k for k in table if k in conn and k != "connector")
            if clash:
                problems.append(f"{where}.{clash[0]}: already set by connection {conn_name!r} (set it in one place)")
                continue
            merged = {**conn, **{k: v for k, v in table.items() if k != "connection"}}
            tables[name] = merged
            used[(plural, name)] = conn_name
    return raw, used


def scope(role: str, name: str, connection: str | None) -> str:
    """The state scope of a configured connector: its connection's when it has one."""
    return f"{SCOPE_PREFIX}{connection}" if connection else f"{role}:{name}"
