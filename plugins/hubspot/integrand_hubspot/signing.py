"""HubSpot's webhook signatures, v3 (current) and v1/v2 (older apps).

https://developers.hubspot.com/docs/api/webhooks/validating-requests and the SDK vectors in
/work/shared/reference/third-party-apis.md ("Webhook signatures").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import unquote


def v3(secret: str, method: str, uri: str, body: bytes, timestamp: str) -> str:
    """base64 HMAC-SHA256(client secret, method + uri + body + timestamp); the uri is URL-decoded first."""
    # HubSpot decodes URL-encoded characters of the URI (except the '?' that starts the query) before signing.
    source = method.upper().encode() + unquote(uri).encode() + body + timestamp.encode()
    return base64.b64encode(hmac.new(secret.encode(), source, hashlib.sha256).digest()).decode()


def v2(secret: str, method: str, uri: str, body: bytes) -> str:
    """hex SHA-256 of client secret + method + uri + body."""
    return hashlib.sha256(secret.encode() + method.upper().encode() + uri.encode() + body).hexdigest()


def v1(secret: str, body: bytes) -> str:
    """hex SHA-256 of client secret + body."""
    return hashlib.sha256(secret.encode() + body).hexdigest()
