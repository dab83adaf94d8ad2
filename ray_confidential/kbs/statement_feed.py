"""The broker's statement feed: how trust-registry statements leave a broker that runs outside Ray.

    feed = StatementFeed()
    broker.statement_listener = ClusterStatementIssuer(statement_key, cluster_ids, feed.publish)
    page = feed.since("cluster-a", feed_id="", after=0, wait_s=10.0)   # GetStatements (kbs.proto)

The broker signs an ``admit`` for every routing token and a ``revoke`` for every revocation that
covers a routed node (``scheduler/statements.py``, docs/placement.md section 6). A production broker
cannot call into Ray, so the cluster's registry actor pulls: it long-polls ``GetStatements`` and
submits what it gets to itself. The statements are signed by the broker's statement key and every
driver verifies them against its own pin, so the transport and the actor are untrusted couriers:
they can delay or drop statements (an admit still expires with its routing token), never forge one.

The feed keeps, per (registry id, node), only the newest statement, until it is older than
``max_age`` (the registry's own replay window): an admit supersedes the previous admit, a revoke
supersedes the admit. A reader passes the cursor of its last page; ``feed_id`` changes when the
broker restarts (cursors start again), and a reader whose ``feed_id`` differs gets the whole current
set. Statements are public routing facts (node ids, pools, regions, measurements, TCB strings):
``GetStatements`` needs no credential, like ``GetJWKS``.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec

from scheduler.registry import SignedStatement, StatementSigner
from scheduler.statements import StatementIssuer

log = logging.getLogger(__name__)

MAX_WAIT_S: Final = 30.0
"""Longest a ``GetStatements`` call waits for something new."""
MAX_PAGE: Final = 10_000
"""Most statements in one page (a reader asks again with the returned cursor)."""


@dataclass(frozen=True, slots=True)
class FeedPage:
    """One ``GetStatements`` answer: statement wire bytes with cursors above ``after``, oldest first."""

    feed_id: str
    cursor: int
    statements: tuple[bytes, ...]


class StatementFeed:
    """Newest signed statement per (registry id, node), each with a cursor; readers long-poll.

    Args:
        max_age: seconds a statement stays in the feed (the registry refuses older ones anyway).
        clock: wall-clock seconds (statement ``iat`` is wall-clock).
    """

    def __init__(self, *, max_age: float = 300.0, clock: Callable[[], float] = time.time) -> None:
        self.feed_id = secrets.token_hex(8)
        self.max_age = max_age
        self._clock = clock
        self._cursor = 0
        self._latest: dict[tuple[str, str], tuple[int, float, bytes]] = {}  # -> (cursor, iat, wire)
        self._changed = threading.Condition()

    def publish(self, statement: SignedStatement) -> None:
        """Add a signed statement (the broker's ``deliver``); it replaces that node's previous one."""
        body = json.loads(statement.payload)
        key = (str(body["registry"]), str(body["node_id"]))
        with self._changed:
            self._cursor += 1
            self._latest[key] = (self._cursor, float(body["iat"]), statement.to_bytes())
            self._changed.notify_all()

    def since(self, registry_id: str, *, feed_id: str, after: int, wait_s: float = 0.0) -> FeedPage:
        """Statements for ``registry_id`` newer than cursor ``after`` of feed ``feed_id``, waiting up
        to ``wait_s`` (at most :data:`MAX_WAIT_S`) for one to appear. Another ``feed_id`` (the
        broker restarted, or a first call with ``""``) returns the whole current set."""
        if not 0 <= wait_s <= MAX_WAIT_S:
            raise ValueError(f"wait_s must be in [0, {MAX_WAIT_S:.0f}]")
        if after < 0:
            raise ValueError("after must be >= 0")
        if feed_id != self.feed_id:
            after = 0
        deadline = time.monotonic() + wait_s
        with self._changed:
            while True:
                self._expire()
                fresh = sorted(
                    (c, wire)
                    for (reg, _), (c, _, wire) in self._latest.items()
                    if reg == registry_id and c > after
                )[:MAX_PAGE]
                remaining = deadline - time.monotonic()
                if fresh or remaining <= 0:
                    break
                self._changed.wait(remaining)
            cursor = fresh[-1][0] if len(fresh) == MAX_PAGE else max(after, self._cursor)
            return FeedPage(self.feed_id, cursor, tuple(wire for _, wire in fresh))

    def __len__(self) -> int:
        with self._changed:
            return len(self._latest)

    def _expire(self) -> None:
        oldest = self._clock() - self.max_age
        for key in [k for k, (_, iat, _) in self._latest.items() if iat < oldest]:
            del self._latest[key]


class ClusterStatementIssuer:
    """The broker's ``statement_listener`` for several clusters: one registry id per cluster id.

    A routing token names its cluster (``claims.cluster_id``); its admit is signed for that
    cluster's registry. A revocation is offered to every cluster's issuer (each signs revokes only
    for nodes it admitted).

    Args:
        key: the broker's statement key (P-256; never leaves the broker).
        cluster_ids: the cluster ids the broker serves (its ``cluster_ids`` setting).
        deliver: called with every signed statement (:meth:`StatementFeed.publish`, ...).
    """

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        cluster_ids: Collection[str],
        deliver: Callable[[SignedStatement], None],
    ) -> None:
        if not cluster_ids:
            raise ValueError("a statement key needs the broker's cluster_ids (one registry per cluster)")
        self._issuers = {
            cid: StatementIssuer(StatementSigner(key, registry_id=cid), deliver) for cid in cluster_ids
        }

    def routing_granted(self, claims: Any) -> None:
        issuer = self._issuers.get(str(claims.cluster_id))
        if issuer is not None:  # the broker admits only configured cluster ids; belt and braces
            issuer.routing_granted(claims)

    def revoked(self, kind: str, value: str, reason: str) -> None:
        for issuer in self._issuers.values():
            issuer.revoked(kind, value, reason)


class StatementFollower:
    """Long-polls a broker's ``GetStatements`` and hands each statement to ``submit`` (the registry).

    Runs in the cluster's registry actor (``scheduler/registry_actor.py``); needs no credential and
    trusts nothing it receives: ``submit`` verifies every statement against the pinned key (a refused
    one, e.g. a replay after the broker restarted, is logged and skipped).

    Args:
        target: the broker, ``HOST:PORT``.
        ca_cert: PEM CA of the broker's TLS certificate; None only for a development broker on loopback.
        registry_id: the cluster id whose statements to fetch.
        submit: called with each statement's wire bytes.
        wait_s: long-poll wait per call.
    """

    def __init__(
        self,
        target: str,
        *,
        ca_cert: bytes | None,
        registry_id: str,
        submit: Callable[[bytes], None],
        wait_s: float = 10.0,
    ) -> None:
        from ray_confidential.kbs.client import open_channel
        from ray_confidential.kbs.proto import kbs_pb2_grpc

        self.target, self.registry_id, self.wait_s = target, registry_id, min(wait_s, MAX_WAIT_S)
        self.ca_cert = ca_cert
        self._submit = submit
        self._channel = open_channel(target, ca_cert=ca_cert)
        self._stub = kbs_pb2_grpc.KeyBrokerStub(self._channel)  # type: ignore[no-untyped-call]
        self._feed_id, self._cursor = "", 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.applied = 0
        self.last_error: str | None = None

    def poll_once(self, wait_s: float | None = None) -> int:
        """One ``GetStatements`` call; returns how many statements were submitted (refusals not counted)."""
        from ray_confidential.kbs.proto import kbs_pb2

        wait = self.wait_s if wait_s is None else wait_s
        req = kbs_pb2.StatementsRequest(
            registry_id=self.registry_id, feed_id=self._feed_id, after=self._cursor, wait_ms=int(wait * 1000)
        )
        resp = self._stub.GetStatements(req, timeout=wait + 10.0)
        applied = 0
        for wire in resp.statements:
            try:
                self._submit(bytes(wire))
                applied += 1
            except Exception as exc:  # refused (replay, stale, forged): the registry logged why
                log.info("statement from %s not applied: %s", self.target, exc)
        self._feed_id, self._cursor = resp.feed_id, int(resp.cursor)
        self.applied += applied
        return applied

    def start(self) -> None:
        """Follow in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="rc-statement-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._channel.close()

    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                self.poll_once()
                self.last_error, delay = None, 0.2
            except Exception as exc:  # broker unreachable or restarting: routing waits, keys are unaffected
                if self._stop.is_set():
                    return
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("cannot fetch registry statements from %s (%s); retrying in %.1f s",
                            self.target, self.last_error, delay)  # fmt: skip
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)


def fan_out(*targets: Callable[[SignedStatement], None]) -> Callable[[SignedStatement], None]:
    """One ``deliver`` that hands each statement to every target in turn."""

    def deliver(statement: SignedStatement) -> None:
        for target in targets:
            target(statement)

    return deliver


__all__ = ["MAX_PAGE", "MAX_WAIT_S", "ClusterStatementIssuer", "FeedPage", "StatementFeed", "StatementFollower",
           "fan_out"]  # fmt: skip
