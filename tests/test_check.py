"""``python -m koala_middleware check`` and the ``koala-middleware`` script, run as a user
would, against the local collector (and a second collector standing in for a proxy)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e.servers import free_port
from koala_middleware.__main__ import main
from koala_middleware.testing import Collector

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "koala-middleware"
PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m koala_middleware ...`` in a subprocess, as a user runs it, in an environment
    without the caller's Koala and proxy settings."""
    return subprocess.run(
        [sys.executable, "-m", "koala_middleware", *args],
        cwd=ROOT,
        env={**clean_environment(), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KOALA_") and k.lower() not in PROXY_VARIABLES}


@dataclass
class Done:
    returncode: int
    stdout: str


@pytest.fixture
def check(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., Done]:
    """The command's ``main()`` in this process (quicker than a subprocess per case), in the
    same clean environment plus ``env``."""

    def run_in_process(*args: str, **env: str) -> Done:
        with monkeypatch.context() as patch:
            for name in list(os.environ):
                if name.startswith("KOALA_") or name.lower() in PROXY_VARIABLES:
                    patch.delenv(name)
            for name, value in env.items():
                patch.setenv(name, value)
            code = main(list(args))
        return Done(code, capsys.readouterr().out)

    return run_in_process


def test_an_accepted_key_exits_0(collector: Collector) -> None:
    done = run("check", KOALA_PUBLIC_KEY="pk_live_1", KOALA_API_URL=collector.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Result: key accepted" in done.stdout and "Public key: pk_live_1 (from KOALA_PUBLIC_KEY)" in done.stdout
    assert f"Koala API: {collector.url} (from KOALA_API_URL)" in done.stdout and "Proxy: none" in done.stdout
    [asked] = collector.requests()
    assert (asked.method, asked.path) == ("GET", "/web/projects/pk_live_1/auth")
    assert asked.headers["user-agent"].startswith("koala-middleware/")


def test_command_line_options_override_the_environment_and_the_script_is_installed(collector: Collector) -> None:
    if not SCRIPT.exists():
        pytest.skip("the koala-middleware script is installed by pip install (not found next to python)")
    done = subprocess.run(
        [str(SCRIPT), "check", "--key", "pk_from_flag", "--api-url", collector.url],
        capture_output=True,
        text=True,
        env={**clean_environment(), "KOALA_PUBLIC_KEY": "pk_from_env", "KOALA_API_URL": "http://127.0.0.1:9"},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Public key: pk_from_flag (from the command line)" in done.stdout
    assert [r.path for r in collector.requests()] == ["/web/projects/pk_from_flag/auth"]


@pytest.mark.parametrize("status", [401, 404])
def test_a_rejected_key_exits_1_and_says_so(collector: Collector, status: int, check: Callable[..., Done]) -> None:
    if status == 404:
        collector.reject_keys("pk_wrong")
    else:
        collector.fail_next(1, status=401)
    done = check("check", "--key", "pk_wrong", "--api-url", collector.url)
    assert done.returncode == 1
    assert f"Result: key rejected (Koala answered {status})" in done.stdout
    assert "Settings > Workspace" in done.stdout


def test_an_unreachable_koala_exits_2_and_says_so(check: Callable[..., Done]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = check("check", "--key", "pk_test", "--api-url", url, "--timeout", "2")
    assert done.returncode == 2
    assert f"Result: Koala unreachable at {url} (ConnectionRefusedError" in done.stdout


def test_an_error_answer_is_not_a_verdict_on_the_key(collector: Collector, check: Callable[..., Done]) -> None:
    collector.fail_next(1, status=503)
    done = check("check", "--key", "pk_test", "--api-url", collector.url)
    assert done.returncode == 2 and "could not check the key: Koala answered 503" in done.stdout


def test_no_key_exits_1_and_explains_dry_run(check: Callable[..., Done]) -> None:
    done = check("check")
    assert done.returncode == 1
    assert "Public key: none. Set KOALA_PUBLIC_KEY or pass --key" in done.stdout and "dry-run" in done.stdout
    assert "Koala API: https://api2.getkoala.com (the default)" in done.stdout


def test_a_malformed_key_or_url_is_a_configuration_error(check: Callable[..., Done]) -> None:
    done = check("check", "--key", "not a key!")
    assert done.returncode == 1 and "Configuration error: public_key must be" in done.stdout
    assert check("check", "--key", "pk", "--api-url", "ftp://x").returncode == 1


def test_the_environment_proxy_is_reported_and_used(collector: Collector, check: Callable[..., Done]) -> None:
    with Collector() as proxy:  # answers the absolute-form request a client sends its proxy
        proxy_url = f"http://user:secret@127.0.0.1:{proxy.port}"
        done = check("check", "--key", "pk_test", "--api-url", collector.url, HTTP_PROXY=proxy_url)
        assert done.returncode == 0, done.stdout
        assert f"Proxy: http://user:***@127.0.0.1:{proxy.port} (from HTTP_PROXY)" in done.stdout
        assert "secret" not in done.stdout
        assert [r.path for r in proxy.requests()] == [f"{collector.url}/web/projects/pk_test/auth"]
        assert collector.requests() == []

        bypassed = check(
            "check", "--key", "pk_test", "--api-url", collector.url, HTTP_PROXY=proxy_url, NO_PROXY="127.0.0.1"
        )
        assert bypassed.returncode == 0 and "Proxy: none for 127.0.0.1: NO_PROXY excludes it" in bypassed.stdout
        assert len(collector.requests()) == 1

        flag = check("check", "--key", "pk_test", "--api-url", collector.url, "--proxy", proxy_url, NO_PROXY="*")
        assert flag.returncode == 0 and f"Proxy: http://user:***@127.0.0.1:{proxy.port} (from --proxy)" in flag.stdout
        assert len(proxy.requests()) == 2  # --proxy wins over the environment, as proxy= does

        proxy.down()
        unreachable = check("check", "--key", "pk_test", "--api-url", collector.url, HTTP_PROXY=proxy_url)
        assert unreachable.returncode == 2 and "Koala unreachable through the proxy" in unreachable.stdout
        assert "secret" not in unreachable.stdout


def test_a_malformed_proxy_is_a_configuration_error(check: Callable[..., Done]) -> None:
    done = check("check", "--key", "pk_test", "--proxy", "socks5://127.0.0.1:1080")
    assert done.returncode == 1 and "Configuration error: proxy must be an http:// or https:// URL" in done.stdout
