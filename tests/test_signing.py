"""Signature schemes against the providers' published test vectors, and the ways they must refuse."""

from __future__ import annotations

import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integrand import signing
from integrand.errors import SignatureError

# Standard Webhooks spec v1 official vector (shared/reference/third-party-apis.md).
SW_KEY = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SW_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SW_TS = 1614265330
SW_BODY = b'{"test": 2432232314}'
SW_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

# GitHub's documented vector.
GH_SECRET = "It's a Secret to Everybody"
GH_BODY = b"Hello, World!"
GH_SIG = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def sw_headers(sig: str = SW_SIG, ts: int = SW_TS, msg_id: str = SW_ID) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sig}


def test_standard_webhooks_official_vector() -> None:
    assert signing.standard_sign(SW_KEY, SW_ID, SW_TS, SW_BODY) == SW_SIG
    assert signing.standard_verify([SW_KEY], sw_headers(), SW_BODY, now=SW_TS) == SW_ID


def test_standard_webhooks_accepts_any_of_several_signatures_and_secrets() -> None:
    other = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
    two_sigs = "v1,bm90LXRoZS1zaWc= " + SW_SIG
    assert signing.standard_verify([SW_KEY], sw_headers(two_sigs), SW_BODY, now=SW_TS) == SW_ID
    assert signing.standard_verify([other, SW_KEY], sw_headers(), SW_BODY, now=SW_TS) == SW_ID


@pytest.mark.parametrize(
    ("headers", "body", "now", "reason"),
    [
        (sw_headers(), SW_BODY + b" ", SW_TS, "signature does not match"),
        (sw_headers(msg_id="msg_other"), SW_BODY, SW_TS, "signature does not match"),
        (sw_headers(), SW_BODY, SW_TS + 301, "replay window"),
        (sw_headers(), SW_BODY, SW_TS - 301, "replay window"),
        (sw_headers(sig="v2," + SW_SIG[3:]), SW_BODY, SW_TS, "no v1 signature"),
        ({"webhook-timestamp": str(SW_TS), "webhook-signature": SW_SIG}, SW_BODY, SW_TS, "missing webhook-id"),
        ({"webhook-id": SW_ID, "webhook-signature": SW_SIG}, SW_BODY, SW_TS, "missing webhook-timestamp"),
        (sw_headers() | {"webhook-timestamp": "yesterday"}, SW_BODY, SW_TS, "not an integer"),
    ],
)
def test_standard_webhooks_refusals(headers: dict[str, str], body: bytes, now: int, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        signing.standard_verify([SW_KEY], headers, body, now=now)


def test_standard_webhooks_tolerance_edge_is_inclusive() -> None:
    signing.standard_verify([SW_KEY], sw_headers(), SW_BODY, now=SW_TS + 300)
    signing.standard_verify([SW_KEY], sw_headers(), SW_BODY, now=SW_TS - 300)


def test_standard_key_rejects_non_base64() -> None:
    with pytest.raises(ValueError, match="base64"):
        signing.standard_key("whsec_not base64!")


def test_github_official_vector() -> None:
    assert signing.github_sign(GH_SECRET, GH_BODY) == GH_SIG
    signing.github_verify([GH_SECRET], {"X-Hub-Signature-256": GH_SIG}, GH_BODY)
    with pytest.raises(SignatureError, match="does not match"):
        signing.github_verify([GH_SECRET], {"X-Hub-Signature-256": GH_SIG}, GH_BODY + b"!")
    with pytest.raises(SignatureError, match="sha256="):
        signing.github_verify([GH_SECRET], {"X-Hub-Signature-256": GH_SIG[7:]}, GH_BODY)
    with pytest.raises(SignatureError, match="missing"):
        signing.github_verify([GH_SECRET], {}, GH_BODY)


def test_stripe_scheme_signs_with_the_whole_whsec_string_and_hex() -> None:
    secret = "whsec_test_secret"
    header = signing.stripe_sign(secret, 1700000000, b'{"id":"evt_1"}')
    t, v1 = header.split(",")
    assert t == "t=1700000000"
    # Stripe keys the HMAC with the secret string as UTF-8 (not base64-decoded) and writes hex.
    import hashlib
    import hmac

    expected = hmac.new(secret.encode(), b'1700000000.{"id":"evt_1"}', hashlib.sha256).hexdigest()
    assert v1 == f"v1={expected}"
    signing.stripe_verify([secret], {"Stripe-Signature": header}, b'{"id":"evt_1"}', now=1700000100)
    rotated = f"{header},v1={'0' * 64}"
    signing.stripe_verify(["whsec_old", secret], {"Stripe-Signature": rotated}, b'{"id":"evt_1"}', now=1700000000)
    with pytest.raises(SignatureError, match="replay window"):
        signing.stripe_verify([secret], {"Stripe-Signature": header}, b'{"id":"evt_1"}', now=1700000301)
    with pytest.raises(SignatureError, match="does not match"):
        signing.stripe_verify([secret], {"Stripe-Signature": header}, b'{"id":"evt_2"}', now=1700000000)


def test_shopify_is_base64_hmac_of_the_body() -> None:
    sig = signing.hmac_sign("shpss_secret", b'{"id":1}', encoding="base64")
    signing.hmac_verify(
        ["shpss_secret"], {"X-Shopify-Hmac-Sha256": sig}, b'{"id":1}', header="X-Shopify-Hmac-Sha256", encoding="base64"
    )
    with pytest.raises(SignatureError):
        signing.hmac_verify(
            ["other"], {"X-Shopify-Hmac-Sha256": sig}, b'{"id":1}', header="X-Shopify-Hmac-Sha256", encoding="base64"
        )


def test_generic_hmac_with_prefix_and_timestamp() -> None:
    body = b'{"a":1}'
    sig = signing.hmac_sign("s3cret", body, prefix="sha256=", timestamp=1000)
    headers = {"X-Sig": sig, "X-Ts": "1000"}
    signing.hmac_verify(["s3cret"], headers, body, header="X-Sig", prefix="sha256=", timestamp_header="X-Ts", now=1100)
    # Hex compares case-insensitively (some senders upper-case it).
    upper = {"X-Sig": "sha256=" + sig[7:].upper(), "X-Ts": "1000"}
    signing.hmac_verify(["s3cret"], upper, body, header="X-Sig", prefix="sha256=", timestamp_header="X-Ts", now=1100)
    with pytest.raises(SignatureError, match="replay window"):
        signing.hmac_verify(
            ["s3cret"], headers, body, header="X-Sig", prefix="sha256=", timestamp_header="X-Ts", now=2000
        )
    with pytest.raises(SignatureError, match="must start with"):
        signing.hmac_verify(
            ["s3cret"],
            {"X-Sig": sig[7:], "X-Ts": "1000"},
            body,
            header="X-Sig",
            prefix="sha256=",
            timestamp_header="X-Ts",
            now=1000,
        )


@given(key=st.binary(max_size=200), msg=st.binary(max_size=3000))
def test_hmac_from_cached_key_states_equals_hmac_digest(key: bytes, msg: bytes) -> None:
    """The precomputed-pad HMAC matches the stdlib's for keys shorter than, equal to and longer than a block."""
    assert signing._hmac(key, msg) == hmac.digest(key, msg, "sha256")
    assert signing._hmac(key, msg) == hmac.digest(key, msg, "sha256")  # and again, from the cache
