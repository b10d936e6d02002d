"""Koala server-side tracking as WSGI and ASGI middleware.

Add the middleware to your app; in every handler, ``request.koala`` (Flask, Django),
``request.state.koala`` / ``get_tracker`` (FastAPI, Starlette) or ``current_tracker()``
is the visitor's :class:`Tracker`. What it records is sent to Koala after the response.
"""

from ._client import KoalaClient
from ._delivery import DeliveryError, DropReason, ErrorHook, Stats
from ._pixel import pixel_snippet
from ._protocol import Batch
from ._request import RequestInfo
from ._tracker import AccountRecorder, Tracker, current_tracker
from ._version import __version__
from ._visit import ShouldTrack
from .asgi import KoalaASGIMiddleware
from .wsgi import KoalaWSGIMiddleware

__all__ = [
    "AccountRecorder",
    "Batch",
    "DeliveryError",
    "DropReason",
    "ErrorHook",
    "KoalaASGIMiddleware",
    "KoalaClient",
    "KoalaWSGIMiddleware",
    "RequestInfo",
    "ShouldTrack",
    "Stats",
    "Tracker",
    "__version__",
    "current_tracker",
    "pixel_snippet",
]
