"""The pixel's install snippet, pointing at the first-party path.

Koala's snippet (from its settings page) defines a ``window.ko`` command queue and loads
``<host>/v1/<key>/sdk.js``; for a proxy, its docs say to set ``window.koalaSettings.host``
before it. Both point at the prefix here, on the page's own origin unless ``host`` is given.
"""

from __future__ import annotations

import html
import json
import re

__all__ = ["pixel_snippet"]

_KEY = re.compile(r"[A-Za-z0-9_-]{1,200}")
_QUEUE_METHODS = ["identify", "track", "removeListeners", "open", "on", "off", "qualify", "ready"]


def _js(value: str) -> str:
    """A JavaScript string literal that is also safe inside ``<script>``."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def pixel_snippet(public_key: str, pixel_path: str, *, nonce: str | None = None, host: str | None = None) -> str:
    """The ``<script>`` tag that loads Koala's pixel through ``pixel_path``.

    :param public_key: your workspace's public key (as ``KOALA_PUBLIC_KEY``).
    :param pixel_path: the middleware's ``pixel_path``, e.g. ``"/_k"``.
    :param nonce: your Content-Security-Policy nonce, set on the tag and on the script it adds.
    :param host: the site's origin, e.g. ``"https://app.example.com"``; by default the page's own.
    """
    if not isinstance(public_key, str) or not _KEY.fullmatch(public_key):
        raise ValueError(f"public_key must be your Koala public key (letters, digits, '-', '_'), got {public_key!r}")
    if not isinstance(pixel_path, str) or not pixel_path.startswith("/") or "//" in pixel_path:
        raise ValueError(f"pixel_path must be the middleware's pixel_path such as '/_k', got {pixel_path!r}")
    if host is not None and (not isinstance(host, str) or not host.startswith(("https://", "http://"))):
        raise ValueError(f"host must be an origin such as 'https://app.example.com', got {host!r}")
    if nonce is not None and not isinstance(nonce, str):
        raise TypeError(f"nonce must be a str, got {type(nonce).__name__}")
    path = pixel_path.rstrip("/")
    base = f"{_js(host.rstrip('/') + path)}" if host else f"location.origin+{_js(path)}"
    src = f"{base}+{_js('/v1/' + public_key + '/sdk.js')}"
    nonce_attribute = f' nonce="{html.escape(nonce, quote=True)}"' if nonce else ""
    set_nonce = f"n.nonce={_js(nonce)}," if nonce else ""
    return (
        f"<script{nonce_attribute}>"
        f"window.koalaSettings=Object.assign(window.koalaSettings||{{}},{{host:{base}}});"
        "!function(){if(window.ko)return;window.ko=[],"
        f"{json.dumps(_QUEUE_METHODS)}.forEach(function(t){{ko[t]=function(){{"
        "var n=[].slice.call(arguments);return n.unshift(t),ko.push(n),ko}});"
        f'var n=document.createElement("script");{set_nonce}n.async=!0,n.setAttribute("src",{src}),'
        "(document.body||document.head).appendChild(n)}();</script>"
    )
