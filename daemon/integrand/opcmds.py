"""The operator's commands: ``status``, ``dlq …``, ``events …``, ``saga show``, ``cursor …``, ``reconcile``, ``auth``.

Each asks the running daemon over its admin socket when there is one (see :mod:`integrand.cliops`),
and loads the config without reading secrets it does not need, so they work in an operator's shell
where the service's ``{credential = …}`` and ``{env = …}`` secrets cannot be read."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson

from .config import Settings, config_path, load_config
from .connector import ConnectorContext
from .errors import AuthError, RetryableError
from .reports import BadRequest, Conflict, NotFound

T = TypeVar("T")
STATE_ORDER = ("ready", "leased", "done", "dead")


def load_lazily(args: argparse.Namespace) -> Settings:
    return load_config(config_path(args.config), lazy_secrets=True)


def when(iso: str | None) -> str:
    """``2026-12-07T00:42:22.123Z`` as ``2026-12-07 00:42:22Z`` (what the CLI has always printed)."""
    if not iso:
        return "-"
    return iso[:10] + " " + iso[11:19] + "Z"


def _run(fn: Callable[[], Awaitable[int]]) -> int:
    """Run one command; a missing id or a bad question is one line on stderr, not a traceback."""

    async def go() -> int:
        try:
            return await fn()
        except NotFound as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except BadRequest as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except Conflict as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return asyncio.run(go())


def _json(data: Any) -> int:
    """``--json``: the admin API's answer as it is, for scripts."""
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
    return 0


def _ops(settings: Settings, write: bool) -> Any:
    from .cliops import open_ops

    return open_ops(settings, write=write)


# --- status -----------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    settings = load_lazily(args)

    async def do() -> int:
        async with _ops(settings, write=False) as ops:
            st = await ops.status()
        if args.json:
            return _json(st)
        out = [f"store {st['store']}: {st['events']} event(s)" + ("" if st["daemon"] else " (no daemon running)")]
        counts = st["deliveries"]
        if not counts:
            out.append("no deliveries yet")
        about = {s["name"]: s for s in st["sinks"]}
        for sink in sorted(set(counts) | set(about)):
            line = f"  sink {sink}: " + ", ".join(f"{x} {counts.get(sink, {}).get(x, 0)}" for x in STATE_ORDER)
            s = about.get(sink)
            if s is not None and s["backlog"]:
                line += f"; oldest pending {s['oldest_pending_age']:.0f} s"
            b = s.get("breaker") if s is not None else None
            if b is not None:
                line += f"; breaker {b['status']}" + ("; PAUSED: credentials refused" if s and s.get("paused") else "")
            out.append(line)
        polling = [s for s in st["sources"] if s["polling"] and "last_poll" in s]
        for s in polling:
            out.append(
                f"  source {s['name']}: last poll {when(s['last_poll'])}, next {when(s['next_poll'])}, "
                f"poll lag {s['poll_lag'] or 0:.0f} s (target {s['target_latency']:.0f} s)"
                + (f", last error: {s['last_error']}" if s.get("last_error") else "")
            )
        if st.get("nodes"):
            out.append(f"nodes ({len(st['nodes'])}):")
            for n in st["nodes"]:
                age = "gone" if n["heartbeat_age"] is None else f"heartbeat {n['heartbeat_age']:.1f} s ago"
                owns = ", ".join(n["owns"]) or "no singletons"
                out.append(f"  {n['node_id']:<24} {age}; runs {owns}")
        if st["cursors"]:
            out.append("cursors:")
            for c in st["cursors"]:
                value = orjson.dumps(c["value"]).decode()
                out.append(f"  {c['source']:<16} {c['kind']:<10} {when(c['updated_at'])}  {value[:200]}")
        if st["recent_rejections"]:
            out.append("recent refused webhooks:")
            for r in st["recent_rejections"]:
                out.append(f"  {when(r['at'])}  {r['source']:<12} {r['status']}  {r['reason']}")
        print("\n".join(out))
        return 0

    return _run(do)


# --- dlq --------------------------------------------------------------------------------------------


