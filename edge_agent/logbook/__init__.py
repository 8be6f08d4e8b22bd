"""Inference logs that are never lost: a durable SQLite buffer on the box, an uploader, a collector.

The server appends one record per request with :meth:`LogStore.append` (durable when it
returns), runs one :class:`Uploader` in the background, and answers ``GET /logs`` from
:meth:`LogStore.read`. Nothing here knows about HTTP routes, models or backends.
"""

from edge_agent.logbook.metrics import LogbookCollector
from edge_agent.logbook.store import (
    DB_FILENAME,
    MAX_READ_LIMIT,
    LogbookStats,
    LogStore,
    new_record_id,
)
from edge_agent.logbook.uploader import Uploader, UploadStats

__all__ = [
    "DB_FILENAME",
    "MAX_READ_LIMIT",
    "LogStore",
    "LogbookCollector",
    "LogbookStats",
    "UploadStats",
    "Uploader",
    "new_record_id",
]
