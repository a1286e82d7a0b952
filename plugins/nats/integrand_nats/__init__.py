"""NATS JetStream for integrand: a sink that publishes with dedup ids and a durable pull-consumer source."""

from .connector import NatsConfig, NatsConnector

__all__ = ["NatsConfig", "NatsConnector"]