def cmd_dlq(args: argparse.Namespace) -> int:
    settings = load_lazily(args)
    action = args.dlq_action
    if action in ("replay", "purge") and not args.all and not args.ids:
        print("error: give delivery IDs or --all", file=sys.stderr)
        return 2

    async def do() -> int:
        async with _ops(settings, write=action in ("replay", "purge")) as ops:
            if action == "list":
                rows = await ops.dlq_list(args.sink, args.limit)
                return _json(rows) if args.json else _print_dlq(rows)
            if action == "show":
                found = await ops.dlq_show(args.id)
                return _json(found) if args.json else _print_deliveries(found)
            body: dict[str, Any] = {"sink": args.sink}
            body.update({"all": True} if args.all else {"ids": args.ids})
            if action == "replay":
                body["include_superseded"] = args.include_superseded
                res = await ops.dlq_replay(body)
                n = res["replayed"]
                print(f"replayed {n} dead-lettered deliver{'y' if n == 1 else 'ies'}")
                if res["superseded"]:
                    listed = " ".join(str(i) for i in res["superseded"])
                    print(
                        f"left {len(res['superseded'])} dead because a newer version of their entity has been seen "
                        f"since (replaying would put old data over new): {listed}; "
                        "add --include-superseded to send them anyway"
                    )
                return 0 if n or args.all else 1
            res = await ops.dlq_purge(body)
            n = res["purged"]
            print(f"purged {n} dead-lettered deliver{'y' if n == 1 else 'ies'}")
            return 0

    return _run(do)


def _print_dlq(rows: list[dict[str, Any]]) -> int:
    if not rows:
        print("dead-letter queue is empty")
        return 0
    lines = [f"{'ID':>8}  {'EVENT':<36}  {'SOURCE':<12}  {'SINK':<12}  {'TRIES':>5}  {'WHEN':<20}  LAST ERROR"]
    for d in rows:
        err = d["last_error"].splitlines()[0] if d["last_error"] else ""
        lines.append(
            f"{d['id']:>8}  {d['event_id'][:36]:<36}  {d['source'][:12]:<12}  {d['sink'][:12]:<12}  "
            f"{d['attempts']:>5}  {when(d['updated_at']):<20}  {err[:100]}"
        )
    print("\n".join(lines))
    return 0


def _print_deliveries(found: list[dict[str, Any]]) -> int:
    out: list[str] = []
    for d in found:
        out.append(f"delivery {d['id']} to sink {d['sink']}: {d['state']}, {d['attempts']} attempt(s)")
        out.append(f"  created {when(d['created_at'])}, updated {when(d['updated_at'])}")
        if d["last_error"]:
            out.append("  last error:\n    " + d["last_error"].replace("\n", "\n    "))
        out.append("  history:")
        for a in d["history"]:
            detail = a["detail"].splitlines()[0] if a["detail"] else ""
            out.append(f"    {when(a['at'])}  {a['action']:<10} {detail}")
        out.append("  event:")
        out.append("    " + orjson.dumps(d["event"], option=orjson.OPT_INDENT_2).decode().replace("\n", "\n    "))
    print("\n".join(out))
    return 0


# --- events -----------------------------------------------------------------------------------------


