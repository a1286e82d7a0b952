"""The CLI in an operator's shell beside a running daemon: through its admin socket, no secrets needed, no lost webhook.

The daemon's secrets are systemd credentials; the CLI runs as a real subprocess whose environment has no
``$CREDENTIALS_DIRECTORY`` (as in an operator's shell), so any secret it tried to read would fail it."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

import aiohttp
import pytest

from integrand.config import load_config

from .daemon_proc import jsonl_ids
from .fake_rest import FakeRest
from .helpers import DEMO_SECRET, hook_url, post_signed, running, wait_for, write_config
from .receiver import Receiver


async def integrand(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """The real CLI in a subprocess, in an environment without the service's credentials."""
    clean = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "integrand.cli", *args, stdout=PIPE, stderr=PIPE, env={**clean, **(env or {})}
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def config(api: str, receiver: Receiver) -> str:
    return f"""
[sources.demo]
connector = "webhook"
signature = "standard-webhooks"
secret = {{credential = "demo-secret"}}

[sources.crm]
connector = "http-poll"
url = "{api}/records?since={{since}}"
page_param = "after"
entity = "contact"
deleted = "$.archived"

[sources.crm.webhook]
signature = "standard-webhooks"
secret = {{credential = "crm-secret"}}
entity_id_field = "id"
version_field = "updated_at"

[sources.crm.poll]
enabled = false

[sinks.out]
connector = "jsonl"
path = "var/out.jsonl"

[sinks.picky]
connector = "http"
url = "{receiver.url}"

[[routes]]
from = "demo"
to = ["out"]

[[routes]]
from = "crm"
to = ["out", "picky"]
"""


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "demo-secret").write_text(DEMO_SECRET + "\n")
    (creds / "crm-secret").write_text(DEMO_SECRET + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))  # the daemon's (in-process) environment only
    return creds


