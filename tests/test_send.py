"""`integrand send` signs with the source's own scheme and posts to the daemon."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from .helpers import hook_url, read_jsonl, running, settings_for, wait_for, write_config


async def integrand(*args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "integrand.cli",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_send_signs_and_dedups(tmp_path: Path) -> None:
    cfg = str(write_config(tmp_path))
    body = tmp_path / "event.json"
    body.write_text('{"type": "customer.created", "data": {"id": "c_1"}}')
    async with running(settings_for(tmp_path)) as d:
        url = hook_url(d)
        rc, out, _ = await integrand("send", "demo", str(body), "--config", cfg, "--url", url, "--id", "msg_a")
        assert (rc, out.strip()) == (0, '200 OK: {"accepted":1,"duplicates":0}')
        rc, out, _ = await integrand("send", "demo", "--config", cfg, "--url", url, "--id", "msg_a", stdin=b"{}")
        assert (rc, out.strip()) == (0, '200 OK: {"accepted":0,"duplicates":1}')
        rc, out, _ = await integrand("send", "demo", "--config", cfg, "--url", url, stdin=b"{not json")
        assert rc == 1
        assert out.startswith("400 Bad Request")
        await wait_for(lambda: len(read_jsonl(tmp_path / "var" / "out.jsonl")) == 1)
    [line] = read_jsonl(tmp_path / "var" / "out.jsonl")
    assert (line["id"], line["type"]) == ("msg_a", "customer.created")


async def test_send_to_an_unknown_source_or_a_stopped_daemon(tmp_path: Path) -> None:
    cfg = str(write_config(tmp_path))
    rc, _, err = await integrand("send", "nope", "--config", cfg, stdin=b"{}")
    assert rc == 1
    assert "no source named 'nope'" in err
    rc, _, err = await integrand("send", "demo", "--config", cfg, "--url", "http://127.0.0.1:9/hooks/demo", stdin=b"{}")
    assert rc == 1
    assert "cannot reach" in err
