from __future__ import annotations

from collections.abc import Iterator

import pytest
from amqp_support import drop_vhost, make_vhost


@pytest.fixture(scope="session")
def vhost() -> Iterator[str]:
    """One random vhost for the session's AMQP tests (each test names its own exchanges and queues)."""
    name = make_vhost()
    try:
        yield name
    finally:
        drop_vhost(name)
