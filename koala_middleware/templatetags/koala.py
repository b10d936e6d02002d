"""``{% load koala %}{% koala_pixel %}``: Koala's pixel tag, served first-party through
``settings.KOALA["pixel_path"]`` (add ``"koala_middleware"`` to ``INSTALLED_APPS``).

``{% koala_pixel nonce=request.csp_nonce %}`` adds your Content-Security-Policy nonce.
"""

from __future__ import annotations

from django import template
from django.utils.safestring import SafeString, mark_safe

from .._pixel._helpers import configured_snippet
from ..django import _from_settings

register = template.Library()


@register.simple_tag  # type: ignore[untyped-decorator]
def koala_pixel(nonce: str | None = None) -> SafeString:
    client, middleware_settings = _from_settings()
    return mark_safe(configured_snippet(client, middleware_settings.pixel, nonce, 'settings.KOALA["pixel_path"]'))
