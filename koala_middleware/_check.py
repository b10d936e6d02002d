"""``koala-middleware check``: does Koala accept this public key, asked from this machine?

It resolves the key and URL exactly as ``KoalaClient`` does (by building one), asks Koala's
key check (``GET {api_url}/web/projects/{key}/auth``, as Koala's own Segment destination
does) through httpx with the environment's proxy settings, and says what it found in plain
words. The exit status is 0 only when the key works, so a deploy script can stop on it.
"""

from __future__ import annotations

import os
import urllib.request
from typing import TextIO

import httpx

from ._client import KoalaClient

__all__ = ["EXIT_ACCEPTED", "EXIT_CANNOT_CHECK", "EXIT_KEY_PROBLEM", "check"]

#: The key works.
EXIT_ACCEPTED = 0
#: No key, a malformed one, or Koala rejected it: fix the configuration.
EXIT_KEY_PROBLEM = 1
#: Koala could not be asked (unreachable, or an unexpected answer): try again, check the network.
EXIT_CANNOT_CHECK = 2

_REJECTED = (401, 403, 404)


def check(key: str | None, api_url: str | None, timeout: float, out: TextIO) -> int:
    """Check ``key`` (None: ``KOALA_PUBLIC_KEY``) against ``api_url`` (None: ``KOALA_API_URL``,
    then Koala's), writing a report to ``out``; returns the exit status."""

    def say(line: str) -> None:
        print(line, file=out)

    try:
        client = KoalaClient(public_key=key, api_url=api_url)
    except ValueError as exc:
        say(f"Configuration error: {exc}")
        return EXIT_KEY_PROBLEM
    client.shutdown(timeout=0)  # only its resolved settings are used; it never sends
    say(f"Koala API: {client.api_url} ({_origin(api_url, 'KOALA_API_URL', 'the default')})")
    proxy, report = _proxy(httpx.URL(client.api_url))
    say(f"Proxy: {report}")
    if client.public_key is None:
        say(
            "Public key: none. Set KOALA_PUBLIC_KEY or pass --key; without a key the middleware runs in "
            "dry-run mode: it logs what it would send and sends nothing."
        )
        return EXIT_KEY_PROBLEM
    say(f"Public key: {client.public_key} ({_origin(key, 'KOALA_PUBLIC_KEY', None)})")
    auth_url = f"{client.api_url}/web/projects/{client.public_key}/auth"
    try:
        with httpx.Client(trust_env=True, timeout=timeout, headers={"User-Agent": client.user_agent}) as http:
            response = http.get(auth_url)
    except httpx.HTTPError as exc:
        if proxy is not None:
            say(
                f"Result: Koala unreachable through the proxy {proxy} ({_describe(exc)}). Check that proxy, "
                "or NO_PROXY if Koala should be reached directly."
            )
        else:
            say(
                f"Result: Koala unreachable at {client.api_url} ({_describe(exc)}). Check the URL, DNS, "
                "the firewall, or whether this machine needs a proxy (HTTPS_PROXY)."
            )
        return EXIT_CANNOT_CHECK
    status = response.status_code
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


def _proxy(url: httpx.URL) -> tuple[str | None, str]:
    """The proxy httpx's ``trust_env`` takes for ``url`` from HTTP(S)_PROXY / ALL_PROXY /
    NO_PROXY (any password in it hidden; None for none), and that finding in words."""
    proxies = urllib.request.getproxies()  # the environment's *_proxy variables, either case
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy:
        return None, "none (no HTTP_PROXY, HTTPS_PROXY or ALL_PROXY in the environment)"
    names = [case(name) for name in (f"{url.scheme}_proxy", "all_proxy") for case in (str.upper, str.lower)]
    variable = next((name for name in names if os.environ.get(name)), "the environment")
    shown = _hide_password(proxy)
    if urllib.request.proxy_bypass(url.host):
        return None, f"none for {url.host}: NO_PROXY excludes it (else {shown} from {variable})"
    return shown, f"{shown} (from {variable})"


def _hide_password(proxy: str) -> str:
    try:
        parsed = httpx.URL(proxy)
    except httpx.InvalidURL:
        return "(an invalid proxy URL)"
    return str(parsed.copy_with(username=parsed.username, password="***")) if parsed.password else proxy


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
