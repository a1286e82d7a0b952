"""The integrand contract suite against a local fake of the Notes API: this is the whole test module."""

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from integrand_example_notes import NotesConnector
from integrand_example_notes.fake import FakeNotes

from integrand.connector import Event
from integrand.testing import ConnectorContract, fake_api_server


class TestNotesContract(ConnectorContract):
    connector_class = NotesConnector

    @pytest.fixture
    def notes(self) -> FakeNotes:
        notes = FakeNotes()
        for i in range(250):  # three pages
            notes.put(f"n{i}", f"note {i}")
        return notes

    @pytest.fixture
    async def fake_api(self, notes: FakeNotes) -> AsyncIterator[str]:
        async with fake_api_server(notes.app()) as url:
            yield url

    @pytest.fixture
    def api_faults(self, notes: FakeNotes) -> Callable[[int | None, dict[str, str]], None]:
        return notes.fail

    @pytest.fixture
    def connector_config(self, fake_api: str) -> dict[str, Any]:
        return {
            "base_url": fake_api,
            "account": "acme",
            "refresh_token": "rt-0",
            "webhook_secret": "notes-webhook-secret",
        }

    @pytest.fixture
    def webhook_body(self) -> bytes:
        return b'{"type": "note.updated", "note": {"id": "n1", "version": 1}}'

    @pytest.fixture
    def thin_event(self) -> Event:
        return Event(id="n1:v1", source="contract", type="note.updated", data={}, entity="note", entity_id="n1")

    @pytest.fixture
    def sink_events(self) -> list[Event]:
        return [Event(id="x:1", source="crm", type="note.updated", data={"id": "n7", "text": "hello"})]
