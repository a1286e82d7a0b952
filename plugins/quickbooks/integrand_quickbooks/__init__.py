"""integrand's first-party QuickBooks Online connector (entry point ``quickbooks``) and its local fake."""

from .connector import QuickBooksConfig, QuickBooksConnector

__all__ = ["QuickBooksConfig", "QuickBooksConnector"]
