"""The ``salesforce`` connector's config table: one org, how to sign in, what to read, where to write."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from integrand.connector import ConnectorConfig, Duration, SecretValue

from .auth import make_cipher

LOGIN_URL = "https://login.salesforce.com"
TEST_LOGIN_URL = "https://test.salesforce.com"
API_VERSION = "62.0"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def _as_list(v: object) -> object:
    return v if isinstance(v, list) or v is None else [v]


class SalesforceConfig(ConnectorConfig):
    # --- sign-in ---
    auth: Literal["jwt", "client_credentials", "refresh_token"] = "jwt"
    client_id: SecretValue
    client_secret: SecretValue | None = None
    username: str | None = None
    private_key: SecretValue | None = None
    refresh_token: SecretValue | None = None
    token_key: Annotated[list[SecretValue], BeforeValidator(_as_list)] = []
    environment: Literal["production", "sandbox"] = "production"
    login_url: str = LOGIN_URL
    test_login_url: str = TEST_LOGIN_URL
    my_domain_url: str | None = None
    jwt_audience: str | None = None
    # refresh_token: `integrand auth NAME` runs the web-server flow (with PKCE) once; the callback URL of the
    # External Client App, and the scopes asked for (refresh_token and offline_access give the refresh token).
    redirect_uri: str = "http://localhost:8765/salesforce/callback"
    oauth_scopes: str = "api refresh_token offline_access"
    api_version: str = Field(default=API_VERSION, pattern=r"^\d{2,3}\.0$")
    org_id: str | None = Field(default=None, pattern=r"^00D[A-Za-z0-9]{12}(?:[A-Za-z0-9]{3})?$")
    # --- source ---
    outbound_token: SecretValue | None = None
    outbound_actions: list[str] = []
    objects: list[str] = Field(default=["Account", "Contact"], min_length=1)
    fields: dict[str, list[str]] = {}
    include_deleted: bool = True
    deleted_check: Duration = 300.0
    overlap: Duration = 30.0
    # Where the first poll starts: this long before now, or "all" (a full initial sync).
    initial_lookback: Literal["all"] | Duration = 0.0
    page_size: int = Field(default=2000, ge=200, le=2000)
    # --- Change Data Capture (connector "salesforce-cdc") ---
    cdc_topic: str = Field(default="/data/ChangeEvents", pattern=r"^/data/\w+$")
    pubsub_url: str = "api.pubsub.salesforce.com:7443"
    pubsub_tls: bool = True
    cdc_batch: int = Field(default=100, ge=1, le=100)
    cdc_start: Literal["latest", "earliest"] = "latest"
    # --- sink ---
    object: str | None = None
    external_id_field: str | None = None
    batch_size: int = Field(default=200, ge=1, le=200)
    client_name: str | None = Field(default="integrand", pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    # --- limits ---
    daily_limit_wait: Duration = 3600.0
    concurrent_limit_wait: Duration = 20.0
    max_concurrent: int = Field(default=20, ge=1, le=25)
    timeout: Duration = 120.0

    @field_validator("objects")
    @classmethod
    def _objects(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if not _NAME.match(o)]
        if bad:
            raise ValueError(f"not sObject API names: {bad}")
        return v

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for obj, names in v.items():
            bad = [n for n in names if not _NAME.match(n)]
            if bad:
                raise ValueError(f"{obj}: not field API names: {bad}")
        return v

    @field_validator("token_key")
    @classmethod
    def _fernet(cls, v: list[SecretValue]) -> list[SecretValue]:
        if v:
            make_cipher([k.reveal() for k in v])
        return v

    @model_validator(mode="after")
    def _grant_needs(self) -> SalesforceConfig:
        missing = []
        if self.auth == "jwt":
            missing = [k for k in ("username", "private_key") if getattr(self, k) is None]
        elif self.auth == "client_credentials":
            missing = [k for k in ("client_secret", "my_domain_url") if getattr(self, k) is None]
        elif not self.token_key:
            missing = ["token_key"]
        if missing:
            raise ValueError(f"auth = {self.auth!r} needs {' and '.join(missing)}")
        for name in ("login_url", "test_login_url", "my_domain_url"):
            url = getattr(self, name)
            if url is not None and not url.startswith(("https://", "http://127.0.0.1", "http://localhost")):
                raise ValueError(f"{name} must be an https:// URL, got {url!r}")
        return self

    @property
    def login_host(self) -> str:
        """Where token requests go: My Domain when given (Salesforce's advice), else login or test."""
        if self.my_domain_url:
            return self.my_domain_url.rstrip("/")
        return (self.login_url if self.environment == "production" else self.test_login_url).rstrip("/")

    @property
    def audience(self) -> str:
        """The JWT ``aud``: the login host of the environment (not My Domain), unless overridden."""
        if self.jwt_audience:
            return self.jwt_audience
        return (self.login_url if self.environment == "production" else self.test_login_url).rstrip("/")
