"""Fixtures shared by every test: a real local collector standing in for Koala, and clients."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from helpers import FAST_RETRIES
from koala_middleware import KoalaClient
from koala_middleware.testing import Collector

#: The suite (and the servers it starts) runs the default install's engine, pure Python,
#: even where pycurl is installed; ``KOALA_ENGINE=curl pytest`` runs it all on libcurl.
os.environ.setdefault("KOALA_ENGINE", "python")
ENGINES = ["python", "curl"]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each delivery engine in turn (the background sender reads ``KOALA_ENGINE`` when it
    starts; ``sync=True`` and ``check`` always use the pure-Python one)."""
    name: str = request.param
    if name == "curl":
        pytest.importorskip("pycurl", reason="the [curl] extra is not installed")
    monkeypatch.setenv("KOALA_ENGINE", name)
    return name


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
