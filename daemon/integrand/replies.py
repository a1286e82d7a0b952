"""Webhook answers in the provider's own shape: the listener's JSON answer handed to the source's ``reply``.

Kept out of the listener so that the port's hot path stays as it is for every source that does not
override ``WebhookSource.reply`` (one identity check per request).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import orjson
from aiohttp import web

from .connector import WebhookOutcome, WebhookSource

log = logging.getLogger("integrand.listener")
_PASSED = ("Retry-After", "Allow")


def shapes_replies(connector: WebhookSource) -> bool:
    return type(connector).reply is not WebhookSource.reply


def shape_reply(connector: WebhookSource, resp: web.StreamResponse) -> web.StreamResponse:
    """``resp`` (integrand's JSON answer) as the connector wants it sent, or unchanged."""
    if not shapes_replies(connector) or not isinstance(resp, web.Response):
        return resp
    body: Any = {}
    with contextlib.suppress(orjson.JSONDecodeError):
        body = orjson.loads(resp.body) if isinstance(resp.body, bytes) and resp.body else {}
    body = body if isinstance(body, dict) else {}
    headers = {k: resp.headers[k] for k in _PASSED if k in resp.headers}
    outcome = WebhookOutcome(
        status=resp.status,
        reason=str(body["error"]) if "error" in body else None,
        accepted=int(body.get("accepted", 0) or 0),
        duplicates=int(body.get("duplicates", 0) or 0),
        headers=headers,
    )
    try:
        shaped = connector.reply(outcome)
    except Exception:
        log.exception("a connector's reply() failed; answering with integrand's own %d", resp.status)
        return resp
    if shaped is None:
        return resp
    out = web.Response(
        body=shaped.body, status=shaped.status, content_type=shaped.content_type, headers={**headers, **shaped.headers}
    )
    if not resp.keep_alive:
        out.force_close()
    return out
