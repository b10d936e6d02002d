"""pytest fixtures for apps that use koala-middleware, loaded automatically by pytest once
the package is installed (a ``pytest11`` entry point)::

    def test_sign_up_reaches_koala(koala_client, koala_collector):
        app = create_app(koala_client)
        ...
        koala_client.flush()
        assert koala_collector.events()[0]["event"] == "Signed Up"
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._client import KoalaClient
from .testing import Collector

__all__ = ["koala_client", "koala_collector"]


@pytest.fixture
def koala_collector() -> Iterator[Collector]:
    """A running :class:`~koala_middleware.testing.Collector`, stopped after the test."""
    with Collector() as collector:
        yield collector


@pytest.fixture
def koala_client(koala_collector: Collector) -> Iterator[KoalaClient]:
    """A :class:`~koala_middleware.KoalaClient` sending to ``koala_collector``, shut down after
    the test (pending batches flushed for up to 2 s)."""
    client = KoalaClient("pk_test", api_url=koala_collector.url)
    yield client
    client.shutdown(timeout=2)
