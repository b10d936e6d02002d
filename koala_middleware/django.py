"""Koala for Django: one ``settings.MIDDLEWARE`` entry, then ``request.koala`` in every view.

::

    MIDDLEWARE = [
        "django.middleware.security.SecurityMiddleware",
        "koala_middleware.django.KoalaMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        ...
    ]
    KOALA = {"exclude_paths": ["/healthz", "/static"]}  # optional; the key from KOALA_PUBLIC_KEY

Place it right after ``SecurityMiddleware`` (its HTTPS redirects go out without Koala work,
and without a cookie a browser would only keep for http) and before ``SessionMiddleware``
and everything else, so every view sees ``request.koala``; it must come after any
middleware of yours that corrects ``REMOTE_ADDR`` behind a proxy.

``settings.KOALA`` is a dict of the options ``KoalaClient`` and the other middlewares take
(``public_key``, ``api_url``, ``cookie_domain``, ``exclude_paths``, ``should_track``...),
or ``{"client": KoalaClient(...), ...middleware options}`` to share a client; without it
the key and URL come from ``KOALA_PUBLIC_KEY`` / ``KOALA_API_URL``, as elsewhere.

The cookie, privacy and cacheable-response rules are the shared ones of the WSGI and ASGI
middlewares, applied to Django's view of the request: the visitor IP is
``request.META["REMOTE_ADDR"]``, the host ``request.get_host()`` (so a new visitor on a host
outside ``ALLOWED_HOSTS`` gets Django's 400, and no cookie), https ``request.is_secure()``,
and ``exclude_paths`` match ``request.path_info``. The middleware runs sync or async,
whichever the stack around it is (no thread hop of its own), and hands what a request
recorded over when Django closes the response, after its body went out.

Under uvicorn (or any ASGI server), use this module's :func:`get_asgi_application` in your
project's ``asgi.py``: Django's own handler does not speak lifespan, so without it nothing
flushes pending batches when the server stops. Under gunicorn (WSGI) the client's exit hook
does. Only this module needs Django.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from http.cookies import Morsel
from typing import Any

try:
    from asgiref.sync import iscoroutinefunction, markcoroutinefunction
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("koala_middleware.django needs Django: pip install 'koala-middleware[django]'") from exc

from ._client import KoalaClient
from ._request import RequestInfo, RequestReader, client_ip, header_text, sec_gpc
from ._tracker import STARTED, RequestTracker, Tracker, bind, unbind
from ._visit import TRACKER_KEY, MiddlewareSettings, Visits, configure, outer_tracker
from .asgi import ASGIApp, Receive, Scope, Send, flush_at_shutdown, lifespan_with_flush

__all__ = ["KoalaMiddleware", "LifespanFlush", "get_asgi_application", "request_info"]

#: The ``request`` attribute that holds the tracker.
REQUEST_ATTRIBUTE = "koala"


def request_info(request: Any) -> RequestInfo:
    """Read what the rules need from a Django ``HttpRequest`` (``raw`` is the request)."""
    meta = request.META
    cookie = header_text(meta.get("HTTP_COOKIE"))
    host, _ = _site(request)
    user_agent, ip = _visitor(request)
    return RequestInfo(
        request.method or "GET",
        request.scheme,
        host,
        _path(request),
        [cookie] if cookie else [],
        user_agent,
        ip,
        _gpc(meta),
        request,
    )


def _gpc(meta: Mapping[str, Any]) -> bool:
    value = meta.get("HTTP_SEC_GPC")
    return value is not None and (value == "1" or sec_gpc(value))


def _path(request: Any) -> str:
    return request.path_info or "/"


def _site(request: Any) -> tuple[str | None, bool]:
    # get_host() checks ALLOWED_HOSTS: DisallowedHost propagates, and Django answers 400.
    return request.get_host(), request.is_secure()


def _visitor(request: Any) -> tuple[str | None, str | None]:
    meta = request.META
    user_agent = meta.get("HTTP_USER_AGENT")
    if user_agent.__class__ is not str:
        user_agent = header_text(user_agent)
    return user_agent or None, client_ip(meta.get("REMOTE_ADDR"))


REQUEST_READER = RequestReader(info=request_info, path=_path, site=_site, visitor=_visitor)


class KoalaMiddleware:
    """Gives every request a tracker (``request.koala``, ``current_tracker()``) and sets the
    ``ko_id`` cookie for new visitors. Configured from ``settings.KOALA`` (see the module).

    Behind an outer ``KoalaWSGIMiddleware`` or ``KoalaASGIMiddleware`` it only hands on
    their tracker, so a request never gets two ids.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)  # Django then calls it without a thread hop
        self.client, middleware_settings = _from_settings()
        self.visits = Visits(self.client, middleware_settings, REQUEST_READER, RequestTracker)
        self.pixel = _pixel_proxy(middleware_settings, self.client)  # None unless pixel_path is set

    def __call__(self, request: Any) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        if self.pixel is not None and request.path_info.startswith(self.pixel.prefix):
            return self.pixel.respond(request)  # the first-party pixel: never the views
        tracker = self._start(request)
        if tracker is None:
            return self.get_response(request)
        token = bind(tracker)
        try:
            response = self.get_response(request)
            if response.streaming:
                _bind_stream(response, tracker)
        except BaseException:
            tracker.finish()  # what the view recorded before raising is still sent
            raise
        finally:
            unbind(token)
        return self._respond(response, tracker)

    async def __acall__(self, request: Any) -> Any:
        if self.pixel is not None and request.path_info.startswith(self.pixel.prefix):
            return await self.pixel.respond_async(request)
        tracker = self._start(request)
        if tracker is None:
            return await self.get_response(request)
        token = bind(tracker)
        try:
            response = await self.get_response(request)
            if response.streaming:
                _bind_stream(response, tracker)
        except BaseException:
            tracker.finish()
            raise
        finally:
            unbind(token)
        return self._respond(response, tracker)

    def _start(self, request: Any) -> RequestTracker | None:
        """The request's tracker; None when an outer Koala middleware already made the
        tracker (it is handed on as ``request.koala``)."""
        meta = request.META
        outer = outer_tracker(getattr(request, "scope", None))  # ASGIRequest: the scope is apart
        if outer is None:
            tracker = self.visits.enter(meta, request, meta.get("HTTP_COOKIE"), _gpc(meta))
            if tracker is not None:
                setattr(request, REQUEST_ATTRIBUTE, tracker)
                return tracker
            outer = meta[TRACKER_KEY]  # an outer WSGI Koala: META is its environ
        setattr(request, REQUEST_ATTRIBUTE, outer)
        return None

    def _respond(self, response: Any, tracker: RequestTracker) -> Any:
        # The view has run: its response is this request's response start (reset() included).
        if tracker._set_cookies is None:  # no cookie pending: see asgi._with_cookies
            tracker._stage = STARTED
            cookies = None
        else:
            cookies = tracker.start_response(response.status_code, lambda: response.get("Cache-Control"))
        for set_cookie in cookies or ():
            name = set_cookie.partition("=")[0]
            if name not in response.cookies:  # the view set its own: it wins
                response.cookies[name] = _morsel(set_cookie)
        closers = getattr(response, "_resource_closers", None)
        if closers is None:  # not an HttpResponseBase: nothing will tell us it went out
            tracker.finish()
        else:
            # Django calls these from response.close(): WSGI servers after the body, its
            # ASGI handler after the last chunk, its test clients once the content is read.
            closers.append(tracker.finish)
        return response