def cmd_events(args: argparse.Namespace) -> int:
    settings = load_lazily(args)

    async def do() -> int:
        sagas: dict[str, list[str]] = {}  # saga id → its story, for deliveries to a saga's runner
        async with _ops(settings, write=False) as ops:
            if args.events_action == "show":
                stories = await ops.events_show(args.id)
                if not args.json:
                    sagas = await _saga_stories(ops, stories)
            else:
                rows = await ops.events_list(args.source, args.since, args.state, args.limit)
        if args.json:
            return _json(stories if args.events_action == "show" else rows)
        if args.events_action == "list":
            return _print_events(rows)
        out: list[str] = []
        for s in stories:
            ev = s["event"]
            out.append(f"event {ev['row']}: {ev['source']}:{ev['id']} ({ev['type']})")
            about = []
            if ev["entity_id"] is not None:
                about.append(
                    f"entity {ev['entity']}:{ev['entity_id']}" if ev["entity"] else f"entity {ev['entity_id']}"
                )
            if ev["version"] is not None:
                about.append(f"version {ev['version']}")
            about += [f"{k} {v}" for k, v in sorted(ev["meta"].items())]
            if about:
                out.append("  " + ", ".join(about))
            for d in s["deliveries"]:
                out.append(f"  delivery {d['id']} to {d['sink']}: {d['state']}, {d['attempts']} attempt(s)")
                story = sagas.get(f"{ev['source']}:{ev['id']}~{d['sink'].removeprefix('~saga:')}")
                if d["sink"].startswith("~saga:") and story:
                    out.extend("    " + line for line in story)
            out.append("  story:")
            for h in s["history"]:
                detail = h["detail"].splitlines()[0] if h["detail"] else ""
                who = f"delivery {h['delivery']}" if h["delivery"] else ""
                out.append(f"    {when(h['at'])}  {h['action']:<12} {who:<16} {detail}".rstrip())
        print("\n".join(out))
        return 0

    return _run(do)


