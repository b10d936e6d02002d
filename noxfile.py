"""The checks CI runs (``python3 scripts/dev.py test`` runs nox with its default sessions).

``nox -s lint`` is ruff and mypy --strict on the package; ``nox -s tests`` the test suite
(the documentation's code snippets included: tests/test_docs_snippets.py) on every CPython
from 3.10 to 3.13 found on the machine (a missing one is skipped, saying so). The
end-to-end tests (real servers and processes, about half the time) run on 3.11 and 3.13;
3.10 and 3.12 run everything else: the whole suite on four interpreters takes about 18
minutes on 2 cores, over CI's 20-minute budget once set-up is counted. ``nox -s tests --
-m e2e`` runs them anywhere. ``nox -s docs`` builds the documentation site with warnings
as errors (``mkdocs build --strict``: broken links and anchors fail it, checked offline);
``nox -s package`` builds the sdist and the wheel and checks them as PyPI will
(``twine check --strict``, the LICENSE inside both, the version), then resolves the wheel
binary-only for every platform of scripts/platforms.py's matrix (needs PyPI).
"""

from __future__ import annotations

import tarfile
import tempfile
import zipfile
from pathlib import Path

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
#: Where the end-to-end tests run too (without arguments).
E2E_PYTHONS = {"3.11", "3.13"}
ROOT = Path(__file__).parent

nox.options.sessions = ["lint", "docs", "package", "tests"]
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.error_on_missing_interpreters = False  # skipped with a message instead


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy --strict on the package."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "--strict", "koala_middleware")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site, warnings as errors; ``nox -s docs -- serve`` to preview it."""
    session.install("-e", ".[docs]")
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:])
        return
    with tempfile.TemporaryDirectory() as site:
        session.run("mkdocs", "build", "--strict", "--site-dir", site, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def package(session: nox.Session) -> None:
    """``python -m build`` and ``twine check --strict``, as the release workflow does."""
    # pip too: the free-threaded rows go through pip (uv cannot target that ABI).
    session.install("build>=1.2", "twine>=6.1", "uv>=0.4", "pip")
    with tempfile.TemporaryDirectory() as out:
        session.run("python", "-m", "build", "--outdir", out, str(ROOT))
        built = sorted(Path(out).iterdir())
        session.run("twine", "check", "--strict", *map(str, built))
        version = _version()
        for path in built:
            names = _names_in(path)
            if not any(name.endswith("LICENSE") for name in names):
                session.error(f"{path.name} has no LICENSE file")
            if f"-{version}" not in path.name:
                session.error(f"{path.name} is not version {version} (koala_middleware/_version.py)")
        session.log(f"built and checked: {', '.join(p.name for p in built)}")
        # Installs everywhere (issue 18): the wheel and its extras resolve binary-only for
        # every platform and CPython of the matrix (needs PyPI; about a minute).
        wheel = next(path for path in built if path.suffix == ".whl")
        session.run("python", str(ROOT / "scripts" / "platforms.py"), "--wheel", str(wheel))


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite; extra arguments go to pytest (``nox -s tests -- -k cookie``)."""
    session.install("-e", ".[test]")
    selection = [] if session.python in E2E_PYTHONS else ["-m", "not e2e"]
    session.run("python", "-m", "pytest", *(session.posargs or selection))


def _names_in(archive: Path) -> list[str]:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            return wheel.namelist()
    with tarfile.open(archive) as sdist:
        return sdist.getnames()


def _version() -> str:
    namespace: dict[str, str] = {}
    exec((ROOT / "koala_middleware" / "_version.py").read_text(), namespace)
    return namespace["__version__"]
