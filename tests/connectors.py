"""Small connectors used by the core's tests, loaded through explicit entry points (never by discovery)."""

from __future__ import annotations

from dataclasses import replace
from importlib.metadata import EntryPoint

from integrand.builtin.webhook import WebhookConfig, WebhookConnector
from integrand.connector import Connector, ConnectorConfig, Enricher, Event, SecretValue, Sink
from integrand.plugins import GROUP, Registry


class BearerConfig(ConnectorConfig):
    url: str
    token: SecretValue
    account: str = "acct-1"


class BearerSink(Connector[BearerConfig], Sink):
    """POSTs each event's data with a bearer token through ``ctx.http`` (so the helper's error mapping applies)."""

    Config = BearerConfig

    async def deliver(self, event: Event) -> None:
        token = self.config.token.reveal()
        self.ctx.http.add_secret(token)
        await self.ctx.http.post(
            self.config.url,
            json={"key": event.key, "data": event.data},
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": event.key},
            rate_key=f"bearer:{self.config.account}",
        )


def registry_with(**extra: str) -> Registry:
    """The built-in connectors plus ``name="module:Class"`` entries, and nothing else installed."""
    builtin = {
        "webhook": "integrand.builtin.webhook:WebhookConnector",
        "jsonl": "integrand.builtin.jsonl:JsonlSink",
        "http": "integrand.builtin.http:HttpSink",
    }
    return Registry(EntryPoint(name, value, GROUP) for name, value in {**builtin, **extra}.items())


class FetchingConfig(WebhookConfig):
    api_url: str


class FetchingWebhook(WebhookConnector, Enricher):
    """The generic webhook source plus ``fetch``: GET {api_url}/records/{entity_id}, kept under data.object."""

    Config = FetchingConfig  # type: ignore[assignment]

    async def fetch(self, event: Event) -> Event:
        assert isinstance(self.config, FetchingConfig)
        res = await self.ctx.http.get(f"{self.config.api_url}/records/{event.entity_id}")
        return replace(event, data={**event.data, "object": res.json()})