def _pixel_proxy(middleware_settings: MiddlewareSettings, client: KoalaClient) -> Any:
    if middleware_settings.pixel is None:
        return None
    from ._pixel import egress_proxy, require_extra
    from ._pixel._django import DjangoPixelProxy

    require_extra("httpx", "anyio")

    return DjangoPixelProxy(middleware_settings.pixel, egress_proxy(client))


def _morsel(set_cookie: str) -> Morsel[str]:
    """The shared rules' ``Set-Cookie`` value as the ``Morsel`` that ``response.cookies``
    holds, so Django writes it (and its cache middleware sees it) like any other cookie."""
    first, _, attributes = set_cookie.partition("; ")
    name, _, value = first.partition("=")
    morsel = _attributes_morsel(attributes).copy()
    morsel.set(name, value, value)
    return morsel


@functools.lru_cache(maxsize=256)
def _attributes_morsel(attributes: str) -> Morsel[str]:
    """A Morsel holding ``Domain=...; Path=/; ...`` (the same for every new visitor of a
    host), parsed once: copying it costs 6 us, filling a Morsel afresh 15 us (measured)."""
    morsel: Morsel[str] = Morsel()
    for attribute in attributes.split("; "):  # Domain=, Path=, Max-Age=, SameSite=, Secure
        key, _, attribute_value = attribute.partition("=")
        morsel[key.lower()] = attribute_value or True
    return morsel


