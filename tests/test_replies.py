"""A webhook source may shape its own answers (a SOAP ack): what ``reply`` sees and what is sent."""

from __future__ import annotations

import orjson
from aiohttp import web

from integrand.connector import Event, WebhookOutcome, WebhookReply, WebhookRequest, WebhookSource
from integrand.replies import shape_reply


class Plain(WebhookSource):
    def verify(self, request: WebhookRequest, now: float) -> None:
        pass

    def parse(self, request: WebhookRequest) -> list[Event]:
        return []


class Soapy(Plain):
    def __init__(self) -> None:
        self.seen: list[WebhookOutcome] = []

    def reply(self, outcome: WebhookOutcome) -> WebhookReply | None:
        self.seen.append(outcome)
        if outcome.status == 404:
            return None
        body = b"<Ack>true</Ack>" if outcome.committed else f"<fault>{outcome.reason}</fault>".encode()
        return WebhookReply(outcome.status, body, "text/xml", {"X-Shaped": "1"})


def _json(body: dict[str, object], status: int = 200, **headers: str) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def test_a_source_without_reply_keeps_integrands_answer() -> None:
    resp = _json({"accepted": 1, "duplicates": 0})
    assert shape_reply(Plain(), resp) is resp


def test_success_is_shaped_with_the_counts_after_the_commit() -> None:
    src = Soapy()
    out = shape_reply(src, _json({"accepted": 2, "duplicates": 1}))
    assert isinstance(out, web.Response)
    assert (out.status, out.body, out.content_type, out.headers["X-Shaped"]) == (
        200,
        b"<Ack>true</Ack>",
        "text/xml",
        "1",
    )
    assert src.seen == [WebhookOutcome(200, None, 2, 1, {})]


def test_refusals_keep_their_status_reason_retry_after_and_connection_close() -> None:
    src = Soapy()
    refused = _json({"error": "the event store cannot commit right now; retry later"}, 503, **{"Retry-After": "5"})
    refused.force_close()
    out = shape_reply(src, refused)
    assert out.status == 503 and out.headers["Retry-After"] == "5" and not out.keep_alive
    assert (
        isinstance(out, web.Response)
        and out.body == b"<fault>the event store cannot commit right now; retry later</fault>"
    )
    assert not src.seen[0].committed


def test_reply_none_or_a_failing_reply_leaves_integrands_answer() -> None:
    resp = _json({"error": "unknown"}, 404)
    assert shape_reply(Soapy(), resp) is resp

    class Broken(Plain):
        def reply(self, outcome: WebhookOutcome) -> WebhookReply | None:
            raise RuntimeError("bug")

    resp = _json({"accepted": 1, "duplicates": 0})
    assert shape_reply(Broken(), resp) is resp
