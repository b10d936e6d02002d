"""A plain ``gevent.monkey.patch_all()`` process: ``python -m tests.e2e.apps.gevent_script MODE``.

Koala's address comes from ``KOALA_API_URL``. MODE:

- ``start``: records its first event before the main thread's gevent hub exists (the
  sender's native thread used to build a gevent hub of its own through the patched
  ``socket.socketpair`` and deadlock on import locks with the main thread), flushes, prints
  ``{"flushed": ...}`` and exits;
- ``connect``: on a sender thread, the sender's event loop opens a connection to Koala with
  ``loop.create_connection`` (as the pure-Python delivery engine does) and prints whether
  that thread got a gevent hub (``{"hub": false}`` expected);
- ``pywsgi``: a ``gevent.pywsgi`` server (SIGTERM left at its default action, so the
  client's flush handler is installed) that tracks one event per request; prints
  ``{"port": ...}`` once listening. SIGTERM must end it (it used to hang in
  ``pthread_kill`` with a greenlet's id for a thread's).
"""

from gevent import monkey

monkey.patch_all()

import faulthandler  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402

from koala_middleware import KoalaClient  # noqa: E402


def connect() -> None:
    import asyncio
    from urllib.parse import urlsplit

    from gevent._hub_local import get_hub_if_exists

    from koala_middleware._delivery import _native

    url = urlsplit(os.environ["KOALA_API_URL"])
    seen: list[object] = []

    def run() -> None:
        loop = _native.new_event_loop(_native.new_selector())
        try:
            transport, _ = loop.run_until_complete(loop.create_connection(asyncio.Protocol, "localhost", url.port))
            transport.close()
            seen.append(get_hub_if_exists() is not None)
        except BaseException as error:
            seen.append(repr(error))
        finally:
            loop.close()

    thread = _native.SenderThread(run, "koala-sender")
    thread.start()
    thread.join(10)
    print(json.dumps({"hub": seen[0] if seen else "timed out"}), flush=True)


def main(mode: str) -> None:
    if mode == "connect":
        connect()
        return
    client = KoalaClient("pk_test", api_url=os.environ["KOALA_API_URL"], shutdown_timeout=3)
    if mode == "start":
        with client.tracker(profile_id=str(uuid.uuid4())) as tracker:
            tracker.track("Started", {"pid": os.getpid()})
        print(json.dumps({"flushed": client.flush(5)}), flush=True)
        return
    from gevent.pywsgi import WSGIServer

    from koala_middleware.wsgi import KoalaWSGIMiddleware

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        environ["koala.tracker"].track("Pinged", {"pid": os.getpid()})
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    server = WSGIServer(("127.0.0.1", 0), KoalaWSGIMiddleware(app, client=client), log=None)
    server.start()
    print(json.dumps({"port": server.server_port}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung run's stacks, for the test
    main(sys.argv[1])
