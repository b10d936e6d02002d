"""The typed API as users' type checkers see it: ``mypy --strict`` over small user files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("mypy")


def mypy(tmp_path: Path, code: str) -> str:
    """mypy --strict's report on ``code`` (a user's file); empty when it type-checks."""
    source = tmp_path / "user_app.py"
    source.write_text(code)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(source),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,  # where the package is found
    )
    return (result.stdout + result.stderr).replace(f"{tmp_path}/", "")


def test_the_documented_set_ups_type_check(tmp_path: Path) -> None:
    report = mypy(
        tmp_path,
        "from fastapi import FastAPI\n"
        "from flask import Flask\n"
        "from koala_middleware import KoalaClient, KoalaWSGIMiddleware, Tracker\n"
        "from koala_middleware.fastapi import KoalaASGIMiddleware, KoalaTracker\n"
        "from koala_middleware.flask import Koala, request\n"
        "app = FastAPI()\n"
        "app.add_middleware(KoalaASGIMiddleware, client=KoalaClient())\n"
        "app.add_middleware(KoalaASGIMiddleware, public_key='pk_test', exclude_paths=['/healthz'])\n"
        "@app.get('/')\n"
        "async def home(koala: KoalaTracker) -> str:\n"
        "    tracker: Tracker = koala\n"
        "    return tracker.track('Viewed Home')\n"
        "flask_app = Flask(__name__)\n"
        "Koala(flask_app, public_key='pk_test', cookie_domain='example.com', max_retries=3)\n"
        "flask_app.wsgi_app = KoalaWSGIMiddleware(flask_app.wsgi_app, timeout=2.0)  # type: ignore[method-assign]\n"
        "@flask_app.get('/')\n"
        "def index() -> str:\n"
        "    reveal_type(request.koala)\n"
        "    return request.koala.track('Viewed Home')\n",
    )
    assert report.strip().splitlines() == [
        'user_app.py:18: note: Revealed type is "koala_middleware._tracker.Tracker"'
    ], report


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("KoalaClient(max_retires=3)", 'Unexpected keyword argument "max_retires" for "KoalaClient"'),
        ("KoalaClient(timeout='5')", 'Argument "timeout" to "KoalaClient" has incompatible type "str"'),
        ("KoalaASGIMiddleware(app, client=c, cookie_nam='x')", 'Unexpected keyword argument "cookie_nam"'),
        ("KoalaWSGIMiddleware(wsgi, respect_gcp=False)", 'Unexpected keyword argument "respect_gcp"'),
        ("Koala(None, exclude_path=['/healthz'])", 'Unexpected keyword argument "exclude_path"'),
    ],
)
def test_a_misspelt_or_mistyped_option_fails_the_type_check_naming_it(tmp_path: Path, line: str, error: str) -> None:
    report = mypy(
        tmp_path,
        "from typing import Any\n"
        "from koala_middleware import KoalaASGIMiddleware, KoalaClient, KoalaWSGIMiddleware\n"
        "from koala_middleware.flask import Koala\n"
        "async def app(scope: Any, receive: Any, send: Any) -> None: ...\n"
        "def wsgi(environ: Any, start_response: Any) -> Any: ...\n"
        "c = KoalaClient()\n"
        f"{line}\n",
    )
    assert "error" in report and re.search(error, report), report