def _bind_stream(response: Any, tracker: Tracker) -> None:
    """Make ``current_tracker()`` work while a streaming response's body is produced, which
    happens after the middleware returned (as in the WSGI middleware's ``_Response``).

    A ``FileResponse`` is left as it is: its body runs no code of yours, and replacing its
    content would cost the server's ``wsgi.file_wrapper`` (sendfile).
    """
    if getattr(response, "file_to_stream", None) is not None:
        return
    content = response.streaming_content
    if response.is_async:
        response.streaming_content = _bound_chunks(content, tracker)
    else:
        context = contextvars.copy_context()  # the tracker is bound here
        response.streaming_content = map(context.run, itertools.repeat(iter(content).__next__))


async def _bound_chunks(content: AsyncIterator[bytes], tracker: Tracker) -> AsyncIterator[bytes]:
    iterator = aiter(content)
    while True:
        token = bind(tracker)
        try:
            chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        finally:
            unbind(token)
        yield chunk


# -- configuration ---------------------------------------------------------------------------

_NO_SETTING: Mapping[str, Any] = {}
_configured: tuple[Mapping[str, Any], KoalaClient, MiddlewareSettings] | None = None
_configure_lock = threading.Lock()


def _from_settings() -> tuple[KoalaClient, MiddlewareSettings]:
    """The client and middleware settings of ``settings.KOALA``, made once per value of it:
    Django builds a middleware per handler (each test ``Client`` has its own), and they all
    share one client (one sender) as long as the setting is the same object."""
    global _configured
    options = getattr(settings, "KOALA", _NO_SETTING)
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured(
            'settings.KOALA must be a dict of Koala options, e.g. {"exclude_paths": ["/healthz"]}, '
            'or {"client": KoalaClient(...)}'
        )
    with _configure_lock:
        if _configured is None or _configured[0] is not options:
            rest = dict(options)
            client = rest.pop("client", None)
            if client is not None and not isinstance(client, KoalaClient):
                raise ImproperlyConfigured('settings.KOALA["client"] must be a koala_middleware.KoalaClient')
            try:
                made, middleware_settings = configure(client, **rest)
            except (TypeError, ValueError) as exc:
                raise ImproperlyConfigured(f"settings.KOALA: {exc}") from exc
            _configured = (options, made, middleware_settings)
        return _configured[1], _configured[2]


# -- ASGI: flush at shutdown ---------------------------------------------------------------------


class LifespanFlush:
    """Wraps an ASGI app that does not speak lifespan (Django's) so that, when the server
    stops, pending batches are flushed (within ``shutdown_timeout``) before it is told the
    app has stopped. uvicorn ends its process with SIGTERM itself, so no exit hook runs.

    :param app: the ASGI application, e.g. Django's ``get_asgi_application()``.
    :param client: the client to flush; by default the one ``settings.KOALA`` configures.
    """

    def __init__(self, app: ASGIApp, client: KoalaClient | None = None) -> None:
        self.app = app
        self.client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan_with_flush(self.app, self._flush, scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _flush(self) -> None:
        client = self.client or _from_settings()[0]
        flush_at_shutdown(client)


def get_asgi_application() -> LifespanFlush:
    """Django's ``get_asgi_application()`` with lifespan spoken for the flush at shutdown.

    In your project's ``asgi.py``, the one line to change::

        from koala_middleware.django import get_asgi_application
        application = get_asgi_application()
    """
    from django.core.asgi import get_asgi_application as django_asgi_application

    return LifespanFlush(django_asgi_application())
