"""integrand's first-party HubSpot connector (entry point ``hubspot``) and its local fake."""

from .connector import HubSpotConfig, HubSpotConnector

__all__ = ["HubSpotConfig", "HubSpotConnector"]
