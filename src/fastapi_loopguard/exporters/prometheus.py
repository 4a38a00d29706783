"""Prometheus metrics, in base units, with route templates (never raw paths) as labels.

Two sources feed them:

* events, as they are delivered: ``loopguard_blocking_events_total{route,method,kind}``,
  ``loopguard_blocking_duration_seconds{route,method}``, ``loopguard_requests_delayed_total``
  (the sum of victims), ``loopguard_culprit_blocked_seconds_total{culprit,kind}`` (the culprit as
  ``module:function``, never a path) and ``loopguard_worker_blocking_events_total{worker}`` (the
  worker's index, else its pid: one series per worker process, also in multiprocess mode, where
  counters are otherwise summed over workers) are ordinary prometheus_client metrics;
* requests, as they end: ``loopguard_request_wait_seconds{route}``, how long each request was
  frozen by blocks that other requests (or code outside requests) caused, zero included, so its
  quantiles are over all requests of the route. The engine has summed it up already: one
  observation per request is the only work, and only with this exporter on;
* the engine's own totals (loop-lag histogram, saturation, drops, hangs, threshold), which change
  without any Python running. In one process a custom collector reads them at scrape time, so
  nothing polls. With ``PROMETHEUS_MULTIPROC_DIR`` set, a scrape reaches one worker and reads the
  other workers' values from their files, so each worker copies its engine totals into
  file-backed metrics instead: whenever events arrive, at most once a second while requests are
  served, when the guard stops, and before its own ``metrics_path`` answers.

Metrics are registered once per registry and shared by every guard that uses it.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from ..workers import identity
from .base import CulpritLabels, Exporter, RouteLabels

if TYPE_CHECKING:
    from ..events import BlockingEvent, RequestInfo
    from .base import StatsSource

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LAG_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Waits start small (a request that began just before a block ended) and are 0 for most requests.
WAIT_BUCKETS = (0.001, *DURATION_BUCKETS)
SYNC_INTERVAL_S = 1.0

_DOC = {
    "events": "Blocking events, by route template, method and kind of blocking.",
    "duration": "How long each blocking event held the event loop.",
    "delayed": "Requests that were in flight, and so frozen, while another one blocked the loop.",
    "lag": "Event-loop lag: how late each loop iteration started its wait for I/O.",
    "hangs": "Stalls that lasted past hang_threshold_ms.",
    "saturation": "Loop time spent busy with many short callbacks rather than one culprit.",
    "threshold": "Lag above which the loop counts as blocked.",
    "dropped": "Events the engine could not hand over because the queue was full.",
    "culprit": "Time the event loop was blocked, by culprit (module:function) and kind.",
    "worker": "Blocking events, by worker (its index if known, else its pid).",
    "wait": "How long each request was frozen by blocks that other requests' code, or code "
    "outside requests, caused.",
}


def multiprocess_dir() -> str | None:
    """The directory prometheus_client's multiprocess mode uses, if that mode is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _EngineCollector(Collector):
    """Reads engine totals of every guard using this registry, at scrape time (one process)."""

    def __init__(self) -> None:
        self.guards: weakref.WeakSet[StatsSource] = weakref.WeakSet()

    def describe(self) -> Iterable[Metric]:
        # Names only: registering must not read an engine that may not be running yet.
        return list(self._families([], 0.0, {}))

    def collect(self) -> Iterable[Metric]:
        counts = [0] * (len(LAG_BUCKETS) + 1)
        lag_sum = 0.0
        totals: dict[str, float] = {}
        for guard in list(self.guards):
            stats = guard.stats()
            if not stats:
                continue  # not running: nothing to read
            guard_counts, guard_sum = guard.lag_histogram(list(LAG_BUCKETS))
            counts = [a + b for a, b in zip(counts, guard_counts, strict=True)]
            lag_sum += guard_sum
            for key in ("hangs", "saturation_ms", "events_dropped"):
                totals[key] = totals.get(key, 0) + stats[key]
            totals["threshold_ms"] = max(totals.get("threshold_ms", 0), stats["threshold_ms"])
        return list(self._families(counts, lag_sum, totals))

    @staticmethod
    def _families(counts: list[int], lag_sum: float, totals: dict[str, float]) -> Iterator[Metric]:
        lag = HistogramMetricFamily("loopguard_loop_lag_seconds", _DOC["lag"], unit="seconds")
        if counts:
            # repr of these bounds is what prometheus_client itself prints ("0.0001", "1.0").
            bounds = [repr(b) for b in LAG_BUCKETS] + ["+Inf"]
            lag.add_metric([], list(zip(bounds, counts, strict=True)), lag_sum)
        yield lag
        counters = (
            ("loopguard_hangs", "hangs", "hangs", 1.0),
            ("loopguard_loop_saturation_seconds", "saturation", "saturation_ms", 1e-3),
            ("loopguard_events_dropped", "dropped", "events_dropped", 1.0),
        )
        for name, doc, key, scale in counters:
            family = CounterMetricFamily(name, _DOC[doc])
            if counts:
                family.add_metric([], totals.get(key, 0) * scale)
            yield family
        threshold = GaugeMetricFamily("loopguard_threshold_seconds", _DOC["threshold"])
        if "threshold_ms" in totals:
            threshold.add_metric([], totals["threshold_ms"] / 1000)
        yield threshold


