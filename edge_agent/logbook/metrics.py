"""``edge_agent_logbook_*`` Prometheus series, read live from a store and its uploader.

A collector that reads state at scrape time (instead of module-level Counter objects)
means the persisted dropped count survives restarts. Neither the store nor the
uploader knows of it: whoever owns them (the app) makes one and registers it where
its metrics are served, so two daemons in one process (tests) never share a name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.logbook.store import LogStore
from edge_agent.logbook.uploader import Uploader

PREFIX = "edge_agent_logbook_"


class LogbookCollector(Collector):
    """Reads one store's state, and its uploader's once there is one, at each scrape."""

    def __init__(self, store: LogStore, uploader: Uploader | None = None) -> None:
        self.store = store
        self.uploader = uploader

    def describe(self) -> Iterator[Metric]:
        # Names only, so the registry can reject a clash without reading any state.
        yield from _families().values()

    def collect(self) -> Iterator[Metric]:
        f = _families()
        now_ms = time.time() * 1000
        oldest: float | None = None
        for store in [self.store]:
            s = store.stats()
            f["records"].add_metric([], s.records)
            f["bytes"].add_metric([], s.disk_bytes)
            f["record_bytes"].add_metric([], s.record_bytes)
            f["max_bytes"].add_metric([], s.max_bytes)
            f["appended_records"].add_metric([], s.appended_total)
            f["commits"].add_metric([], s.commits)
            f["dropped_records"].add_metric([], s.dropped_total)
            f["dropped_unreported_records"].add_metric([], s.dropped_unreported)
            f["append_failures"].add_metric([], s.append_failures)
            f["parked_batches"].add_metric([], s.parked_batches)
            f["parked_records"].add_metric([], s.parked_records)
            f["backlog_records"].add_metric([], s.pending)
            if s.oldest_pending_ms is not None:
                oldest = s.oldest_pending_ms if oldest is None else min(oldest, s.oldest_pending_ms)
        f["backlog_age_seconds"].add_metric(
            [], 0.0 if oldest is None else max(0.0, (now_ms - oldest) / 1000)
        )
        for uploader in [self.uploader] if self.uploader is not None else []:
            u = uploader.stats()
            f["upload_successes"].add_metric([], u.successes)
            f["upload_failures"].add_metric([], u.failures)
            f["uploaded_records"].add_metric([], u.uploaded_records)
        yield from _merged(f)


def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
    def gauge(name: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(PREFIX + name, doc)

    def counter(name: str, doc: str) -> CounterMetricFamily:
        return CounterMetricFamily(PREFIX + name, doc)

    return {
        "records": gauge("records", "Records held in the local inference log."),
        "bytes": gauge("bytes", "Bytes on disk of the local inference log (database + WAL)."),
        "record_bytes": gauge("record_bytes", "Bytes of record JSON held in the local log."),
        "max_bytes": gauge("max_bytes", "Configured storage cap of the local inference log."),
        "appended_records": counter(
            "appended_records", "Records committed to the local log by this process."
        ),
        "commits": counter(
            "commits", "Append transactions (several concurrent appends share one)."
        ),
        "dropped_records": counter(
            "dropped_records",
            "Records deleted by the storage cap before any collector acknowledged them "
            "(persisted across restarts).",
        ),
        "dropped_unreported_records": gauge(
            "dropped_unreported_records",
            "Dropped records not yet reported to the collector in an upload batch.",
        ),
        "append_failures": counter(
            "append_failures",
            "Records that could not be written (disk full, I/O error): these are lost.",
        ),
        "parked_batches": gauge(
            "parked_batches", "Batches the collector rejected for good, kept on disk."
        ),
        "parked_records": gauge("parked_records", "Records in parked batches."),
        "backlog_records": gauge("backlog_records", "Records waiting to be uploaded."),
        "backlog_age_seconds": gauge(
            "backlog_age_seconds", "Age of the oldest record waiting to be uploaded."
        ),
        "upload_successes": counter(
            "upload_successes", "Upload requests the collector acknowledged (2xx)."
        ),
        "upload_failures": counter(
            "upload_failures", "Upload requests that failed (network, 5xx, 4xx)."
        ),
        "uploaded_records": counter("uploaded_records", "Records the collector acknowledged."),
    }


def _merged(families: dict[str, GaugeMetricFamily | CounterMetricFamily]) -> Iterator[Metric]:
    """One sample per family: several attached stores are summed, not repeated."""
    for family in families.values():
        if not family.samples:
            if family.name.endswith("backlog_age_seconds"):
                yield family
                continue
            # A family with no source still reports 0, so dashboards see the series.
            family.add_metric([], 0)
            yield family
            continue
        by_name: dict[str, float] = {}
        for sample in family.samples:
            by_name[sample.name] = by_name.get(sample.name, 0.0) + sample.value
        merged = type(family)(family.name, family.documentation)
        for value in by_name.values():
            merged.add_metric([], value)
        yield merged
