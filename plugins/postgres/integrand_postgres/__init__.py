"""integrand's PostgreSQL connector: the ``postgres`` sink (events into tables) and the ``postgres-cdc`` source."""

from .sink import PostgresSink, PostgresSinkConfig
from .source import PostgresSource, PostgresSourceConfig

__all__ = ["PostgresSink", "PostgresSinkConfig", "PostgresSource", "PostgresSourceConfig"]
