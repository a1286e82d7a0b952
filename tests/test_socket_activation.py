"""Socket activation: integrand serves the socket systemd passes (LISTEN_FDS), so the port stays open
while it restarts; a webhook sent in between waits in the backlog and is answered by the next process."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import aiohttp
import orjson

from .daemon_proc import DaemonProcess, jsonl_ids
from .helpers import BASE, DEMO, signed_headers, wait_for, write_config

# What systemd does between fork and exec: the socket at fd 3, LISTEN_FDS=1, LISTEN_PID=the child.
ACTIVATED = """
import os, sys
fd = int(os.environ.pop("TEST_LISTEN_FD"))
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
from integrand import cli
sys.exit(cli.main(sys.argv[1:]))
"""


async def post(port: int, msg_id: str) -> int:
    body = orjson.dumps({"type": "t.x", "n": msg_id})
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.post(f"http://127.0.0.1:{port}/hooks/demo", data=body, headers=signed_headers(body, msg_id)) as resp,
    ):
        return resp.status


async def test_port_stays_open_across_a_restart(tmp_path: Path) -> None:
    # listen on port 0 in the config: it must not be used; the passed socket is.
    config = write_config(tmp_path, DEMO, BASE)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    env = {"TEST_LISTEN_FD": str(fd)}
    log = tmp_path / "log"
    first = DaemonProcess(config, log, env=env, python=("-c", ACTIVATED), pass_fds=(fd,))
    second = DaemonProcess(config, log, env=env, python=("-c", ACTIVATED), pass_fds=(fd,))
    try:
        await first.start()
        assert first.port == port
        assert "webhook socket from systemd" in first.output()
        assert await post(port, "before") == 200

        first.signal(signal.SIGTERM)
        assert await first.wait() == 0
        # Nothing runs now, but the port is open: the connection is accepted by the kernel, the whole
        # request is written, and the answer comes from the next process.
        body = orjson.dumps({"type": "t.x", "n": "during"})
        head = "".join(f"{k}: {v}\r\n" for k, v in signed_headers(body, "during").items())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"POST /hooks/demo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n{head}"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        await second.start()
        status_line = await asyncio.wait_for(reader.readline(), 60)
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 200"), status_line
        await wait_for(lambda: set(jsonl_ids(tmp_path / "var" / "out.jsonl")) == {"before", "during"}, timeout=30)
        second.signal(signal.SIGTERM)
        assert await second.wait() == 0
    finally:
        await first.kill()
        await second.kill()
        listener.close()
