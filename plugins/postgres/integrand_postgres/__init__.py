"""integrand's PostgreSQL connector: the ``postgres`` sink (events into tables)."""

from .sink import PostgresSink, PostgresSinkConfig

__all__ = ["PostgresSink", "PostgresSinkConfig"]
