"""Metrics for the Ray dashboard: ``confidential_*`` (exported by Ray as ``ray_confidential_*``).

Short-lived processes (drivers, task workers) buffer their figures and hand them to one long-lived
detached actor, the metrics sink, which records them with ``ray.util.metrics``; so a short job's
figures still reach the metrics endpoint after its driver exits. Tag values come only from fixed
allow-lists (TEE kinds, results, directions) or from operator-defined pool names; anything else is
recorded as "other", so no user-controlled string becomes a label value.

Who records what: drivers record seal/unseal latency and bytes (``rc.put`` / ``rc.get``, flushed by
``rc.shutdown``); enclave executors are not Ray processes, so each reply carries a ``report`` of
what the executor did at the broker (attestations, key releases, its attestation expiry) and the
shim (the Ray worker that made the call) records it with the sealed bytes in and out, then
:func:`flush_soon` hands it to the sink in the background (at most one flush per second per
process, never blocking the call). The trust registry (a long-lived actor) records every admit it
applies as a routing attestation ``ok`` and holds the node as attested until the admit's ``exp``
(a revoke ends it). ``confidential_attested_nodes{pool}`` is computed by the sink from those
reports: nodes whose last reported attestation has not expired, per pool.

What it does NOT do: make figures trustworthy. Any Ray process can write to the sink; these are
operational figures, never security evidence (that is the broker's signed audit log).

    >>> import ray_confidential.metrics as m
    >>> m.safe_tag("tee", "sev-snp"), m.safe_tag("tee", "<script>")
    ('sev-snp', 'other')
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Final

from ray_confidential.attestation.claims import TEE_KINDS

logger = logging.getLogger(__name__)

SINK_NAME: Final = "ray_confidential_metrics"
SINK_NAMESPACE: Final = "ray_confidential"
FLUSH_SECONDS: Final = 5.0
FLUSH_SOON_SECONDS: Final = 1.0
"""Minimum spacing of background flushes from one process (:func:`flush_soon`)."""
LATENCY_BOUNDARIES: Final = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]

# name -> (kind, description, tag keys)
METRICS: Final[dict[str, tuple[str, str, tuple[str, ...]]]] = {
    "confidential_attestations_total": (
        "counter",
        "Executor attestations by TEE kind and result",
        ("tee", "result"),
    ),
    "confidential_key_releases_total": ("counter", "Data-key releases (unwraps) by result", ("result",)),
    "confidential_sealed_bytes_total": (
        "counter",
        "Sealed bytes produced (out) and opened (in)",
        ("direction",),
    ),
    "confidential_seal_seconds": ("histogram", "Time to seal one object", ()),
    "confidential_unseal_seconds": ("histogram", "Time to open one object", ()),
    "confidential_attested_nodes": (
        "gauge",
        "Nodes whose executors hold a valid attestation, by pool",
        ("pool",),
    ),
}

_ALLOWED: Final[dict[str, frozenset[str]]] = {
    "tee": frozenset(TEE_KINDS),
    "result": frozenset({"ok", "denied", "granted", "error"}),
    "direction": frozenset({"in", "out"}),
}
_POOL_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def safe_tag(key: str, value: str) -> str:
    """The value if it is on the key's allow-list (pools: DNS-label shaped names), else "other"."""
    if key == "pool":
        return value if _POOL_RE.match(value) else "other"
    return value if value in _ALLOWED.get(key, frozenset()) else "other"


def _check(name: str, tags: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}")
    keys = METRICS[name][2]
    if set(tags) != set(keys):
        raise ValueError(f"metric {name} takes tags {keys}, got {sorted(tags)}")
    return tuple((k, safe_tag(k, str(tags[k]))) for k in keys)


