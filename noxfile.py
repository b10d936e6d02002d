"""The checks CI runs (``python3 scripts/dev.py test`` runs them through nox).

``nox -s lint`` is ruff and mypy --strict on the package; ``nox -s tests`` the test suite on
every CPython from 3.10 to 3.13 found on the machine (a missing one is skipped, saying so).
The end-to-end tests (real servers and processes, about half the time) run on the
machine's default CPython and the newest; 3.10 and 3.12 run everything else: the whole
suite on four interpreters takes about 18 minutes on 2 cores, over CI's 20-minute budget
once set-up is counted. ``nox -s tests -- -m e2e`` runs them anywhere.
"""

from __future__ import annotations

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
#: Where the end-to-end tests run too (without arguments).
E2E_PYTHONS = {"3.11", "3.13"}

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.error_on_missing_interpreters = False  # skipped with a message instead


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy --strict on the package."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "--strict", "koala_middleware")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite; extra arguments go to pytest (``nox -s tests -- -k cookie``)."""
    session.install("-e", ".[test]")
    selection = [] if session.python in E2E_PYTHONS else ["-m", "not e2e"]
    session.run("python", "-m", "pytest", *(session.posargs or selection))
