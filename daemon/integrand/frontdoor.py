"""What the webhook port wraps around the listener: no software banner, and the client's address from
``X-Forwarded-For`` and the request's ``X-Request-Id`` when (and only when) the peer is a proxy the
operator listed as trusted."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# aiohttp sends "Server: Python/3.11 aiohttp/3.x" unless told otherwise: a version list for scanners.
SERVER = "integrand"
REQUEST_ID = "request_id"  # the key of a request's id in the aiohttp request's mapping (listener.py reads it)
# What a proxy's request id may look like to be kept (a UUID, a hex string, AWS's Root=…;…): anything else,
# or anything longer, is replaced by integrand's own (it ends up in logs, the store and a response header).
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:;=/+@-]{1,128}")


def parse_networks(items: Sequence[str]) -> list[Network]:
    return [ipaddress.ip_network(i, strict=False) for i in items]


def _trusted(addr: str | None, networks: Sequence[Network]) -> bool:
    if not addr:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in n for n in networks)


def client_address(remote: str | None, forwarded_for: Sequence[str], networks: Sequence[Network]) -> str | None:
    """The first address, from the right of the ``X-Forwarded-For`` chain, that is not a trusted proxy.

    Only the peer and the proxies we trust can be believed: a client can put anything at the left of
    the header, so the chain is read from the right and stops at the first untrusted hop."""
    if not _trusted(remote, networks):
        return remote
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    addr = remote
    for hop in reversed(hops):
        addr = hop
        if not _trusted(hop, networks):
            break
    return addr


def front_door(handler: Handler, trusted_proxies: Sequence[str] = ()) -> Handler:
    networks = parse_networks(trusted_proxies)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if networks and _trusted(request.remote, networks):
            rid = request.headers.get("X-Request-Id")
            if "X-Forwarded-For" in request.headers:
                real = client_address(request.remote, request.headers.getall("X-Forwarded-For"), networks)
                if real is not None and real != request.remote:
                    request = request.clone(remote=real)
            if rid is not None and _REQUEST_ID_OK.fullmatch(rid):
                request[REQUEST_ID] = rid  # the proxy's: its logs and ours name the request alike
        resp = await handler(request)
        resp.headers["Server"] = SERVER
        return resp

    return handle
