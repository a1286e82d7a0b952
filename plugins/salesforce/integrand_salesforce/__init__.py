"""integrand's first-party Salesforce connector (entry point ``salesforce``) and its local fake."""

from .config import SalesforceConfig
from .connector import SalesforceConnector

__all__ = ["SalesforceConfig", "SalesforceConnector"]
