"""Koala for Flask: ``Koala(app)``, then ``request.koala`` in every handler.

The extension only wires the WSGI middleware into the app and exposes the tracker it made;
cookie, privacy and delivery rules are the middleware's. Only this module needs Flask.
"""

from __future__ import annotations

import logging
from typing import Any

try:
    from flask import Flask, current_app
    from werkzeug.middleware.proxy_fix import ProxyFix
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "koala_middleware.flask needs Flask: pip install 'koala-middleware[flask]'"
    ) from exc

from ._client import KoalaClient
from ._tracker import Tracker
from ._visit import MIDDLEWARE_OPTIONS, configure
from .wsgi import ENVIRON_KEY, KoalaWSGIMiddleware

__all__ = ["Koala", "KoalaRequestMixin"]

logger = logging.getLogger("koala_middleware")

LOG_NO_MIDDLEWARE = (
    "koala_middleware: request.koala was used on a request that did not pass through "
    "the Koala middleware (app.test_request_context()?); its calls are ignored (logged once)"
)
EXTENSION_KEY = "koala"

_warned_no_middleware = False


class KoalaRequestMixin:
    """Adds ``request.koala``; ``Koala(app)`` mixes it into ``app.request_class`` for you.

    Use it yourself only if you set ``app.request_class`` *after* ``Koala(app)``.
    """

    environ: dict[str, Any]

    @property
    def koala(self) -> Tracker:
        """This request's tracker (a disabled one on excluded paths and opted-out visitors)."""
        tracker = self.environ.get(ENVIRON_KEY)
        if tracker is None:
            # Not through the middleware (test_request_context): a handler must not break
            # over tracking, so it gets a tracker that validates calls and records nothing.
            tracker = self.environ[ENVIRON_KEY] = _extension().client._web_tracker(None, None, None, False)
            _warn_no_middleware()
        return tracker


class Koala:
    """The Flask extension: ``Koala(app)`` or ``koala = Koala(); koala.init_app(app)``.

    :param app: the Flask app; or call :meth:`init_app` later (app factories).
    :param client: a shared :class:`~koala_middleware.KoalaClient`; when omitted, one is
        made from ``options`` (and from ``KOALA_PUBLIC_KEY`` / ``KOALA_API_URL``).
    :param options: the options of :class:`~koala_middleware.KoalaWSGIMiddleware`.

    Options are checked here, where you wrote them. Every app this extension is set up on
    shares its one client, so one process keeps one sender.
    """

    def __init__(self, app: Flask | None = None, client: KoalaClient | None = None, **options: Any) -> None:
        self.client, _ = configure(client, options)
        self._middleware_options = {k: v for k, v in options.items() if k in MIDDLEWARE_OPTIONS}
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Wrap ``app.wsgi_app`` with the middleware and add ``request.koala``.

        If ``app.wsgi_app`` is already werkzeug's ``ProxyFix``, the middleware goes inside
        it, so the visitor's address, host and scheme are the corrected ones either way.
        """
        if not isinstance(app, Flask):
            raise TypeError(
                f"Koala(app) needs a Flask app, got {type(app).__name__}; "
                "wrap other WSGI apps with koala_middleware.KoalaWSGIMiddleware"
            )
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("Koala is already set up on this app; call Koala(app) or init_app(app) once")
        holder: Any = app
        attribute = "wsgi_app"
        while isinstance(getattr(holder, attribute), ProxyFix):
            holder, attribute = getattr(holder, attribute), "app"
        inner = getattr(holder, attribute)
        setattr(holder, attribute, KoalaWSGIMiddleware(inner, client=self.client, **self._middleware_options))
        if not hasattr(app.request_class, "koala"):
            base = app.request_class
            app.request_class = type(f"Koala{base.__name__}", (KoalaRequestMixin, base), {"__module__": __name__})
        app.extensions[EXTENSION_KEY] = self


def _extension() -> Koala:
    extension = current_app.extensions.get(EXTENSION_KEY)
    if extension is None:
        raise RuntimeError("request.koala needs Koala(app) (koala_middleware.flask) set up on this app")
    return extension  # type: ignore[no-any-return]


def _warn_no_middleware() -> None:
    global _warned_no_middleware
    if not _warned_no_middleware:
        _warned_no_middleware = True
        logger.warning(LOG_NO_MIDDLEWARE)
