"""Getting batches to Koala without ever making the host app wait.

One concern per module:

- ``_queue``: the bounded queue between the request path and the sender;
- ``_policy``: verdicts, backoff, ``Retry-After`` and Koala's health (when to try again);
- ``_request``: each batch's HTTP request, built once before any network call;
- ``_engine``: the one interface every path posts through (route, deadline, answer cap);
  ``_h11``: the default engine (pure Python); ``_curl``: the optional libcurl engine;
- ``_sender``: what both modes share (accounting, ``on_error``, fork hooks);
- ``_worker``: the background sender thread and its lifecycle; ``_sync``: ``sync=True``;
- ``_spool``: the on-disk spool (``spool_dir``), and adopting what dead processes left;
- ``_stats``: counters, drop warnings, :class:`DeliveryError`; ``_settings``: the options.
"""

from ._settings import DeliverySettings
from ._stats import DeliveryError, DropReason, ErrorHook, Stats
from ._sync import SyncSender
from ._worker import BackgroundSender

__all__ = ["BackgroundSender", "DeliveryError", "DeliverySettings", "DropReason", "ErrorHook", "Stats", "SyncSender"]