async def test_cli_with_credential_secrets_beside_a_daemon_under_load(tmp_path: Path, credentials: Path) -> None:
    api = FakeRest(seed=5, page_size=5)
    base = await api.start()
    receiver = Receiver(per_event={"bad-1": [(400, {})]})
    await receiver.start()
    cfg = write_config(tmp_path, config(base, receiver))
    c = str(cfg)
    out = tmp_path / "var" / "out.jsonl"
    try:
        for i in range(12):
            await api.change(f"c{i}")  # changes the daemon never heard of: reconciliation finds them
        settings = load_config(cfg)
        async with running(settings) as d, aiohttp.ClientSession() as s:
            sock = tmp_path / "var" / "admin.sock"
            assert stat.S_ISSOCK(sock.stat().st_mode)
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            assert (await post_signed(s, hook_url(d, "crm"), {"type": "t", "n": 0}, "bad-1"))[0] == 200
            await wait_for(lambda: _dead(d), timeout=10)
            dead_id = (await d.store.dead_letters())[0].id

            # Before the load: the read commands answer from the daemon, with none of its secrets.
            rc, text, err = await integrand("status", "-c", c)
            assert rc == 0, err
            assert "no daemon running" not in text and "sink picky:" in text and "breaker closed" in text
            rc, text, err = await integrand("dlq", "list", "-c", c)
            assert rc == 0, err
            assert "bad-1" in text and "HTTP 400" in text
            # A command that does need a secret says which one it cannot read, in one line per problem.
            body = tmp_path / "body.json"
            body.write_text('{"type": "from.shell"}')
            rc, text, err = await integrand("send", "demo", str(body), "-c", c, "--id", "from-shell")
            assert rc == 1 and "Traceback" not in err
            assert "secret credential:demo-secret: credential demo-secret needs $CREDENTIALS_DIRECTORY" in err
            rc, text, err = await integrand(
                "send",
                "demo",
                str(body),
                "-c",
                c,
                "--id",
                "from-shell",
                "--url",
                hook_url(d),
                env={"CREDENTIALS_DIRECTORY": str(credentials)},
            )
            assert (rc, text.split(":")[0]) == (0, "200 OK"), err

            stop = asyncio.Event()
            load = asyncio.create_task(steady_load(hook_url(d), stop))
            await wait_for(lambda: len(jsonl_ids(out)) > 50, timeout=20)  # the load is flowing
            rc, text, err = await integrand("reconcile", "crm", "-c", c)
            assert rc == 0, err
            assert text.strip() == "reconcile: source=crm checked=12 missed=12 stale=0 deleted=0"
            rc, text, err = await integrand("dlq", "replay", str(dead_id), "-c", c)
            assert (rc, text.strip()) == (0, "replayed 1 dead-lettered delivery"), err
            rc, text, err = await integrand("cursor", "set", "crm", '"2026-01-01T00:00:00Z"', "-c", c)
            assert (rc, text.strip()) == (0, 'cursor of crm set to "2026-01-01T00:00:00Z" (was null)'), err
            assert not load.done(), "the CLI ran while webhooks were still arriving"
            stop.set()
            acked, failed = await load

            assert failed == [], f"{len(failed)} webhooks failed beside the CLI: {failed[:5]}"
            ids = set(acked)
            assert len(ids) > 200
            assert await d.store.cursor_get("crm") == "2026-01-01T00:00:00Z"
            await wait_for(lambda: any(e["id"] == "bad-1" for e in receiver.delivered()), timeout=60)
            await wait_for(lambda: ids <= set(jsonl_ids(out)), timeout=60)
            await wait_for(
                lambda: len(jsonl_ids(out)) == len(ids) + 2 + 12, timeout=60
            )  # + bad-1, from-shell, reconciled
        # The socket goes with the daemon.
        assert not (tmp_path / "var" / "admin.sock").exists()

        # No daemon: reads open the store themselves, still without the secrets; writes take its lock.
        rc, text, err = await integrand("status", "-c", c)
        assert rc == 0, err
        assert "(no daemon running)" in text
        rc, text, err = await integrand("cursor", "reset", "crm", "-c", c)
        assert (rc, text.strip()) == (
            0,
            'cursor of crm reset (was "2026-01-01T00:00:00Z"); the next poll starts from the beginning',
        ), err
    finally:
        await receiver.stop()
        await api.close()


