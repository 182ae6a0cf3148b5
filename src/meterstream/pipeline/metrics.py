"""Prometheus metrics of the worker, the collectors and the InfluxDB sink, in one registry.

Two kinds: counters of things as they happen (reads by outcome, link events, command results,
events by kind, dead letters; `count_*`, called from collector_kafka.py and app.py), and values
read at scrape time from the live objects (`watch`: a worker's counters, command states and
consumer lag, a collector's spool and terminals, the InfluxDB sink's stats), so nothing is
counted twice and a stopped object drops out. Served by prometheus_client's own HTTP server on
its own port (`serve`); never on the JSON API. Names and meanings: docs/operations.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("meterstream.metrics")

#: The process's registry (the default one of prometheus_client is left alone).
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

#: ReadingBatch outcome codes -> label (collectors/batch.py OUTCOME_*)
OUTCOMES = ("ok", "timeout", "error", "bad_frame")

# --- counted as it happens ---------------------------------------------------------------------

COLLECTOR_READS = Counter("meterstream_collector_reads", "Meter reads published by the "
                          "collectors, by outcome (ok, timeout, error, bad_frame)", ["outcome"],
                          registry=REGISTRY)
COLLECTOR_BATCHES = Counter("meterstream_collector_batches", "Reading batches published (one "
                            "per terminal per poll cycle)", registry=REGISTRY)
COLLECTOR_LINK_EVENTS = Counter("meterstream_collector_link_events", "Collector events by kind "
                                "(up, down, heartbeat_missed, registration, rejected, demoted, "
                                "...)", ["kind"], registry=REGISTRY)
COLLECTOR_COMMAND_RESULTS = Counter("meterstream_collector_command_results", "Remote-control "
                                    "results by action and outcome", ["action", "outcome"],
                                    registry=REGISTRY)
COLLECTOR_DEAD_LETTERS = Counter("meterstream_collector_dead_letters", "Commands the "
                                 "collectors refused as malformed (to the dead-letter topic)",
                                 registry=REGISTRY)
WORKER_EVENTS = Counter("meterstream_worker_events", "Events the worker published, by kind "
                        "(alarms, anomalies, payments, work orders; docs/operations.md)",
                        ["kind"], registry=REGISTRY)
WORKER_COMMAND_TRANSITIONS = Counter("meterstream_worker_command_transitions", "Command state "
                                     "transitions (audit records), by the state entered",
                                     ["state"], registry=REGISTRY)
WORKER_COMMANDS_SENT = Counter("meterstream_worker_commands_published", "Commands published to "
                               "the collectors, by action", ["action"], registry=REGISTRY)
WORKER_DEAD_LETTERS = Counter("meterstream_worker_dead_letters", "Input the worker refused (to "
                              "the dead-letter topic), by source topic", ["source"],
                              registry=REGISTRY)


def count_batch(outcome: np.ndarray) -> None:
    """A published reading batch: its rows by outcome."""
    COLLECTOR_BATCHES.inc()
    if outcome.shape[0]:
        counts = np.bincount(np.clip(outcome.astype(np.int64), 0, len(OUTCOMES) - 1),
                             minlength=len(OUTCOMES))
        for name, n in zip(OUTCOMES, counts.tolist()):
            if n:
                COLLECTOR_READS.labels(name).inc(n)


def count_worker_out(topic_kind: str, doc: dict[str, Any]) -> None:
    """One message the worker published on events / commands / dead-letter (its JSON)."""
    if topic_kind == "events":
        t = doc.get("type")
        if t == "command_audit":
            WORKER_COMMAND_TRANSITIONS.labels(str(doc.get("to_state"))).inc()
        elif t == "work_order":
            WORKER_EVENTS.labels(f"work_order_{doc.get('kind')}").inc()
        else:
            WORKER_EVENTS.labels(str(doc.get("kind"))).inc()
    elif topic_kind == "commands":
        WORKER_COMMANDS_SENT.labels(str(doc.get("action"))).inc()
    elif topic_kind == "dead-letter":
        WORKER_DEAD_LETTERS.labels(str(doc.get("source"))).inc()


# --- read at scrape time -----------------------------------------------------------------------

_watched: dict[str, weakref.WeakSet[Any]] = {"worker": weakref.WeakSet(),
                                             "collector": weakref.WeakSet(),
                                             "influx": weakref.WeakSet()}
_lock = threading.Lock()


def watch(kind: str, obj: Any) -> None:
    """Report `obj` (a WorkerApp, a KafkaCollector or an InfluxSink) at every scrape."""
    with _lock:
        _watched[kind].add(obj)


def unwatch(kind: str, obj: Any) -> None:
    with _lock:
        _watched[kind].discard(obj)


def _live(kind: str) -> list[Any]:
    with _lock:
        return list(_watched[kind])


_WORKER_COUNTERS = {  # WorkerCore.counters key -> (metric, help)
    "batches": ("meterstream_worker_batches", "Reading batches applied"),
    "readings": ("meterstream_worker_readings", "Readings billed (ok rows of known meters)"),
    "replayed_batches": ("meterstream_worker_replayed_batches",
                         "Batches older than their terminal's last: copies, or delivered late"),
    "late_readings": ("meterstream_worker_late_readings",
                      "Late readings that billed an advance not billed yet (backfill)"),
    "payments": ("meterstream_worker_payments", "Payments applied or recognised"),
    "duplicate_payments": ("meterstream_worker_duplicate_payments",
                           "Payments seen before (same transaction id), credited once"),
    "results": ("meterstream_worker_command_results", "Command results taken from collectors"),
    "stale_results": ("meterstream_worker_stale_results",
                      "Results of an attempt the book had already closed"),
    "unknown": ("meterstream_worker_unknown_terminal_batches",
                "Batches of a terminal not in the archive (dead-lettered)"),
    "commands_sent": ("meterstream_worker_commands_sent", "Command attempts sent"),
}


def _open_states(worker: Any, tries: int = 5) -> dict[str, int]:
    """Open commands by state. The scrape runs on the HTTP server's thread while the event loop
    changes the books: a book changed in the middle of the count is counted again."""
    for _ in range(tries):
        try:
            by: dict[str, int] = {}
            for book in list(worker.core.books.values()):
                for c in book.open_commands():
                    by[c.state] = by.get(c.state, 0) + 1
            return by
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return {}


class _Live(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from self._workers(_live("worker"))
        yield from self._collectors(_live("collector"))
        yield from self._influx(_live("influx"))

    @staticmethod
    def _workers(workers: list[Any]) -> Iterator[Metric]:
        if not workers:
            return
        for key, (name, doc) in _WORKER_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=sum(w.core.counters.get(key, 0)
                                                           for w in workers))
        yield CounterMetricFamily("meterstream_worker_message_errors", "Messages the core could "
                                  "not take (logged, dead-lettered)",
                                  value=sum(w.errors for w in workers))
        states = GaugeMetricFamily("meterstream_worker_open_commands", "Open commands by state "
                                   "(issued, queued, sent, unconfirmed)", labels=["state"])
        by: dict[str, int] = {}
        for w in workers:
            for state, n in _open_states(w).items():
                by[state] = by.get(state, 0) + n
        for state in ("issued", "queued", "sent", "unconfirmed"):
            states.add_metric([state], by.pop(state, 0))
        for state, n in sorted(by.items()):
            states.add_metric([state], n)
        yield states
        owned = GaugeMetricFamily("meterstream_worker_terminals_owned", "Terminals of the "
                                  "partitions this worker holds")
        lag = GaugeMetricFamily("meterstream_worker_consumer_lag", "Messages behind the end of "
                                "each partition it reads (Faust monitor: end offset - last read "
                                "- 1)", labels=["topic", "partition"])
        n_owned = 0
        for w in workers:
            with contextlib.suppress(Exception):  # not started or rebalancing: count none
                n_owned += len(w.owned())
            mon = getattr(w.app, "monitor", None)
            ends = dict(getattr(mon, "tp_end_offsets", None) or {})
            reads = dict(getattr(mon, "tp_read_offsets", None) or {})
            commits = dict(getattr(mon, "tp_committed_offsets", None) or {})
            for tp, end in ends.items():
                # the last offset read, else the last committed (the next to read), else unknown
                read = reads.get(tp)
                done = read + 1 if read is not None else commits.get(tp)
                if done is not None:
                    lag.add_metric([tp.topic, str(tp.partition)], max(0, end - done))
        owned.add_metric([], n_owned)
        yield owned
        yield lag
        kpi = GaugeMetricFamily("meterstream_worker_kpi", "The worker's last KPI snapshot "
                                "(integers: counts, basis points)", labels=["kpi"])
        for w in workers:
            k = w.kpis or {}
            for name in ("terminals", "online", "customers", "in_arrears", "cut_off",
                         "reconnection_timeliness_bp"):
                if isinstance(k.get(name), int):
                    kpi.add_metric([name], k[name])
            for cls, bp in (k.get("success_bp_by_class") or {}).items():
                if isinstance(bp, int):
                    kpi.add_metric([f"success_rate_bp_{cls}"], bp)
        yield kpi

    @staticmethod
    def _collectors(kcs: list[Any]) -> Iterator[Metric]:
        if not kcs:
            return
        rec = CounterMetricFamily("meterstream_collector_records", "Kafka records of the "
                                  "collectors' sink by result (handed, published, spooled, "
                                  "replayed, failed, refused)", labels=["result"])
        stats = [kc.sink.stats for kc in kcs]
        for r in ("handed", "published", "spooled", "replayed", "failed", "refused"):
            rec.add_metric([r], sum(getattr(s, r) for s in stats))
        yield rec
        yield CounterMetricFamily("meterstream_collector_delivery_errors", "Delivery errors seen "
                                  "(every attempt)", value=sum(s.errors for s in stats))
        gauges = {
            "spool_bytes": ("Bytes in the collector spool (waiting for Kafka)",
                            lambda kc: kc.sink.spool.bytes),
            "spool_files": ("Files in the collector spool", lambda kc: len(kc.sink.spool)),
            "pending_records": ("Records handed and not yet acknowledged or spooled",
                                lambda kc: kc.sink.pending),
            "spooling": ("1 while Kafka is unreachable (or the spool is being replayed)",
                         lambda kc: int(kc.sink.spooling)),
            "terminals_held": ("Terminals this process holds",
                               lambda kc: len(kc.collector.sessions)),
            "terminals_online": ("Terminals online now", lambda kc: sum(
                1 for s in list(kc.collector.sessions.values()) if s.online)),
            "partitions_held": ("Partitions of the commands topic held", lambda kc: len(kc.held)),
            "commands_running": ("Commands executing now", lambda kc: len(kc._tasks)),
        }
        for name, (doc, fn) in gauges.items():
            yield GaugeMetricFamily(f"meterstream_collector_{name}", doc,
                                    value=sum(fn(kc) for kc in kcs))
        yield CounterMetricFamily("meterstream_collector_commands_taken", "Commands taken from "
                                  "the commands topic", value=sum(kc.commands_taken for kc in kcs))
        yield CounterMetricFamily("meterstream_collector_rebalances", "Consumer group "
                                  "assignments seen", value=sum(kc.rebalances for kc in kcs))
        lag = GaugeMetricFamily("meterstream_collector_commands_lag", "Commands behind the end of "
                                "each held partition (high watermark - next offset taken)",
                                labels=["partition"])
        for kc in kcs:
            for p, n in kc.commands_lag().items():
                lag.add_metric([str(p)], n)
        yield lag

    @staticmethod
    def _influx(sinks: list[Any]) -> Iterator[Metric]:
        if not sinks:
            return
        stats = [s.stats for s in sinks]
        pts = CounterMetricFamily("meterstream_influx_points", "InfluxDB points by result "
                                  "(written, spooled, retried, rejected, refused, errors)",
                                  labels=["result"])
        for r in ("written", "spooled", "retried", "rejected", "refused", "errors"):
            pts.add_metric([r], sum(getattr(s, r) for s in stats))
        yield pts
        yield CounterMetricFamily("meterstream_influx_adopted_bytes", "Bytes of spool files "
                                  "taken over from stopped processes",
                                  value=sum(s.adopted for s in stats))
        for name, doc in (("spool_bytes", "Bytes in the InfluxDB spool"),
                          ("spool_files", "Files in the InfluxDB spool"),
                          ("pending", "Points waiting in memory")):
            yield GaugeMetricFamily(f"meterstream_influx_{name}", doc,
                                    value=sum(getattr(s, name) for s in stats))
        yield GaugeMetricFamily("meterstream_influx_server_up", "1 while InfluxDB answers "
                                "(the lowest of this process's sinks)",
                                value=min(int(s.server_up) for s in stats))


REGISTRY.register(_Live())


def serve(port: int, host: str = "0.0.0.0") -> Any:
    """/metrics on host:port in a thread of its own (prometheus_client's server); the server,
    whose `shutdown()` stops it. OSError when the port is taken."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server


def stop(server: Any) -> None:
    server.shutdown()
    server.server_close()
