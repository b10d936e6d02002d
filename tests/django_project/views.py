"""Views that record through ``request.koala`` (sync and async) and ``current_tracker()``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from koala_middleware import current_tracker

#: What the streaming views produced so far (the tests read it to see the body is lazy).
produced: list[str] = []


class Boom(Exception):
    pass


def track(request: HttpRequest) -> HttpResponse:
    koala = request.koala  # type: ignore[attr-defined]
    assert current_tracker() is koala
    if "email" in request.GET:
        koala.identify(request.GET["email"], {"plan": "pro"})
    koala.track("Sync View", {"n": int(request.GET.get("n", 0))})
    return JsonResponse({"ko_id": koala.profile_id, "thread": threading.get_ident()})


async def async_track(request: HttpRequest) -> HttpResponse:
    koala = request.koala  # type: ignore[attr-defined]
    assert current_tracker() is koala
    await asyncio.sleep(0)
    if "email" in request.GET:
        koala.identify(request.GET["email"])
    koala.track("Async View", {"n": int(request.GET.get("n", 0))})
    return JsonResponse({"ko_id": koala.profile_id, "thread": threading.get_ident()})


def stream(request: HttpRequest) -> StreamingHttpResponse:
    def chunks() -> Iterator[bytes]:
        for n in range(3):
            produced.append(f"chunk {n}")
            current_tracker().track("Streamed Chunk", {"n": n})  # type: ignore[union-attr]
            yield f"chunk {n}\n".encode()

    return StreamingHttpResponse(chunks(), content_type="text/plain")


async def async_stream(request: HttpRequest) -> StreamingHttpResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for n in range(3):
            produced.append(f"async chunk {n}")
            current_tracker().track("Streamed Chunk", {"n": n})  # type: ignore[union-attr]
            await asyncio.sleep(0)
            yield f"chunk {n}\n".encode()

    return StreamingHttpResponse(chunks(), content_type="text/plain")


def boom(request: HttpRequest) -> HttpResponse:
    request.koala.track("Before Boom")  # type: ignore[attr-defined]
    raise Boom("view failed")


def cached(request: HttpRequest) -> HttpResponse:
    response = HttpResponse("same for everyone")
    response["Cache-Control"] = "public, max-age=60"
    return response


def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"ok enabled={request.koala.enabled}")  # type: ignore[attr-defined]


def who(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"ko_id": request.koala.profile_id, "ip": request.koala.ip})  # type: ignore[attr-defined]


def file(request: HttpRequest) -> FileResponse:
    request.koala.track("Downloaded")  # type: ignore[attr-defined]
    return FileResponse(open(__file__, "rb"))


def logout(request: HttpRequest) -> HttpResponse:
    koala = request.koala  # type: ignore[attr-defined]
    before = koala.profile_id
    koala.track("Before Reset")
    koala.reset()
    koala.track("After Reset")
    return JsonResponse({"before": before, "after": koala.profile_id})
