"""``koala-middleware check --pixel-url https://app.example.com/_k``: is the pixel served
first-party from the deployed app? The two checks of Koala's proxy guide, asked through it:
``<url>/v1/koala/sdk.js`` answers JavaScript (the CDN side), ``<url>/web/projects/<key>``
answers JSON (the API side)."""

from __future__ import annotations

import json
from typing import TextIO

__all__ = ["check_pixel"]

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_NOT_SERVED = 2


def check_pixel(pixel_url: str, key: str | None, timeout: float, out: TextIO) -> int:
    """Ask both documented URLs under ``pixel_url``, say what came back; the exit status."""
    import httpx

    def say(line: str) -> None:
        print(line, file=out)

    base = pixel_url.rstrip("/")
    if not base.startswith(("http://", "https://")) or "?" in base or "#" in base:
        say(
            f"Configuration error: --pixel-url must be the app's URL and pixel_path, e.g. https://app.example.com/_k; got {pixel_url!r}"
        )
        return EXIT_CONFIG
    checks = [("CDN (sdk.js)", f"{base}/v1/koala/sdk.js", "javascript")]
    if key:
        checks.append(("API", f"{base}/web/projects/{key}", "json"))
    else:
        say("API: not checked (no key: pass --key or set KOALA_PUBLIC_KEY)")
    failed = False
    # The app is asked as a browser would: directly, or through this machine's HTTP(S)_PROXY.
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=True) as http:
        for name, url, wanted in checks:
            try:
                response = http.get(url, headers={"Accept": "*/*", "User-Agent": "koala-middleware check"})
            except httpx.HTTPError as exc:
                say(f"{name}: GET {url} failed ({type(exc).__name__}: {exc}). Is the app reachable from here?")
                failed = True
                continue
            kind = response.headers.get("content-type", "(no Content-Type)")
            ok = 200 <= response.status_code < 300 and wanted in kind.lower()
            if ok and wanted == "json":
                try:
                    json.loads(response.content)
                except ValueError:
                    ok = False
            if ok:
                say(f"{name}: GET {url} -> {response.status_code} {kind}: served first-party.")
                continue
            failed = True
            hint = {
                404: "the app did not route it: is pixel_path set to this path on the middleware that serves it?",
                501: "a WebSocket upgrade reached a WSGI server",
                502: "the app could not reach Koala's upstream (egress firewall? HTTPS_PROXY?)",
                504: "Koala's upstream did not answer in time",
            }.get(response.status_code, f"expected {wanted}")
            say(f"{name}: GET {url} -> {response.status_code} {kind}: {hint}.")
    say("Result: " + ("the pixel is NOT served correctly here." if failed else "the pixel is served first-party."))
    return EXIT_NOT_SERVED if failed else EXIT_OK
