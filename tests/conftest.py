"""Fixtures shared by every test: a real local collector standing in for Koala, and clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers import FAST_RETRIES
from koala_middleware import KoalaClient
from koala_middleware.testing import Collector


@pytest.fixture
def collector(koala_collector: Collector) -> Collector:
    """The package's own pytest fixture (``koala_middleware.pytest_plugin``), as users get it."""
    return koala_collector


@pytest.fixture
def client(collector: Collector) -> Iterator[KoalaClient]:
    """A client sending to the collector, shut down after the test."""
    koala = KoalaClient("pk_test", api_url=collector.url, **FAST_RETRIES)
    yield koala
    koala.shutdown(timeout=2)


@pytest.fixture
def dry() -> KoalaClient:
    """A client that keeps what it would send (``dry_run_batches``), for checks of what and when."""
    return KoalaClient(dry_run=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e/ (real servers, real processes) carries the ``e2e`` marker."""
    for item in items:
        if "e2e" in item.path.parent.parts:
            item.add_marker(pytest.mark.e2e)