async def _saga_stories(ops: Any, stories: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The saga record behind each delivery to a ``~saga:NAME`` runner, as ``saga show`` prints it."""
    from .sagarunner import SCOPE, describe

    out: dict[str, list[str]] = {}
    for s in stories:
        ev = s["event"]
        for d in s["deliveries"]:
            if d["sink"].startswith("~saga:"):
                sid = f"{ev['source']}:{ev['id']}~{d['sink'].removeprefix('~saga:')}"
                rec = await ops.state_get(SCOPE, sid)
                if isinstance(rec, dict):
                    out[sid] = describe(rec)
    return out


def _print_events(rows: list[dict[str, Any]]) -> int:
    if not rows:
        print("no events match")
        return 0
    lines = [f"{'ROW':>8}  {'SOURCE':<12}  {'EVENT':<36}  {'TYPE':<24}  {'STORED':<20}  DELIVERIES"]
    for r in rows:
        deliveries = " ".join(f"{sink}={st}" for sink, st in sorted(r["deliveries"].items())) or "-"
        lines.append(
            f"{r['row']:>8}  {r['source'][:12]:<12}  {r['id'][:36]:<36}  {r['type'][:24]:<24}  "
            f"{when(r['stored_at']):<20}  {deliveries}"
        )
    print("\n".join(lines))
    return 0


def cmd_saga(args: argparse.Namespace) -> int:
    """``integrand saga show ID``: the saga's stored record, step by step."""
    from .sagarunner import describe, find_sagas

    settings = load_lazily(args)
    ident = args.id

    async def do() -> int:
        async with _ops(settings, write=False) as ops:
            # A saga id names its saga (``…~NAME``); an event's SOURCE:ID finds the sagas the config runs for it.
            found = await find_sagas(ops.state_get, ident, [sg.name for sg in settings.sagas])
        if not found:
            raise NotFound(f"no saga {ident!r} in the store (a saga id looks like SOURCE:EVENT_ID~SAGA)")
        if args.json:
            return _json(found if len(found) > 1 else found[0])
        print("\n\n".join("\n".join(describe(rec)) for rec in found))
        return 0

    return _run(do)


# --- cursor, reconcile, auth (writes) ---------------------------------------------------------------


def cmd_cursor(args: argparse.Namespace) -> int:
    settings = load_lazily(args)
    cs = settings.sources.get(args.source)
    if cs is None or "poll" not in cs.cls.capabilities():
        print(f"error: no polling source named {args.source!r} in {settings.path}", file=sys.stderr)
        return 1
    value: Any = None
    if args.cursor_action == "set":
        try:
            value = orjson.loads(args.value)
        except orjson.JSONDecodeError:
            value = args.value  # a bare string such as an ISO timestamp

    async def do() -> int:
        async with _ops(settings, write=True) as ops:
            res = await ops.cursor_set(args.source, value)
        was = orjson.dumps(res["old"]).decode()
        if value is None:
            print(f"cursor of {args.source} reset (was {was}); the next poll starts from the beginning")
        else:
            print(f"cursor of {args.source} set to {orjson.dumps(value).decode()} (was {was})")
        return 0

    return _run(do)


def cmd_reconcile(args: argparse.Namespace) -> int:
    from .cliops import LocalOps, RemoteOps

    settings = load_lazily(args)
    cs = settings.sources.get(args.source)
    if cs is None or "reconcile" not in cs.cls.capabilities():
        print(f"error: no source named {args.source!r} that can reconcile in {settings.path}", file=sys.stderr)
        return 1

    async def do() -> int:
        async with _ops(settings, write=True) as ops:
            if isinstance(ops, RemoteOps):  # the daemon runs it with its own connector and secrets
                body: dict[str, Any] = {"full": args.full}
                if args.window is not None:
                    body["window"] = args.window
                print((await ops.reconcile(args.source, body))["report"])
                return 0
            # No daemon: this process holds the store's writer lock and needs the source's secrets.
            assert isinstance(ops, LocalOps)
            report = await _reconcile_here(settings, args, ops.store)
        print(report)
        return 0

    return _run(do)


async def _reconcile_here(settings: Settings, args: argparse.Namespace, store: Any) -> Any:
    from .app import ScopedState
    from .config import SourceCore
    from .logs import setup_logging
    from .poller import reconcile_once
    from .routes import Router

    setup_logging(settings.daemon.log_level, settings.daemon.log_format, settings.daemon.log_levels)
    cs = settings.sources[args.source]
    core = cs.core
    assert isinstance(core, SourceCore)
    window = None if args.full else (args.window if args.window is not None else core.poll.reconcile_window)
    ctx = ConnectorContext(
        name=args.source,
        role="source",
        base_dir=settings.base_dir,
        state=ScopedState(store, cs.state_scope),
    )
    inst = cs.cls(cs.options, ctx)
    await inst.start()
    try:
        return await reconcile_once(args.source, inst, store, Router(settings.routes, settings.sagas), window=window)
    finally:
        await inst.close()
        await ctx.http.pool.close()


class _OpsState:
    """A connector's state read and written through the daemon (or the locked store): ``integrand auth``."""

    def __init__(self, ops: Any, scope: str):
        self.ops = ops
        self.scope = scope

    async def get(self, key: str) -> Any:
        return await self.ops.state_get(self.scope, key)

    async def set(self, key: str, value: Any) -> None:
        await self.ops.state_set(self.scope, key, value)


def cmd_auth(args: argparse.Namespace) -> int:
    """Run a connector's one-time interactive authorization (e.g. OAuth) and store what it yields in its state."""
    settings = load_lazily(args)
    found = [(r, t[args.name]) for r, t in (("source", settings.sources), ("sink", settings.sinks)) if args.name in t]
    if args.role:
        found = [(r, cs) for r, cs in found if r == args.role]
    if not found:
        print(f"error: no source or sink named {args.name!r} in {settings.path}", file=sys.stderr)
        return 1
    if len(found) > 1:
        print(f"error: {args.name!r} is both a source and a sink; add --role source|sink", file=sys.stderr)
        return 1
    role, cs = found[0]

    async def do() -> int:
        async with _ops(settings, write=True) as ops:
            ctx = ConnectorContext(
                name=args.name,
                role=role,  # type: ignore[arg-type]
                base_dir=settings.base_dir,
                state=_OpsState(ops, cs.state_scope),
                public_url=settings.daemon.public_url,
            )
            inst = cs.cls(cs.options, ctx)
            authorize = getattr(inst, "authorize", None)
            if authorize is None:
                print(f"error: connector {cs.connector!r} has nothing to authorize", file=sys.stderr)
                return 1

            async def ask(prompt: str) -> str:
                return await asyncio.to_thread(input, prompt)

            def say(line: str) -> None:
                print(line, flush=True)

            await inst.start()
            try:
                message = await authorize(ask, say)
            except (AuthError, RetryableError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            finally:
                await inst.close()
                await ctx.http.pool.close()  # the context's private pool: no unclosed session at exit
            print(message)
            return 0

    return _run(do)
