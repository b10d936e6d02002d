"""Fixtures for the end-to-end tests with real servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from koala_middleware.testing import Collector


@pytest.fixture(scope="module")
def koala() -> Iterator[Collector]:
    """One collector for a module's shared server (tests tell their batches apart by UA)."""
    with Collector() as collector:
        yield collector
