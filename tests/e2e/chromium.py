"""Debian's headless Chromium driven by Playwright, for the browser tests.

One launch for every browser test: the same flags, a fresh profile (no cookies yet) and the
same skip reasons when Playwright or Chromium is missing. Each test gives only its
``--host-resolver-rules``, which keep every request on the loopback.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests may run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def chromium_context(host_resolver_rules: str, *, profile_prefix: str = "koala-chromium-") -> Iterator[Any]:
    """A Playwright browser context on a fresh Chromium profile, or a skip saying why there is none."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as exc:
        pytest.skip(f"playwright is not installed: {exc}")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package (scripts/dev.py does)")
    args = [*CHROMIUM_ARGS, f"--host-resolver-rules={host_resolver_rules}"]
    with tempfile.TemporaryDirectory(prefix=profile_prefix) as profile, sync_playwright() as playwright:
        try:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=args, timeout=30_000
            )
        except Error as exc:
            pytest.skip(f"playwright could not launch {CHROMIUM}: {exc.message.splitlines()[0]}")
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            context.close()
