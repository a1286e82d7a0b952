"""``integrand postgres schema SINK | check SINK | install SOURCE | uninstall SOURCE`` (entry-point group integrand.commands)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

from integrand.errors import ConfigError

from .pg import connect
from .sink import Plan, PostgresSinkConfig


def register(sub: Any, api: Any) -> None:
    p = sub.add_parser("postgres", help="PostgreSQL: the table a sink needs, CDC triggers for a source")
    psub = p.add_subparsers(dest="postgres_action", required=True, metavar="ACTION")

    sp = api.with_config(
        psub.add_parser("schema", help="print the CREATE TABLE a postgres sink needs (changes nothing)")
    )
    sp.add_argument("sink")
    sp.set_defaults(fn=lambda args: cmd_schema(api, args))

    sp = api.with_config(psub.add_parser("check", help="compare a postgres sink's table with its config"))
    sp.add_argument("sink")
    sp.set_defaults(fn=lambda args: cmd_check(api, args))

    for name, what in (
        ("install", "create what a postgres-cdc source reads: outbox and triggers, or publication and slot"),
        ("uninstall", "drop what install created for a postgres-cdc source"),
    ):
        sp = api.with_config(psub.add_parser(name, help=what))
        sp.add_argument("source")
        sp.set_defaults(fn=lambda args, name=name: cmd_install(api, args, uninstall=name == "uninstall"))


def _sink(api: Any, args: argparse.Namespace) -> tuple[PostgresSinkConfig, Plan, Any]:
    c = api.configured(args, args.sink, "sink", connector="postgres")
    cfg = c.options
    assert isinstance(cfg, PostgresSinkConfig)
    return cfg, Plan(cfg, f"sinks.{args.sink}"), c


def cmd_schema(api: Any, args: argparse.Namespace) -> int:
    _cfg, plan, _ = _sink(api, args)
    print(plan.create_table())
    return 0


def cmd_check(api: Any, args: argparse.Namespace) -> int:
    from .schema import inspect

    cfg, plan, c = _sink(api, args)

    async def go() -> list[str]:
        con = await connect(cfg, c.base_dir, f"integrand check {args.sink}")
        try:
            return plan.check(await inspect(con, cfg.table))
        finally:
            with contextlib.suppress(Exception):
                await con.close()

    try:
        problems = asyncio.run(go())
    except Exception as e:
        raise SystemExit(f"error: {e}") from None
    if problems:
        raise ConfigError(problems)
    print(f"sinks.{args.sink}: table {cfg.table} has every column the sink writes")
    return 0


def cmd_install(api: Any, args: argparse.Namespace, *, uninstall: bool) -> int:
    from .logical import install_logical, uninstall_logical
    from .source import PostgresSourceConfig, install_outbox, uninstall_outbox

    c = api.configured(args, args.source, "source", connector="postgres-cdc")
    cfg = c.options
    assert isinstance(cfg, PostgresSourceConfig)

    async def go() -> list[str]:
        con = await connect(cfg, c.base_dir, f"integrand install {args.source}")
        try:
            if cfg.mode == "logical":
                return await (uninstall_logical if uninstall else install_logical)(con, cfg, args.source)
            return await (uninstall_outbox if uninstall else install_outbox)(con, cfg, args.source)
        finally:
            with contextlib.suppress(Exception):
                await con.close()

    try:
        done = asyncio.run(go())
    except Exception as e:
        raise SystemExit(f"error: {e}") from None
    for line in done:
        print(line)
    return 0
