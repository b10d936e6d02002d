"""The snippet as the framework integrations offer it: the public key and path taken from the
middleware's own configuration, so a template needs at most a CSP nonce."""

from __future__ import annotations

from typing import Any

from ._settings import PixelSettings
from ._snippet import pixel_snippet

__all__ = ["configured_snippet"]

NO_KEY = "<!-- Koala pixel: no public key (dry-run mode), so nothing to load -->"


def configured_snippet(client: Any, pixel: PixelSettings | None, nonce: str | None, where: str) -> str:
    """The tag for ``client``'s key under ``pixel.path``; a comment in dry-run mode (no key).

    :param where: how the developer sets ``pixel_path`` here, for the error when it is not.
    """
    if pixel is None:
        raise RuntimeError(f"koala_pixel needs the first-party pixel turned on: set {where} (e.g. '/_k')")
    if client.public_key is None:
        return NO_KEY
    return pixel_snippet(client.public_key, pixel.path, nonce=nonce)
