#!/usr/bin/env python3
"""Set up a virtual environment and run the demo or the tests: the README's quick start.

    python3 scripts/dev.py demo    # the Flask example, offline, showing what it would send
    python3 scripts/dev.py demo fastapi --tour   # the FastAPI twin; --tour: print and exit
    python3 scripts/dev.py demo django   # the Django twin (settings.MIDDLEWARE, request.koala)
    python3 scripts/dev.py test    # lint, types, and the tests on every CPython 3.10-3.13 here
    python3 scripts/dev.py test -k cookie   # with arguments: pytest on this Python only
    python3 scripts/dev.py bench   # the benchmarks in bench/

Needs only Python 3 and pip. The venv is .venv/ in the repository; ``test`` also makes nox's
virtualenvs in .nox/ (one per CPython): about 1.6 GB of disk in all. For the browser
test, ``test`` installs Debian's chromium when it can (root with apt-get: about 115 packages,
360 MB), saying so first; KOALA_SKIP_CHROMIUM_INSTALL=1 skips that, and the test then skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(*args: str | os.PathLike[str], check: bool = True) -> int:
    print("+", " ".join(str(a) for a in args), flush=True)
    return subprocess.run([str(a) for a in args], cwd=ROOT, check=check).returncode


def setup(extra: str) -> None:
    if not PYTHON.exists():
        venv.create(VENV, with_pip=True)
    run(PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", f".[{extra}]")


def install_chromium() -> None:
    """Best effort: the end-to-end browser test skips (saying why) without it."""
    if shutil.which("chromium") or os.environ.get("KOALA_SKIP_CHROMIUM_INSTALL"):
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        print("chromium not installed and cannot install it here (needs root and apt-get): the browser test will skip")
        return
    print(
        "installing Debian's chromium for the browser test (apt-get install chromium: about 115 packages,\n"
        "360 MB of disk); set KOALA_SKIP_CHROMIUM_INSTALL=1 to skip it (the browser test then skips)",
        flush=True,
    )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            subprocess.run(cmd, check=True, env=env, timeout=900, stdout=subprocess.DEVNULL)
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"could not install chromium ({exc}): the browser test will skip")
            return


def pyenv_pythons() -> dict[str, str]:
    """Where pyenv keeps several CPythons (as on the project's machines), name them all in
    PYENV_VERSION so that its ``python3.X`` shims resolve for nox; elsewhere, nothing."""
    if not shutil.which("pyenv"):
        return {}
    found = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True, check=False).stdout.split()
    wanted = [v for v in found if v.startswith(("3.10.", "3.11.", "3.12.", "3.13."))]
    if not wanted:
        return {}
    current = f"{sys.version_info.major}.{sys.version_info.minor}."
    wanted.sort(key=lambda v: not v.startswith(current))  # this Python first: it stays `python3`
    return {"PYENV_VERSION": ":".join(wanted)}


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("test", [])
    if command == "demo":
        stack = rest.pop(0) if rest and rest[0] in ("flask", "fastapi", "django") else "flask"
        setup(f"{stack},pixel")  # the examples serve Koala's pixel first-party (docs/pixel.md)
        return run(PYTHON, f"examples/{stack}_app/app.py", *rest, check=False)
    if command == "test":
        install_chromium()
        if rest:  # a quick, targeted run: pytest on this Python
            setup("test")
            code = run(PYTHON, "-m", "pytest", *rest, check=False)
            return 0 if code == 5 else code
        setup("ci")
        env = {**os.environ, **pyenv_pythons()}
        print("+", "nox (lint, docs, package, then tests on CPython 3.10-3.13)", flush=True)
        return subprocess.run([str(PYTHON), "-m", "nox"], cwd=ROOT, env=env, check=False).returncode
    if command == "bench":
        setup("bench")
        return run(PYTHON, "bench/run.py", *rest, check=False)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
