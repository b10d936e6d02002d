"""``koala-middleware check``: does Koala accept this public key, asked from this machine?

It resolves the key, URL and proxy exactly as ``KoalaClient`` and its sender do (by
building one, and with the sender's ``proxy_for``), asks Koala's key check
(``GET {api_url}/web/projects/{key}/auth``, as Koala's own Segment destination does)
through the sender's own delivery engine (same proxy, CONNECT tunnel, TLS trust store,
deadline and answer cap), and says what it found in plain words. The exit status is 0 only when
the key works, so a deploy script can stop on it.
"""

from __future__ import annotations

import os
import time
from typing import TextIO
from urllib.parse import SplitResult, urlsplit

from ._client import KoalaClient
from ._delivery._engine import Route, proxy_for
from ._delivery._h11 import SocketEngine

__all__ = ["EXIT_ACCEPTED", "EXIT_CANNOT_CHECK", "EXIT_KEY_PROBLEM", "check"]

#: The key works.
EXIT_ACCEPTED = 0
#: No key, a malformed one, or Koala rejected it: fix the configuration.
EXIT_KEY_PROBLEM = 1
#: Koala could not be asked (unreachable, or an unexpected answer): try again, check the network.
EXIT_CANNOT_CHECK = 2

_REJECTED = (401, 403, 404)


def check(key: str | None, api_url: str | None, proxy: str | None, timeout: float, out: TextIO) -> int:
    """Check ``key`` (None: ``KOALA_PUBLIC_KEY``) against ``api_url`` (None: ``KOALA_API_URL``,
    then Koala's) through ``proxy`` (None: the environment's), writing a report to ``out``;
    returns the exit status."""

    def say(line: str) -> None:
        print(line, file=out)

    try:
        client = KoalaClient(public_key=key, api_url=api_url, proxy=proxy)
    except ValueError as exc:
        say(f"Configuration error: {exc}")
        return EXIT_KEY_PROBLEM
    client.shutdown(timeout=0)  # only its resolved settings are used; it never sends
    say(f"Koala API: {client.api_url} ({_origin(api_url, 'KOALA_API_URL', 'the default')})")
    used = proxy_for(client.api_url, proxy)  # what the sender posts through
    say(f"Proxy: {_proxy_report(urlsplit(client.api_url), proxy, used)}")
    if client.public_key is None:
        say(
            "Public key: none. Set KOALA_PUBLIC_KEY or pass --key; without a key the middleware runs in "
            "dry-run mode: it logs what it would send and sends nothing."
        )
        return EXIT_KEY_PROBLEM
    say(f"Public key: {client.public_key} ({_origin(key, 'KOALA_PUBLIC_KEY', None)})")
    auth_url = f"{client.api_url}/web/projects/{client.public_key}/auth"
    engine = SocketEngine(Route(client.api_url, used))  # the engine sync=True posts with
    try:
        answer = engine.send(
            "GET", auth_url, [(b"User-Agent", client.user_agent.encode())], b"", time.monotonic() + timeout
        )
    except Exception as exc:  # network, TLS, proxy, timeout: said in words below
        engine.close()
        if used is not None:
            say(
                f"Result: Koala unreachable through the proxy {_hide_password(used)} ({_describe(exc)}). "
                "Check that proxy, or NO_PROXY if Koala should be reached directly."
            )
        else:
            say(
                f"Result: Koala unreachable at {client.api_url} ({_describe(exc)}). Check the URL, DNS, "
                "the firewall, or whether this machine needs a proxy (HTTPS_PROXY)."
            )
        return EXIT_CANNOT_CHECK
    engine.close()
    status = answer.status
    if 200 <= status < 300:
        say(f"Result: key accepted (Koala answered {status} to GET {auth_url}). Events will be delivered.")
        return EXIT_ACCEPTED
    if status in _REJECTED:
        say(
            f"Result: key rejected (Koala answered {status}): Koala has no workspace with this public key. "
            "Copy the key from Koala (Settings > Workspace) into KOALA_PUBLIC_KEY; events sent with it "
            "are dropped as 'rejected'."
        )
        return EXIT_KEY_PROBLEM
    say(
        f"Result: could not check the key: Koala answered {status} to GET {auth_url}. Try again later; "
        "if it persists, the API URL may not be Koala's."
    )
    return EXIT_CANNOT_CHECK


def _origin(given: str | None, variable: str, default: str | None) -> str:
    if given:
        return "from the command line"
    if os.environ.get(variable):
        return f"from {variable}"
    return default or "none"


def _proxy_report(url: SplitResult, given: str | None, used: str | None) -> str:
    """Which proxy the requests to ``url`` take (``used``), and why, in words; any password
    in a proxy URL hidden."""
    if given is not None:
        return f"{_hide_password(given)} (from --proxy)"
    names = [case(name) for name in (f"{url.scheme}_proxy", "all_proxy") for case in (str.lower, str.upper)]
    variable = next((name for name in names if os.environ.get(name)), None)
    if used is not None:
        return f"{_hide_password(used)} (from {variable or 'the environment'})"
    if variable is not None:
        return f"none for {url.hostname}: NO_PROXY excludes it (else {_hide_password(os.environ[variable])} from {variable})"
    return "none (no HTTP_PROXY, HTTPS_PROXY or ALL_PROXY in the environment)"


def _hide_password(proxy: str) -> str:
    try:
        parsed = urlsplit(proxy)
        password = parsed.password
    except ValueError:
        return "(an invalid proxy URL)"
    if not password:
        return proxy
    user, _, host = parsed.netloc.rpartition("@")
    return parsed._replace(netloc=f"{user.partition(':')[0]}:***@{host}").geturl()


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
