"""RabbitMQ (AMQP 0-9-1) for integrand: a publisher-confirmed sink and a manual-ack queue consumer source."""

from .connector import AmqpConfig, AmqpConnector

__all__ = ["AmqpConfig", "AmqpConnector"]
