"""``integrand run | check | send | auth | dlq | status | cursor | reconcile | plugins`` — the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from . import __version__, gcpolicy
from .config import Settings, config_path, load_config
from .connector import ConnectorContext, WebhookSource
from .errors import ConfigError, StoreUnavailable
from .logs import setup_logging
from .opcmds import cmd_auth, cmd_cursor, cmd_dlq, cmd_events, cmd_reconcile, cmd_saga, cmd_status, load_lazily
from .plugins import Registry
from .types import parse_duration

T = TypeVar("T")
log = logging.getLogger("integrand")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _load(args: argparse.Namespace) -> Settings:
    return load_config(config_path(args.config))


# --- run ----------------------------------------------------------------------------------------

GIL_SWITCH_INTERVAL = 0.0005  # seconds; see cmd_run


def cmd_run(args: argparse.Namespace) -> int:
    from .paths import check_paths

    os.umask(0o077)  # everything the daemon creates (database, WAL, sink files) is its user's alone
    settings = _load(args)
    setup_logging(settings.daemon.log_level, settings.daemon.log_format, settings.daemon.log_levels)
    paths = check_paths(settings)
    for w in (*settings.warnings, *paths.warnings):
        log.warning("%s", w)
    if paths.errors:
        log.error("cannot start: %s", "; ".join(paths.errors))
        return 1
    from .guard import raise_nofile_limit

    soft, _ = raise_nofile_limit()  # idle clients must not run the port out of fds at systemd's soft 1,024
    log.debug("open-file limit %d", soft)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        pass
    # The store's COMMIT runs on a thread, which needs the GIL to start and again after the fsync. A busy
    # loop gives it up only when the switch interval forces it (5 ms by default), so each hand-off waited
    # about a millisecond, twice per group commit; at 0.5 ms ingest-only throughput rose ~14% (docs/benchmarks.md).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    from .app import Daemon, DaemonFailed, run

    async def main() -> None:
        loop = asyncio.get_running_loop()
        holder: dict[str, Daemon] = {}
        signals_seen = 0

        def on_signal(signame: str) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen == 1:
                log.info("%s received; shutting down (send it again to exit at once)", signame)
                if "d" in holder:
                    holder["d"].stop()
            else:
                # Everything acknowledged is already committed; leased deliveries are released on next start.
                log.warning("%s received again; exiting now", signame)
                logging.shutdown()
                os._exit(130)

        def on_hup() -> None:
            if "d" in holder:
                log.info("SIGHUP received; reloading %s", settings.path)
                holder["d"].request_reload()
            else:
                log.warning("SIGHUP received while starting; not reloaded (send it again once ready)")

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        loop.add_signal_handler(signal.SIGHUP, on_hup)

        def ready(d: Daemon) -> None:
            holder["d"] = d
            if signals_seen:
                d.stop()
            gcpolicy.freeze()  # what startup built is skipped by full collections (gcpolicy: why)

        await run(settings, on_ready=ready)

    # Every way out of a running daemon that is not a requested stop is one line and a non-zero status,
    # so systemd's Restart=on-failure restarts it.
    try:
        asyncio.run(main())
    except (StoreUnavailable, DaemonFailed) as e:
        log.error("exiting with status 1: %s", e)
        return 1
    except ConfigError as e:
        log.error("cannot start: %s", "; ".join(e.problems))
        return 1
    finally:
        logging.shutdown()
    return 0


# --- check --------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    import tomllib

    from .paths import check_paths, relative_keys

    path = config_path(args.config)
    unchecked: list[str] = []
    try:
        s = load_config(path)
    except ConfigError as e:
        # In an operator's shell, credentials exist only under systemd (ExecStartPre=integrand check reads
        # them there): check everything else and say which secrets were not read, rather than fail.
        unchecked = [p for p in e.problems if "needs $CREDENTIALS_DIRECTORY" in p]
        if len(unchecked) < len(e.problems) or os.environ.get("CREDENTIALS_DIRECTORY"):
            print(f"{path}: {len(e.problems)} problem(s):", file=sys.stderr)
            for p in e.problems:
                print(f"  {p}", file=sys.stderr)
            return 1
        s = load_config(path, lazy_secrets=True)
    paths = check_paths(s, raw_relative=relative_keys(tomllib.loads(path.read_text(encoding="utf-8"))))
    for p in unchecked:
        print(f"warning: {p}: not read here; the unit's ExecStartPre=integrand check reads it", file=sys.stderr)
    for w in (*s.warnings, *paths.warnings):
        print(f"warning: {w}", file=sys.stderr)
    if paths.errors:
        print(f"{path}: {len(paths.errors)} problem(s):", file=sys.stderr)
        for p in paths.errors:
            print(f"  {p}", file=sys.stderr)
        return 1
    # The DSN is a secret (it may carry a password): name where it comes from, never what it is.
    dsn = s.store.dsn
    store = f"postgres (store.dsn from {dsn.origin})" if s.store.backend == "postgres" and dsn else s.db_path
    print(
        f"{path}: OK — {len(s.sources)} source(s), {len(s.sinks)} sink(s), {len(s.routes)} route(s); "
        f"webhooks on {s.daemon.listen}, store {store}"
    )
    return 0


# --- send ---------------------------------------------------------------------------------------


def cmd_send(args: argparse.Namespace) -> int:
    settings = load_lazily(args)  # only this source's secret is read (to sign), not every secret
    cs = settings.sources.get(args.source)
    if cs is None:
        print(f"error: no source named {args.source!r} in {settings.path}", file=sys.stderr)
        return 1
    body = sys.stdin.buffer.read() if args.file in (None, "-") else Path(args.file).read_bytes()
    ctx = ConnectorContext(
        name=args.source, role="source", base_dir=settings.base_dir, state=_NoState(), public_url=None
    )
    inst = cs.cls(cs.options, ctx)
    if not isinstance(inst, WebhookSource):
        print(f"error: source {args.source!r} does not accept webhooks", file=sys.stderr)
        return 1
    delivery_id = args.id or f"msg_{uuid.uuid4().hex}"
    headers = inst.sign(body, time.time(), delivery_id)
    if headers is None:
        print(f"error: connector {cs.connector!r} cannot sign test webhooks", file=sys.stderr)
        return 1
    headers = {"Content-Type": args.content_type, **headers}
    for h in args.header or []:
        k, _, v = h.partition(":")
        headers[k.strip()] = v.strip()
    host = settings.daemon.listen.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - we connect, we do not bind
        host = "127.0.0.1"
    url = args.url or f"http://{host}:{settings.daemon.listen.port}/hooks/{args.source}"
    if args.url and not urlsplit(args.url).path.rstrip("/").endswith(f"/hooks/{args.source}"):
        print(
            f"error: --url needs the full webhook URL of the source, ending in /hooks/{args.source} "
            f"(e.g. http://{host}:{settings.daemon.listen.port}/hooks/{args.source}); got {args.url}",
            file=sys.stderr,
        )
        return 2

    async def post() -> int:
        import aiohttp

        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
                session.post(url, data=body, headers=headers) as resp,
            ):
                text = await resp.text()
                print(f"{resp.status} {resp.reason}: {text.strip()}")
                return 0 if 200 <= resp.status < 300 else 1
        except aiohttp.ClientError as e:
            print(f"error: cannot reach {url}: {e} (is `integrand run` running?)", file=sys.stderr)
            return 1

    return asyncio.run(post())


class _NoState:
    async def get(self, key: str) -> Any:
        return None

    async def set(self, key: str, value: Any) -> None:
        return None


def cmd_plugins(args: argparse.Namespace) -> int:
    infos = Registry.default().describe()
    broken = 0
    for i in infos:
        origin = f"{i.distribution} {i.version}" if i.distribution else "?"
        if i.error:
            broken += 1
            print(f"{i.name:<14} {origin:<24} BROKEN: {i.error}")
        else:
            print(f"{i.name:<14} {origin:<24} {','.join(i.capabilities):<18} keys: {', '.join(i.config_keys)}")
    return 1 if broken else 0


# --- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="integrand",
        description="Webhooks and polling in, a durable SQLite queue, sinks out.",
    )
    p.add_argument("--version", action="version", version=f"integrand {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--config",
            "-c",
            metavar="FILE",
            help="config file (default: $INTEGRAND_CONFIG, then ./config.toml)",
        )
        return sp

    with_config(sub.add_parser("run", help="run the daemon in the foreground")).set_defaults(fn=cmd_run)
    with_config(sub.add_parser("check", help="validate the config and print every problem")).set_defaults(fn=cmd_check)

    sp = with_config(sub.add_parser("send", help="sign a JSON body with a source's scheme and POST it"))
    sp.add_argument("source", help="the source to send to (a [sources.NAME] table)")
    sp.add_argument("file", nargs="?", help="JSON file to send (default: standard input)")
    sp.add_argument(
        "--url",
        help="the full webhook URL to POST to, http://HOST:PORT/hooks/SOURCE (default: the daemon's listen address)",
    )
    sp.add_argument("--id", help="delivery id (default: a new random one)")
    sp.add_argument("--content-type", default="application/json")
    sp.add_argument("-H", "--header", action="append", metavar="'NAME: VALUE'", help="extra header (repeatable)")
    sp.set_defaults(fn=cmd_send)

    sp = with_config(
        sub.add_parser("auth", help="authorize a connector once (e.g. an OAuth consent) and store its tokens")
    )
    sp.add_argument("name", help="the source or sink to authorize")
    sp.add_argument("--role", choices=("source", "sink"), help="when a source and a sink share the name")
    sp.set_defaults(fn=cmd_auth)

    dlq = sub.add_parser("dlq", help="inspect and replay the dead-letter queue")
    dsub = dlq.add_subparsers(dest="dlq_action", required=True, metavar="ACTION")
    d = with_config(dsub.add_parser("list", help="one line per dead-lettered delivery"))
    d.add_argument("--sink")
    d.add_argument("--limit", type=int, default=1000)
    d.add_argument("--json", action="store_true", help="print the admin API's JSON answer")
    d = with_config(dsub.add_parser("show", help="one delivery with its event and history"))
    d.add_argument("id", help="the delivery's number, or the provider's event id (that event's dead deliveries)")
    d.add_argument("--json", action="store_true", help="print the admin API's JSON answer")
    for name, what in (("replay", "make deliveries ready again, attempts reset"), ("purge", "drop for good")):
        d = with_config(dsub.add_parser(name, help=what))
        d.add_argument("ids", type=int, nargs="*", metavar="ID")
        d.add_argument("--all", action="store_true", help="every dead-lettered delivery (with --sink: of that sink)")
        d.add_argument("--sink")
        if name == "replay":
            d.add_argument(
                "--include-superseded",
                action="store_true",
                help="also replay deliveries whose entity has since been seen at a newer version",
            )
    dlq.set_defaults(fn=cmd_dlq)

    st = with_config(sub.add_parser("status", help="queue depth per sink and recent refused webhooks"))
    st.add_argument("--json", action="store_true", help="print the admin API's JSON answer")
    st.set_defaults(fn=cmd_status)
    ev = sub.add_parser("events", help="find events and tell one event's story")
    esub = ev.add_subparsers(dest="events_action", required=True, metavar="ACTION")
    e = with_config(esub.add_parser("show", help="received, routed, each attempt, delivered or dead, replayed"))
    e.add_argument("id", help="integrand's event number, the provider's delivery id, or SOURCE:ID")
    e.add_argument("--json", action="store_true", help="print the admin API's JSON answer")
    e = with_config(esub.add_parser("list", help="newest events first, with each delivery's state"))
    e.add_argument("--source", help="only this source's events")
    e.add_argument("--since", metavar="DURATION", help="only events stored this recently (e.g. 1h, 30m, 2d)")
    e.add_argument(
        "--state",
        choices=("ready", "leased", "done", "dead", "pending"),
        help="only events with a delivery in this state (pending = ready or leased)",
    )
    e.add_argument("--limit", type=int, default=100)
    e.add_argument("--json", action="store_true", help="print the admin API's JSON answer")
    ev.set_defaults(fn=cmd_events)
    sg = sub.add_parser("saga", help="a multi-step route's story: steps, outcomes, compensations")
    sgsub = sg.add_subparsers(dest="saga_action", required=True, metavar="ACTION")
    e = with_config(sgsub.add_parser("show", help="each step and compensation with its outcome"))
    e.add_argument("id", help="the saga id (SOURCE:EVENT_ID~SAGA, as in its dead letter), or SOURCE:EVENT_ID")
    e.add_argument("--json", action="store_true", help="print the saga's stored record")
    sg.set_defaults(fn=cmd_saga)
    cur = sub.add_parser("cursor", help="set or reset a polling source's cursor")
    csub = cur.add_subparsers(dest="cursor_action", required=True, metavar="ACTION")
    c = with_config(
        csub.add_parser("set", help="set the cursor (JSON, or a bare string); takes effect at the next poll")
    )
    c.add_argument("source")
    c.add_argument("value")
    c = with_config(csub.add_parser("reset", help="forget the cursor: the next poll backfills from the beginning"))
    c.add_argument("source")
    cur.set_defaults(fn=cmd_cursor)

    sp = with_config(sub.add_parser("reconcile", help="run one reconciliation pass for a polling source now"))
    sp.add_argument("source")
    sp.add_argument("--full", action="store_true", help="compare the full remote state, not the configured window")
    sp.add_argument(
        "--window", type=parse_duration, help="look back this far (e.g. 2d) instead of the configured window"
    )
    sp.set_defaults(fn=cmd_reconcile)
    sub.add_parser("plugins", help="list installed connectors").set_defaults(fn=cmd_plugins)
    from .commands import add_plugin_commands  # `integrand sync`, `integrand postgres …`: see commands.py

    add_plugin_commands(sub, with_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = int(args.fn(args))
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler below
        return rc
    except BrokenPipeError:
        # `integrand dlq show 2 | head`: the reader left. Say nothing, and keep the interpreter's own
        # flush at exit from raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # what a shell reports for a command killed by SIGPIPE
    except ConfigError as e:
        print(f"{config_path(getattr(args, 'config', None))}: {len(e.problems)} problem(s):", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    except StoreUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def entry() -> None:
    """The ``integrand`` executable. After ``run`` everything is closed, flushed and logged, so the
    interpreter's teardown (freeing every module and object: half a second to two on a busy machine,
    with nothing left to do) is skipped and the exit is as prompt as the "stopped" line."""
    argv = sys.argv[1:]
    code = main(argv)
    if argv[:1] == ["run"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