async def steady_load(url: str, stop: asyncio.Event, workers: int = 16) -> tuple[list[str], list[str]]:
    """Signed webhooks back to back from ``workers`` senders until ``stop``: (acknowledged ids, failures)."""
    acked: list[str] = []
    failed: list[str] = []
    counter = iter(range(10**9))

    async def worker(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            msg_id = f"load-{next(counter)}"
            try:
                status, _ = await post_signed(session, url, {"type": "load", "id": msg_id}, msg_id)
            except (TimeoutError, aiohttp.ClientError) as e:
                failed.append(f"{msg_id}: {e!r}")
                continue
            (acked if status == 200 else failed).append(msg_id if status == 200 else f"{msg_id}: {status}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        await asyncio.gather(*(worker(session) for _ in range(workers)))
    return acked, failed


async def _dead(d: object) -> bool:
    from integrand.app import Daemon

    assert isinstance(d, Daemon)
    return len(await d.store.dead_letters()) == 1


async def test_a_write_beside_a_daemon_without_its_socket_is_refused_with_the_reason(
    tmp_path: Path, credentials: Path
) -> None:
    api = FakeRest(seed=1)
    base = await api.start()
    receiver = Receiver()
    await receiver.start()
    cfg = write_config(tmp_path, config(base, receiver))
    cfg.write_text(cfg.read_text().replace("[admin]\n", '[admin]\nsocket = ""\n'))  # no way in for the CLI
    try:
        settings = load_config(cfg)
        assert settings.admin_socket is None
        async with running(settings):
            rc, _, err = await integrand("dlq", "replay", "--all", "-c", str(cfg))
            assert rc == 1
            assert err.strip() == (
                f"error: a daemon is running on {tmp_path / 'var' / 'integrand.db'}, but its admin socket is turned "
                "off ([admin] socket); write commands go through the running daemon"
            )
            rc, _, err = await integrand("status", "-c", str(cfg))  # reading beside it is fine
            assert rc == 0, err
    finally:
        await receiver.stop()
        await api.close()


async def test_dlq_show_into_a_closed_pipe_has_no_traceback(tmp_path: Path, credentials: Path) -> None:
    receiver = Receiver(status=400)
    await receiver.start()
    api = FakeRest(seed=2)
    base = await api.start()
    cfg = write_config(tmp_path, config(base, receiver))
    try:
        async with running(load_config(cfg)) as d, aiohttp.ClientSession() as s:
            big = {"type": "t", "blob": "x" * 300_000}  # more than a pipe holds: the writer meets the closed end
            assert (await post_signed(s, hook_url(d, "crm"), big, "big-1"))[0] == 200
            await wait_for(lambda: _dead(d), timeout=10)
            dead_id = (await d.store.dead_letters())[0].id
        clean = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
        for ident in (str(dead_id), "big-1"):  # by number, and by the provider's id
            proc = await asyncio.create_subprocess_shell(
                f"{sys.executable} -m integrand.cli dlq show {ident} -c {cfg} | head -1",
                stdout=PIPE,
                stderr=PIPE,
                env=clean,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert out.decode().startswith(f"delivery {dead_id} to sink picky: dead, 1 attempt(s)")
            assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    finally:
        await receiver.stop()
        await api.close()


def test_config_errors_name_the_admin_keys(tmp_path: Path) -> None:
    from integrand.errors import ConfigError

    cfg = write_config(tmp_path, "", base='[admin]\nlisten = "0.0.0.0:8081"\n')
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert e.value.problems == [
        "admin.token: required when admin.listen (0.0.0.0:8081) is not a loopback address "
        '(give a secret reference such as {credential = "admin-token"})'
    ]
    cfg.write_text('[admin]\nlisten = "0.0.0.0:8081"\ntoken = {env = "NO_SUCH_VAR_FOR_INTEGRAND"}\n')
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert e.value.problems == ["admin.token: environment variable NO_SUCH_VAR_FOR_INTEGRAND is not set"]
    settings = load_config(cfg, lazy_secrets=True)  # the CLI: read only when used
    assert settings.admin.token is not None
    with pytest.raises(ConfigError) as e:
        settings.admin.token.reveal()
    assert e.value.problems == [
        "secret env:NO_SUCH_VAR_FOR_INTEGRAND: environment variable NO_SUCH_VAR_FOR_INTEGRAND is not set"
    ]


async def test_a_root_cli_write_gives_the_service_its_files_back(tmp_path: Path) -> None:
    """Run as root (sudo) beside a store the service's user owns: nothing it leaves is root's."""
    if os.geteuid() != 0:
        raise AssertionError(
            "this test checks file ownership after a root CLI write: run the suite as root, as CI does"
        )
    from integrand.store import Store

    cfg = write_config(tmp_path, config("http://127.0.0.1:9/unused", Receiver()))
    db = tmp_path / "var" / "integrand.db"
    store = Store(db)
    await store.open()
    await store.close()
    hand_to_service(db)
    rc, _, err = await integrand("cursor", "set", "crm", '"2026-02-01T00:00:00Z"', "-c", str(cfg))
    assert rc == 0, err
    left = owners(db)
    assert "integrand.db.lock" in left
    assert left == dict.fromkeys(left, 4321)


def hand_to_service(db: Path) -> None:
    Path(f"{db}.lock").unlink()  # as if the service had never run with this lock file
    for f in db.parent.iterdir():
        os.chown(f, 4321, 4321)


def owners(db: Path) -> dict[str, int]:
    return {f.name: f.stat().st_uid for f in db.parent.iterdir() if f.name.startswith("integrand.db")}
