"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import gc
import inspect
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from koala_middleware import KoalaClient
from koala_middleware._delivery import DeliverySettings

#: Fast retries so fault tests take seconds, not minutes.
FAST_RETRIES: dict[str, Any] = {"backoff_base": 0.02, "max_backoff": 0.2, "timeout": 2.0}


def run_tour(example: Path, home: Path) -> str:
    """Run an example's ``--tour`` offline, as a user would, and return what it printed.

    No KOALA_PUBLIC_KEY / KOALA_API_URL from the caller's environment: the tour needs neither.
    """
    root = Path(__file__).resolve().parent.parent
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, str(example), "--tour"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def assert_no_garbage_cycles(run: Callable[[], None]) -> None:
    """``run()`` once to warm up (caches, lazily built tables), then again with the garbage
    collector off: it must leave nothing that only the collector could free."""
    run()
    gc.collect()
    gc.disable()
    try:
        run()
        assert gc.collect() == 0
    finally:
        gc.enable()


def delivery_settings(**overrides: Any) -> DeliverySettings:
    """The sender's settings as ``KoalaClient()`` makes them by default, with ``overrides``."""
    fields = DeliverySettings.__dataclass_fields__
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(KoalaClient).parameters.items()
        if name in fields
    }
    return DeliverySettings(**{"base_url": "http://127.0.0.1:9", **defaults, **overrides})