class _Metrics:
    """The metric objects of one registry, shared by all guards that use it."""

    def __init__(self, registry: CollectorRegistry, multiprocess: bool) -> None:
        self.routes = RouteLabels()
        self.events = Counter(
            "loopguard_blocking_events",
            _DOC["events"],
            ["route", "method", "kind"],
            registry=registry,
        )
        self.duration = Histogram(
            "loopguard_blocking_duration_seconds",
            _DOC["duration"],
            ["route", "method"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.delayed = Counter("loopguard_requests_delayed", _DOC["delayed"], registry=registry)
        self.culprits = CulpritLabels()
        self.culprit_seconds = Counter(
            "loopguard_culprit_blocked_seconds",
            _DOC["culprit"],
            ["culprit", "kind"],
            registry=registry,
        )
        self.worker_events = Counter(
            "loopguard_worker_blocking_events", _DOC["worker"], ["worker"], registry=registry
        )
        self.wait = Histogram(
            "loopguard_request_wait_seconds",
            _DOC["wait"],
            ["route"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        # Its child per route label, kept: observed on every request, and labels() alone costs
        # more than the observation. As bounded as the route labels themselves.
        self.wait_by_route: dict[str, Any] = {}
        self.collector: _EngineCollector | None = None
        self.mirror: _Mirror | None = None
        if multiprocess:
            self.mirror = _Mirror(registry)
        else:
            self.collector = _EngineCollector()
            registry.register(self.collector)


class _Mirror:
    """File-backed copies of the engine totals, for multiprocess mode."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Histogram(
            "loopguard_loop_lag_seconds", _DOC["lag"], buckets=LAG_BUCKETS, registry=registry
        )
        self.hangs = Counter("loopguard_hangs", _DOC["hangs"], registry=registry)
        self.saturation = Counter(
            "loopguard_loop_saturation_seconds", _DOC["saturation"], registry=registry
        )
        self.dropped = Counter("loopguard_events_dropped", _DOC["dropped"], registry=registry)
        # One series per live worker (each has its own threshold); a worker's series leaves
        # with prometheus_client.multiprocess.mark_process_dead(pid) in gunicorn's child_exit.
        self.threshold = Gauge(
            "loopguard_threshold_seconds",
            _DOC["threshold"],
            registry=registry,
            multiprocess_mode="liveall",
        )


_metrics_lock = threading.Lock()
_metrics_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = (
    weakref.WeakKeyDictionary()
)


def _metrics_for(registry: CollectorRegistry) -> _Metrics:
    with _metrics_lock:
        metrics = _metrics_by_registry.get(registry)
        if metrics is None:
            metrics = _metrics_by_registry[registry] = _Metrics(
                registry, multiprocess_dir() is not None
            )
        return metrics


class PrometheusExporter(Exporter):
    """Feeds the metrics from one guard's events and engine."""

    def __init__(self, guard: StatsSource, registry: CollectorRegistry | None = None) -> None:
        self.guard = guard
        self.registry = registry if registry is not None else REGISTRY
        self.metrics = _metrics_for(self.registry)
        if self.metrics.collector is not None:
            self.metrics.collector.guards.add(guard)
        # Multiprocess mode: the engine totals already copied, to add only the difference.
        self.wants_requests = self.metrics.mirror is not None
        self._copied: dict[str, Any] = {}
        self._next_sync = 0.0

    def export(self, event: BlockingEvent, info: RequestInfo | None) -> None:
        m = self.metrics
        route, method = m.routes.route(event), m.routes.method(event)
        m.events.labels(route, method, event.kind).inc()
        m.duration.labels(route, method).observe(event.duration_ms / 1000)
        if event.victims:
            m.delayed.inc(event.victims)
        m.culprit_seconds.labels(m.culprits.culprit(event), event.kind).inc(
            event.duration_ms / 1000
        )
        m.worker_events.labels(identity().label).inc()
        self.sync()

    wants_request_ends = True

    def request_ended(self, info: RequestInfo, wait_ms: float, block_ms: float) -> None:
        if info.method is None:
            return  # labelled work (lifespan, tests): no request anybody waits for
        m = self.metrics
        route = m.routes.route_of(info.method, info.route)
        child = m.wait_by_route.get(route)
        if child is None:
            child = m.wait_by_route[route] = m.wait.labels(route)
        child.observe(wait_ms / 1000)

    def request_started(self, info: RequestInfo) -> None:
        # Only in multiprocess mode: a clock read per request, a copy at most once a second.
        if time.monotonic() >= self._next_sync:
            self.sync()

    def flush(self) -> None:
        self.sync()

    def sync(self) -> None:
        """Copies the engine totals into the file-backed metrics (multiprocess mode only)."""
        mirror = self.metrics.mirror
        stats = self.guard.stats()
        if mirror is None or not stats:
            return
        self._next_sync = time.monotonic() + SYNC_INTERVAL_S
        counts, lag_sum = self.guard.lag_histogram(list(LAG_BUCKETS))
        now = {
            "hangs": stats["hangs"],
            "saturation": stats["saturation_ms"] / 1000,
            "dropped": stats["events_dropped"],
            "lag_counts": counts,
            "lag_sum": lag_sum,
        }
        before = self._copied
        # A restarted engine (new loop) counts from zero again: copy all of it.
        if not before or now["hangs"] < before["hangs"] or counts[-1] < before["lag_counts"][-1]:
            before = {"hangs": 0, "saturation": 0.0, "dropped": 0, "lag_sum": 0.0}
            before["lag_counts"] = [0] * len(counts)
        mirror.hangs.inc(now["hangs"] - before["hangs"])
        mirror.saturation.inc(max(now["saturation"] - before["saturation"], 0.0))
        mirror.dropped.inc(now["dropped"] - before["dropped"])
        # prometheus_client's Histogram can only observe one value at a time, and a busy loop
        # records thousands of lags a second; so the per-bucket differences are added to its
        # bucket values directly (non-cumulative, as observe() stores them).
        previous = 0
        for i, (count, old) in enumerate(zip(counts, before["lag_counts"], strict=True)):
            delta = (count - old) - previous
            previous = count - old
            if delta:
                mirror.lag._buckets[i].inc(delta)
        mirror.lag._sum.inc(max(lag_sum - before["lag_sum"], 0.0))
        mirror.threshold.set(stats["threshold_ms"] / 1000)
        self._copied = now

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for a scrape of ``metrics_path``, in the format ``accept`` asks for."""
        encoder, content_type = choose_encoder(accept or "")
        if self.metrics.mirror is None:
            return encoder(self.registry), content_type
        self.sync()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, multiprocess_dir())  # type: ignore[no-untyped-call]
        return encoder(registry), content_type
