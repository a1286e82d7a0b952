"""Webhook signature schemes as pure functions: sign, and verify in constant time.

Each follows the provider's published spec (see docs/webhooks.md for sources and
test vectors). ``verify_*`` raise SignatureError with a reason safe to return to
the sender; they never reveal the expected value.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
from collections.abc import Mapping, Sequence

from .errors import SignatureError

DEFAULT_TOLERANCE = 300.0


_BLOCK = 64  # SHA-256's block size in bytes
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


@functools.lru_cache(maxsize=256)
def _keyed(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """SHA-256 states that have absorbed key⊕ipad and key⊕opad (RFC 2104), made once per key.

    hmac.digest looks the algorithm up and keys a new OpenSSL MAC on every call, which costs
    twice the hashing of a 1 KiB body; copying these two states costs next to nothing."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD))


def _hmac(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA256 (equal to ``hmac.digest(key, msg, "sha256")``, which a property test checks)."""
    inner_state, outer_state = _keyed(key)
    inner = inner_state.copy()
    inner.update(msg)
    outer = outer_state.copy()
    outer.update(inner.digest())
    return outer.digest()


def _any_match(candidates: Sequence[bytes], expected: Sequence[bytes]) -> bool:
    """Constant-time per comparison; every pair is compared so timing does not say which matched."""
    ok = False
    for c in candidates:
        for e in expected:
            ok |= hmac.compare_digest(c, e)
    return ok


def _check_time(ts_text: str | None, now: float, tolerance: float, header: str) -> int:
    if ts_text is None:
        raise SignatureError(f"missing {header} header")
    try:
        ts = int(ts_text.strip())
    except ValueError:
        raise SignatureError(f"{header} is not an integer timestamp") from None
    if abs(now - ts) > tolerance:
        raise SignatureError(f"{header} is outside the {int(tolerance)} s replay window")
    return ts


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if not value:
        raise SignatureError(f"missing {name} header")
    return value


# --- Standard Webhooks (https://www.standardwebhooks.com, spec v1) -------------------------


# The spec: "the secret key SHOULD be random and between 24 bytes (192 bits) and 64 bytes (512 bits)".
# 24 is its floor and what Svix issues, so a shorter key is a configuration mistake, not a choice. Longer
# keys are only unusual (HMAC hashes a key over 64 bytes), so no upper bound is enforced.
STANDARD_MIN_KEY_BYTES = 24


@functools.lru_cache(maxsize=64)
def standard_key(secret: str) -> bytes:
    """The HMAC key is the base64-decoded part after ``whsec_``."""
    raw = secret[len("whsec_") :] if secret.startswith("whsec_") else secret
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a Standard Webhooks secret is 'whsec_' followed by base64") from None


def check_standard_secret(secret: str) -> None:
    """Refuse a key anyone could guess: empty (``whsec_``) or shorter than the spec's 24 bytes."""
    n = len(standard_key(secret))
    if n < STANDARD_MIN_KEY_BYTES:
        raise ValueError(
            f"a Standard Webhooks key must be at least {STANDARD_MIN_KEY_BYTES} random bytes "
            f"(this one decodes to {n}); generate one with: "
            "python3 -c 'import base64,os; print(\"whsec_\" + base64.b64encode(os.urandom(32)).decode())'"
        )


def standard_sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    sig = _hmac(standard_key(secret), f"{msg_id}.{timestamp}.".encode() + body)
    return "v1," + base64.b64encode(sig).decode()


def standard_verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE,
) -> str:
    """Verify and return the ``webhook-id``."""
    msg_id = _header(headers, "webhook-id")
    ts = _check_time(headers.get("webhook-timestamp"), now, tolerance, "webhook-timestamp")
    given = []
    for part in _header(headers, "webhook-signature").split():
        version, _, sig = part.partition(",")
        if version == "v1":
            try:
                given.append(binascii.a2b_base64(sig, strict_mode=True))
            except (binascii.Error, ValueError):
                continue
    if not given:
        raise SignatureError("webhook-signature has no v1 signature")
    signed = f"{msg_id}.{ts}.".encode() + body
    if not _any_match(given, [_hmac(standard_key(s), signed) for s in secrets]):
        raise SignatureError("signature does not match")
    return msg_id


# --- Stripe (Stripe-Signature: t=…,v1=…) -----------------------------------------------------


def stripe_sign(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={_hmac(secret.encode(), f'{timestamp}.'.encode() + body).hex()}"


def stripe_verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE,
) -> None:
    header = _header(headers, "Stripe-Signature")
    ts_text, v1 = None, []
    for item in header.split(","):
        k, _, v = item.strip().partition("=")
        if k == "t":
            ts_text = v
        elif k == "v1":
            v1.append(v.encode())
    ts = _check_time(ts_text, now, tolerance, "Stripe-Signature timestamp")
    if not v1:
        raise SignatureError("Stripe-Signature has no v1 signature")
    signed = f"{ts}.".encode() + body
    expected = [_hmac(s.encode(), signed).hex().encode() for s in secrets]
    if not _any_match(v1, expected):
        raise SignatureError("signature does not match")


# --- GitHub (X-Hub-Signature-256: sha256=<hex>) ----------------------------------------------


def github_sign(secret: str, body: bytes) -> str:
    return "sha256=" + _hmac(secret.encode(), body).hex()


def github_verify(secrets: Sequence[str], headers: Mapping[str, str], body: bytes) -> None:
    given = _header(headers, "X-Hub-Signature-256")
    if not given.startswith("sha256="):
        raise SignatureError("X-Hub-Signature-256 must start with 'sha256='")
    expected = [github_sign(s, body).encode() for s in secrets]
    if not _any_match([given.encode()], expected):
        raise SignatureError("signature does not match")


# --- Generic HMAC-SHA256 of the body (Shopify is this with base64 in X-Shopify-Hmac-Sha256) ---


def hmac_sign(
    secret: str, body: bytes, *, encoding: str = "hex", prefix: str = "", timestamp: int | None = None
) -> str:
    msg = body if timestamp is None else f"{timestamp}.".encode() + body
    digest = _hmac(secret.encode(), msg)
    text = digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()
    return prefix + text


def hmac_verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    header: str,
    encoding: str = "hex",
    prefix: str = "",
    timestamp_header: str | None = None,
    now: float = 0.0,
    tolerance: float = DEFAULT_TOLERANCE,
) -> None:
    given = _header(headers, header).strip()
    ts = None
    if timestamp_header:
        ts = _check_time(headers.get(timestamp_header), now, tolerance, timestamp_header)
    if prefix and not given.startswith(prefix):
        raise SignatureError(f"{header} must start with {prefix!r}")
    expected = [hmac_sign(s, body, encoding=encoding, prefix=prefix, timestamp=ts).encode() for s in secrets]
    candidate = given.lower() if encoding == "hex" else given
    if not _any_match([candidate.encode()], expected):
        raise SignatureError("signature does not match")
