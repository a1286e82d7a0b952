"""CPU per connection in the webhook port's guard, without the kernel: what an idle flood costs the daemon's
Python per connection it accepts, holds and evicts (the part this code decides; accept() itself is uvloop's C).

    .venv/bin/python bench/guard_cost.py [--connections 50000]
    PYTHONPATH=/path/to/other/checkout/daemon .venv/bin/python bench/guard_cost.py   # the same on other code

A fake transport (no socket) is handed to the server's protocol factory as uvloop would: a full port (cap 64)
where every new connection evicts the oldest silent one, then the loop runs the closes. Process CPU time over
the run divided by connections, median of ``--runs``; the result is a CPU figure, so it can be taken on a
busy machine."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from typing import Any

import uvloop


class FakeTransport:
    """Enough of a uvloop TCPTransport for the guard and aiohttp: no socket, closes on the next loop turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: str):
        self.loop, self.peer, self.protocol, self.closing = loop, peer, None, False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 40000) if name == "peername" else default

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)  # type: ignore[union-attr]

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def run(connections: int, cap: int) -> float:
    from integrand.guard import GuardedServer, PortLimits, QuietLog

    async def handler(request: Any) -> Any:  # never reached: no request is sent
        raise AssertionError

    loop = asyncio.get_running_loop()
    quiet = QuietLog(logging.getLogger("guard_cost"))
    srv = GuardedServer(
        handler, limits=PortLimits(max_connections=cap, max_connections_per_ip=10**9), quiet=quiet, access_log=None
    )
    srv.cap = cap  # whatever the fd limit here: the port is full after `cap` connections
    started = time.process_time()
    for i in range(connections):
        t = FakeTransport(loop, f"10.0.{i % 10}.1")
        p = srv()
        t.protocol = p
        p.connection_made(t)  # type: ignore[arg-type]
        if i % 32 == 31:
            await asyncio.sleep(0)  # the loop runs the closes and the handlers' tasks, as between reads
    for _ in range(5):
        await asyncio.sleep(0)
    return (time.process_time() - started) / connections * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cap", type=int, default=64)
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # the quiet log's lines are not what is measured
    per = [uvloop.run(run(args.connections, args.cap)) for _ in range(args.runs)]
    import integrand.guard

    print(
        json.dumps(
            {
                "code": integrand.guard.__file__,
                "us_per_connection_runs": [round(x, 2) for x in per],
                "us_per_connection_median": round(statistics.median(per), 2),
                "connections": args.connections,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
