"""integrand connector for the Notes API: webhooks, polling, reconciliation, enrichment and a sink."""

from .connector import NotesConfig, NotesConnector

__all__ = ["NotesConfig", "NotesConnector"]
