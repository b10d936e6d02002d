"""Koala for Flask: ``Koala(app)``, then ``request.koala`` in every handler.

The extension only wires the WSGI middleware into the app and exposes the tracker it made;
cookie, privacy and delivery rules are the middleware's. Only this module needs Flask.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

try:
    import flask
    from flask import Flask, current_app
    from markupsafe import Markup
    from werkzeug.middleware.proxy_fix import ProxyFix
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("koala_middleware.flask needs Flask: pip install 'koala-middleware[flask]'") from exc

from ._client import ClientOptions, KoalaClient
from ._tracker import Tracker
from ._visit import VisitorOptions
from .wsgi import ENVIRON_KEY, KoalaWSGIMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment
    from typing_extensions import Unpack

__all__ = ["Koala", "KoalaRequest", "KoalaRequestMixin", "request"]

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

    environ: WSGIEnvironment

    @property
    def koala(self) -> Tracker:
        """This request's tracker (a disabled one on excluded paths and opted-out visitors)."""
        tracker = self.environ.get(ENVIRON_KEY)
        if tracker is None:
            # Not through the middleware (test_request_context): a handler must not break
            # over tracking, so it gets a tracker that validates calls and records nothing.
            tracker = self.environ[ENVIRON_KEY] = Tracker(_middleware().client, enabled=False)
            _warn_no_middleware()
        return tracker


class KoalaRequest(KoalaRequestMixin, flask.Request):
    """Flask's request with ``request.koala``, the class :func:`Koala.init_app` makes."""


#: Flask's ``request`` proxy, typed as a :class:`KoalaRequest` so that type checkers know
#: ``request.koala`` is a :class:`~koala_middleware.Tracker`: ``from koala_middleware.flask
#: import request``. The very same object as ``flask.request``.
request = cast(KoalaRequest, flask.request)


class Koala:
    """The Flask extension: ``Koala(app)`` or ``koala = Koala(); koala.init_app(app)``.

    :param app: the Flask app; or call :meth:`init_app` later (app factories).
    :param client: a shared :class:`~koala_middleware.KoalaClient`; when omitted, each app
        gets one made from its options.
    :param options: the options of :class:`~koala_middleware.KoalaWSGIMiddleware` (visitor
        options, and without ``client`` the ``KoalaClient`` options).

    :meth:`init_app` also reads each option from ``app.config`` as ``KOALA_<NAME>``
    (``KOALA_PUBLIC_KEY``, ``KOALA_API_URL``, ``KOALA_COOKIE_DOMAIN``, ``KOALA_EXCLUDE_PATHS``,
    ...); what you pass here wins over the config, and the config over the environment.
    Each app keeps its own middleware and client in ``app.extensions["koala"]``.
    """

    def __init__(
        self, app: Flask | None = None, client: KoalaClient | None = None, **options: Unpack[VisitorOptions]
    ) -> None:
        self._client = client
        self._options = options
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
        from_config = _config_options(app.config, self._client is None)
        options = cast("VisitorOptions", {**from_config, **self._options})
        holder: Any = app
        attribute = "wsgi_app"
        while isinstance(getattr(holder, attribute), ProxyFix):
            holder, attribute = getattr(holder, attribute), "app"
        try:
            middleware = KoalaWSGIMiddleware(getattr(holder, attribute), self._client, **options)
        except (TypeError, ValueError) as exc:
            # The message names the keyword; a value from app.config is named as it is there.
            configured = [n for n in from_config if n not in self._options and str(exc).startswith(n + " ")]
            if configured:
                raise type(exc)(f"app.config['KOALA_{configured[0].upper()}']: {exc}") from exc
            raise
        setattr(holder, attribute, middleware)
        if not hasattr(app.request_class, "koala"):
            base = app.request_class
            app.request_class = type(f"Koala{base.__name__}", (KoalaRequestMixin, base), {"__module__": __name__})
        app.extensions[EXTENSION_KEY] = middleware
        app.jinja_env.globals.setdefault("koala_pixel", _koala_pixel)

    @property
    def client(self) -> KoalaClient:
        """The client of the current app (or the shared one passed as ``client``)."""
        if self._client is not None:
            return self._client
        return _middleware().client


def _config_options(config: Mapping[str, Any], with_client_options: bool) -> dict[str, Any]:
    """``KOALA_<NAME>`` entries of ``app.config`` as middleware options."""
    names = VisitorOptions.__optional_keys__ if with_client_options else _VISITOR_ONLY
    found = {}
    for name in names:
        key = f"KOALA_{name.upper()}"
        if key in config:
            found[name] = config[key]
    return found


_VISITOR_ONLY = VisitorOptions.__optional_keys__ - ClientOptions.__optional_keys__


def _koala_pixel(nonce: str | None = None) -> Markup:
    """``{{ koala_pixel(nonce=...) }}`` in templates: the pixel tag through ``pixel_path``."""
    from ._pixel._helpers import configured_snippet

    middleware = _middleware()
    settings = middleware.visits.settings.pixel
    return Markup(configured_snippet(middleware.client, settings, nonce, "Koala(app, pixel_path=...)"))


def _middleware() -> KoalaWSGIMiddleware:
    middleware = current_app.extensions.get(EXTENSION_KEY)
    if middleware is None:
        raise RuntimeError("request.koala needs Koala(app) (koala_middleware.flask) set up on this app")
    return middleware  # type: ignore[no-any-return]


def _warn_no_middleware() -> None:
    global _warned_no_middleware
    if not _warned_no_middleware:
        _warned_no_middleware = True
        logger.warning(LOG_NO_MIDDLEWARE)
