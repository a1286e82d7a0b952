"""The error hierarchy, sorted by what the caller should do next.

Connectors translate provider failures into these at the edge, so the core never
has to know what a QuickBooks Fault or a HubSpot 429 looks like.
"""

from __future__ import annotations


class IntegrandError(Exception):
    """Base of every error integrand raises on purpose."""


class RetryableError(IntegrandError):
    """Try again later: the remote side is down, throttling, or timed out.

    ``retry_after`` (seconds) is the provider's own hint and overrides backoff.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, request_id: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.request_id = request_id


class PermanentError(IntegrandError):
    """Give up on this item: retrying the same input can never succeed."""

    def __init__(self, message: str, *, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


class AuthError(IntegrandError):
    """Re-authenticate: credentials are missing, expired or revoked; pause and alert."""

    def __init__(self, message: str, *, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


class ConfigError(IntegrandError):
    """The configuration is wrong; ``problems`` holds every ``key.path: message`` at once."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class PositionLost(IntegrandError):
    """A streaming source's resume position is gone upstream (retention passed, slot dropped): resync in full.

    ``position`` is the one that was asked for; ``detail`` says what the upstream still has.
    """

    def __init__(self, message: str, *, position: object = None, detail: str | None = None):
        super().__init__(message)
        self.position = position
        self.detail = detail


class LeaseLost(IntegrandError):
    """Stop this source here: another node holds its lease now (a newer fencing token), so this node's
    cursor, position or state commit was refused; nothing of it was stored."""

    def __init__(self, message: str, *, lease: str, token: int | None):
        super().__init__(message)
        self.lease = lease
        self.token = token


class StoreUnavailable(RetryableError):
    """The store could not commit (disk full, locked past the timeout); nothing was half-stored."""


class WebhookRejected(PermanentError):
    """An inbound webhook that must be refused with ``status`` and a reason the sender can act on."""

    status = 400

    def __init__(self, reason: str, *, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status


class SignatureError(WebhookRejected):
    """Missing or wrong signature, or a timestamp outside the replay window (401)."""

    status = 401


class PayloadError(WebhookRejected):
    """The body is not what the source accepts: malformed JSON, wrong shape (400)."""

    status = 400


class UnsupportedMediaType(WebhookRejected):
    """The Content-Type is not one the source parses (415)."""

    status = 415
