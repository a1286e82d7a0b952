"""integrand: webhooks and polling in, a durable SQLite queue, sinks out."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("integrand")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
