"""systemd's notify protocol (``sd_notify(3)``): READY, STATUS, WATCHDOG, STOPPING, RELOADING datagrams.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op. The datagrams are small and the socket
is non-blocking, so a call never stalls the event loop; a lost datagram is dropped, as libsystemd does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("integrand.sdnotify")


class Notifier:
    """One datagram socket to systemd's ``$NOTIFY_SOCKET``, opened at construction."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        if self._addr:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            except OSError as e:  # pragma: no cover - only without AF_UNIX
                log.warning("cannot open the systemd notify socket: %s", e)
        self.watchdog_interval = watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False when it could not be sent (or no systemd)."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._addr)
        except OSError as e:
            log.debug("notify %s not sent: %s", fields[0] if fields else "", e)
            return False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload (systemd 253+) match this RELOADING=1 to the reload it asked for.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: finishing in-flight work")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` at half the configured interval, from the event loop itself: a loop that is
        stuck (a blocking call, a busy loop) stops the pings, and systemd restarts the service."""
        interval = self.watchdog_interval
        if interval is None or self._sock is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval / 2)


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """``$WATCHDOG_USEC`` in seconds when it is meant for this process (``$WATCHDOG_PID`` unset or ours)."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 1e6 if value > 0 else None


LISTEN_FDS_START = 3


def listen_fds(env: MutableMapping[str, str] | None = None, *, unset: bool = True) -> list[int]:
    """File descriptors systemd passed by socket activation (``$LISTEN_FDS``, ``sd_listen_fds(3)``).

    Only when ``$LISTEN_PID`` is this process; the variables are removed so that children do not
    take the sockets for theirs."""
    env = os.environ if env is None else env
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds
