"""A missing or misspelt key is loud once: a WARNING the first time a dry-run client would
have sent something (issue 24, item 5), naming ``KOALA_PUBLIC_KEY``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from koala_middleware import KoalaClient


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "koala_middleware" and r.levelno == logging.WARNING]


def _record_twice(client: KoalaClient) -> None:
    for _ in range(2):
        with client.tracker(email="ada@example.com") as person:
            person.track("Invoice Paid")


def outside_pytest(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the process did not run under pytest (the warning is silent under pytest);
    called in the test body: pytest sets ``PYTEST_CURRENT_TEST`` again for each phase."""
    monkeypatch.delenv("KOALA_PUBLIC_KEY", raising=False)
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)


def test_no_key_warns_once_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    outside_pytest(monkeypatch)
    caplog.set_level(logging.INFO, logger="koala_middleware")
    client = KoalaClient()
    assert _warnings(caplog) == []  # making a client without a key (demos, CI) is quiet
    _record_twice(client)
    [warning] = _warnings(caplog)
    assert "KOALA_PUBLIC_KEY" in warning and "dry_run=True" in warning
    assert len(client.dry_run_batches) == 2


def test_a_misspelt_variable_is_named(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    outside_pytest(monkeypatch)
    monkeypatch.setenv("KOALA_PUBLIC_KY", "pk_live_123")
    _record_twice(KoalaClient())
    [warning] = _warnings(caplog)
    assert "KOALA_PUBLIC_KY" in warning and "pk_live_123" not in warning


def test_explicit_dry_run_is_quiet(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    outside_pytest(monkeypatch)
    _record_twice(KoalaClient(dry_run=True))
    _record_twice(KoalaClient("pk_test", dry_run=True))
    assert _warnings(caplog) == []


def test_quiet_under_pytest(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("KOALA_PUBLIC_KEY", raising=False)
    assert os.environ.get("PYTEST_CURRENT_TEST")
    _record_twice(KoalaClient())
    assert _warnings(caplog) == []


def test_the_outside_a_request_example_without_a_key_says_so() -> None:
    """The issue's report: this script, run with no key and no logging set up, printed nothing."""
    script = textwrap.dedent(
        """
        from koala_middleware import KoalaClient

        koala = KoalaClient()
        with koala.tracker(email="ada@example.com") as person:
            person.track("Invoice Paid", {"amount": 120})
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("KOALA_PUBLIC_KEY", "PYTEST_CURRENT_TEST")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("KOALA_PUBLIC_KEY") == 1, done.stderr