class _Buffer:
    """Figures recorded in this process and not yet handed to the sink."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self.observations: list[tuple[str, tuple[tuple[str, str], ...], float]] = []
        self.gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.attested: dict[str, tuple[str, float]] = {}
        self.last_flush = time.monotonic()
        self.pending = False

    def take(self) -> dict[str, Any]:
        with self.lock:
            batch = {
                "counters": list(self.counters.items()),
                "observations": list(self.observations),
                "gauges": list(self.gauges.items()),
                "attested": list(self.attested.items()),
            }
            self.counters.clear()
            self.observations.clear()
            self.gauges.clear()
            self.attested.clear()
            self.last_flush = time.monotonic()
        return batch


_buffer = _Buffer()


def inc(name: str, value: float = 1.0, **tags: str) -> None:
    """Add ``value`` to counter ``name``."""
    key = (name, _check(name, tags))
    with _buffer.lock:
        _buffer.counters[key] += value
    _maybe_flush()


def observe(name: str, seconds: float, **tags: str) -> None:
    """Record one observation of histogram ``name``."""
    key = _check(name, tags)
    with _buffer.lock:
        _buffer.observations.append((name, key, seconds))
    _maybe_flush()


def set_gauge(name: str, value: float, **tags: str) -> None:
    key = (name, _check(name, tags))
    with _buffer.lock:
        _buffer.gauges[key] = value
    _maybe_flush()


def note_attested(node_id: str, pool: str, until: float) -> None:
    """Report that node ``node_id`` (of operator-defined ``pool``) holds an attestation valid until
    ``until`` (wall-clock seconds); the sink counts such nodes per pool (``confidential_attested_nodes``)."""
    with _buffer.lock:
        _buffer.attested[str(node_id)[:64]] = (safe_tag("pool", pool or "none"), float(until))
    _maybe_flush()


def _maybe_flush() -> None:
    if time.monotonic() - _buffer.last_flush >= FLUSH_SECONDS:
        flush_soon()


def flush_soon(min_interval: float = FLUSH_SOON_SECONDS) -> None:
    """Flush on a background thread within ``min_interval`` seconds of the last flush; never blocks.

    At most one flush is pending per process, so a busy worker flushes about once per
    ``min_interval`` and a short job's last figures still leave within that time.
    """
    with _buffer.lock:
        if _buffer.pending:
            return
        _buffer.pending = True
        delay = max(0.0, _buffer.last_flush + min_interval - time.monotonic())
    timer = threading.Timer(delay, _background_flush)
    timer.daemon = True
    timer.name = "rc-metrics-flush"
    timer.start()


def _background_flush() -> None:
    with _buffer.lock:
        _buffer.pending = False
        # An attempt counts as a flush: outside Ray (or before ray.init) the next one waits
        # min_interval too, instead of starting a timer thread per recorded call.
        _buffer.last_flush = time.monotonic()
    if "ray" not in sys.modules:  # not a Ray process: nowhere to send them (kept for a later flush)
        return
    try:
        flush(wait=False)
    except Exception as exc:  # metrics are best effort
        logger.debug("ray_confidential: metrics flush failed: %s", exc)


def flush(*, wait: bool = True, timeout: float = 10.0) -> None:
    """Hand buffered figures to the sink actor (creating it if needed). No-op outside Ray."""
    import ray

    if not ray.is_initialized():
        return
    batch = _buffer.take()
    if not any(batch.values()):
        return
    sink = MetricsSink.options(
        name=SINK_NAME, namespace=SINK_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0
    ).remote()
    ref = sink.record.remote(batch)
    if wait:
        ray.get(ref, timeout=timeout)


class _SinkImpl:
    """The sink: owns the ``ray.util.metrics`` objects (one per metric name) in a long-lived actor."""

    def __init__(self) -> None:
        from ray.util import metrics

        self._metrics: dict[str, Any] = {}
        self._nodes: dict[str, tuple[str, float]] = {}
        self._pools: set[str] = set()
        self._lock = threading.Lock()
        for name, (kind, description, keys) in METRICS.items():
            if kind == "counter":
                self._metrics[name] = metrics.Counter(name, description=description, tag_keys=keys)
            elif kind == "histogram":
                self._metrics[name] = metrics.Histogram(
                    name, description=description, boundaries=LATENCY_BOUNDARIES, tag_keys=keys
                )
            else:
                self._metrics[name] = metrics.Gauge(name, description=description, tag_keys=keys)
        threading.Thread(target=self._expire_loop, name="rc-metrics-expire", daemon=True).start()

    def _expire_loop(self) -> None:
        while True:  # nodes whose attestation lapsed leave the gauge without a new report
            time.sleep(10.0)
            self.refresh_attested(time.time())

    def record(self, batch: Mapping[str, Any]) -> int:
        n = 0
        for (name, tags), value in batch.get("counters", []):
            self._metrics[name].inc(float(value), tags={k: safe_tag(k, v) for k, v in tags})
            n += 1
        for name, tags, value in batch.get("observations", []):
            self._metrics[name].observe(float(value), tags={k: safe_tag(k, v) for k, v in tags})
            n += 1
        for (name, tags), value in batch.get("gauges", []):
            self._metrics[name].set(float(value), tags={k: safe_tag(k, v) for k, v in tags})
            n += 1
        attested = batch.get("attested", [])
        if attested:
            with self._lock:
                for node_id, (pool, until) in attested:
                    self._nodes[str(node_id)[:64]] = (safe_tag("pool", str(pool)), float(until))
            n += len(attested)
        self.refresh_attested(time.time())
        return n

    def refresh_attested(self, now: float) -> dict[str, int]:
        """Set ``confidential_attested_nodes{pool}``: nodes whose reported attestation holds at ``now``."""
        with self._lock:
            for node_id in [k for k, (_, until) in self._nodes.items() if until <= now]:
                del self._nodes[node_id]
            counts: dict[str, int] = dict.fromkeys(self._pools, 0)
            for pool, _ in self._nodes.values():
                counts[pool] = counts.get(pool, 0) + 1
            self._pools.update(counts)
        for pool, count in counts.items():
            self._metrics["confidential_attested_nodes"].set(float(count), tags={"pool": pool})
        return counts


def _make_sink() -> Any:
    import ray

    return ray.remote(_SinkImpl)


class _LazySink:
    """``MetricsSink.options(...)`` without importing Ray at module import time."""

    def __getattr__(self, item: str) -> Any:
        return getattr(_sink_class(), item)


_sink_cls: Any = None


def _sink_class() -> Any:
    global _sink_cls
    if _sink_cls is None:
        _sink_cls = _make_sink()
    return _sink_cls


MetricsSink: Any = _LazySink()
