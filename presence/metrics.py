"""Every metric of a node, in the Prometheus text format (prometheus_client).

Each node has its own registry (tests run several nodes in one process). Metrics with labels are
bound once, here: a hot path holds the bound child and only calls ``inc()`` or ``observe()``.
"""

from __future__ import annotations

from bisect import bisect_left
from time import perf_counter
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
KINDS = ("device", "application")


class _PerValue:
    """Children of a labelled metric, made on first use of a value (an errno, a close code): those
    values are few, and the lookup is one dict access."""

    def __init__(self, metric, *prefix: str):
        self.metric = metric
        self.prefix = prefix
        self.children: dict = {}

    def __getitem__(self, value):
        child = self.children.get(value)
        if child is None:
            child = self.children[value] = self.metric.labels(*self.prefix, str(value))
        return child


class BulkHistogram:
    """A histogram the reactor fills without a lock, and many equal observations at once: a fan-out
    to 19,000 applications observes the same latency 19,000 times in one turn. Exported through a
    custom collector, so it scrapes like any prometheus_client histogram."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)     # the last one: above every bound (+Inf)
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation)
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric([], buckets, self.sum)
        yield family

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation)]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()

        connections = Gauge("presence_connections", "Open websocket connections, by kind", ["kind"], registry=r)
        self.connections = {kind: connections.labels(kind) for kind in KINDS}
        handshakes = Counter("presence_handshakes_total",
                             "Connections that authenticated (device connect, application key)", ["kind"], registry=r)
        self.handshakes = {kind: handshakes.labels(kind) for kind in KINDS}
        failures = Counter("presence_handshake_failures_total",
                           "Authentications refused, by kind and errno", ["kind", "errno"], registry=r)
        self.handshake_failures = {kind: _PerValue(failures, kind) for kind in KINDS}
        self.closes = _PerValue(Counter("presence_closes_total", "Connections the node closed, by close code",
                                        ["code"], registry=r))

        self.status_received = Counter("presence_status_changes_received_total",
                                       "Status messages devices sent that were applied", registry=r)
        self.status_refused = Counter("presence_status_changes_refused_total",
                                      "Status messages refused (rate limit, bad value, store down)", registry=r)
        self.updates_delivered = Counter("presence_updates_delivered_total",
                                         "Updates written to application connections (one per update and connection)",
                                         registry=r)
        self.delivery_latency = BulkHistogram("presence_delivery_latency_seconds",
                                              "From a change to its list being written to the application connections",
                                              LATENCY_BUCKETS, r)
        self.batch_size = BulkHistogram("presence_batch_size", "Updates per list sent to an application",
                                        BATCH_BUCKETS, r)
        self.slow_closed = Counter("presence_slow_connections_closed_total",
                                   "Application connections closed for not reading (their changes went back to the queue)",
                                   registry=r)
        catch_ups = Counter("presence_catch_ups_total",
                            "Application connections that caught up: sync (the state), since (a replay of the log), "
                            "resync (since older than the log: the state instead)", ["how"], registry=r)
        self.catch_ups = {how: catch_ups.labels(how) for how in ("sync", "since", "resync")}

        self.pending_items = Gauge("presence_pending_updates", "Updates waiting for applications that are away",
                                   registry=r)
        self.pending_oldest = Gauge("presence_pending_oldest_age_seconds", "Age of the oldest waiting update",
                                    registry=r)
        self.pending_expired = Counter("presence_pending_expired_total",
                                       "Waiting updates dropped after --pending-ttl", registry=r)

        self.notifications_queued = Counter("presence_notifications_queued_total",
                                            "Live notifications accepted into a queue", registry=r)
        self.notifications_delivered = Counter("presence_notifications_delivered_total",
                                               "Live notifications written to device connections (each connection)",
                                               registry=r)
        self.notifications_acked = Counter("presence_notifications_acknowledged_total",
                                           "Live notifications acknowledged by a device", registry=r)
        self.notifications_dropped = Counter("presence_notifications_dropped_total",
                                             "Oldest notifications dropped from a full queue", registry=r)
        self.notifications_expired = Counter("presence_notifications_expired_total",
                                             "Notifications that expired unacknowledged", registry=r)

        store_seconds = Histogram("presence_store_seconds", "Duration of store calls, by kind",
                                  ["op"], buckets=LATENCY_BUCKETS, registry=r)
        store_errors = Counter("presence_store_errors_total", "Store calls that failed to reach the database, by kind",
                               ["op"], registry=r)
        ops = ("query", "execute", "transaction")
        self._store_seconds = {op: store_seconds.labels(op) for op in ops}
        self._store_errors = {op: store_errors.labels(op) for op in ops}

        self.gc_pause = Histogram("presence_gc_pause_seconds",
                                  "Garbage collections, by how long they stopped the node", ["generation"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self._gc_pause = {g: self.gc_pause.labels(str(g)) for g in range(3)}
        self._gc_started = 0.0

        self.bus_changes = Counter("presence_bus_changes_total", "Changes of other nodes applied from the log",
                                   registry=r)
        self.bus_replays = Counter("presence_bus_replays_total",
                                   "Reconnections of the log listener (each replays what it missed)", registry=r)
        self.bus_lag = Gauge("presence_bus_lag_seconds",
                             "Age of the last change applied from another node when it was applied", registry=r)
        self.bus_connected = Gauge("presence_bus_connected", "1 while the log listener is connected", registry=r)

    def observe_store(self, op: str, seconds: float, ok: bool) -> None:
        self._store_seconds[op].observe(seconds)
        if not ok:
            self._store_errors[op].inc()

    def gc_callback(self, phase: str, info: dict) -> None:
        """For gc.callbacks: a full collection stops everything, so operators should see it."""
        if phase == "start":
            self._gc_started = perf_counter()
        else:
            self._gc_pause[info["generation"]].observe(perf_counter() - self._gc_started)

    def watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """A gauge read at scrape time (counts the node already keeps)."""
        gauge.set_function(read)
