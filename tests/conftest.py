"""Fixtures shared by every test: a real local collector standing in for Koala."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from koala_middleware import KoalaClient
from koala_middleware.testing import Collector

# Fast retries so fault tests take seconds, not minutes.
FAST_RETRIES = {"backoff_base": 0.02, "max_backoff": 0.2, "timeout": 2.0}


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as koala:
        yield koala


@pytest.fixture
def client(collector: Collector) -> Iterator[KoalaClient]:
    """A client sending to the collector, shut down after the test."""
    koala = KoalaClient("pk_test", api_url=collector.url, **FAST_RETRIES)
    yield koala
    koala.shutdown(timeout=2)
