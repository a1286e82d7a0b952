"""A sink for dispatcher tests whose behaviour the test scripts while the daemon runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from integrand.connector import Connector, ConnectorConfig, Event, Sink


class ScriptedConfig(ConnectorConfig):
    batch_size: int = 1


class ScriptedSink(Connector[ScriptedConfig], Sink):
    """Delivers into ``received`` unless ``fail`` says otherwise for that event."""

    Config = ScriptedConfig

    async def start(self) -> None:
        self.received: list[Event] = []
        self.calls = 0
        self.fail: Callable[[Event], BaseException | None] = lambda e: None
        self.changed = asyncio.Event()
        self.batch_override: Callable[[Sequence[Event]], list[BaseException | None]] | None = None

    async def deliver(self, event: Event) -> None:
        self.calls += 1
        try:
            err = self.fail(event)
            if err is not None:
                raise err
            self.received.append(event)
        finally:
            self.changed.set()

    async def deliver_batch(self, events: Sequence[Event]) -> list[BaseException | None]:
        if self.batch_override is not None:
            return self.batch_override(events)
        return await super().deliver_batch(events)
