"""The trust registry as a named, detached Ray actor, and the driver-side client that distrusts it.

    registry = get_or_create_registry(verifier, path="/var/lib/ray-confidential/registry.json")
    submit(registry, signer.admit(...))                     # the broker's side
    client = RegistryClient(verifier)                       # a driver's side
    placer = Placer(client.entries, wait_s=60)

Security argument. A named detached actor is callable by every job, and it runs in an ordinary Ray
worker, where the head and any job can run code (design.md section 2). So:

* mutations carry broker-signed statements only (wire bytes, no pickled objects); anything else is
  refused with a coarse error (full reason in the actor's log);
* drivers never trust the actor's answer: :class:`RegistryClient` fetches the signed statements and
  verifies each against the statement key the driver pins itself. A compromised or squatted actor can
  withhold nodes (availability) or replay an older admit until its ``exp`` (at most 5 min), but cannot
  add a node the broker did not admit;
* placement is routing: the broker still decides every key release.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any, Final

import ray

from scheduler.labels import NODE_ID_LABEL, TEE_LABEL
from scheduler.placement import Placer
from scheduler.registry import (
    RegistryEntry,
    RegistryVerifier,
    SignedStatement,
    StatementRejected,
    TrustRegistry,
)

log = logging.getLogger(__name__)

REGISTRY_ACTOR_NAME: Final = "ray-confidential-trust-registry"
REGISTRY_NAMESPACE: Final = "ray-confidential"
MAX_CACHE: Final = 100_000
DEFAULT_MAX_STALENESS_S: Final = 1.0

FeedSource = tuple[str, bytes | None]
"""``(broker HOST:PORT, CA PEM or None for a development broker on loopback)``."""


class RegistryActor:
    """Holds a :class:`TrustRegistry`; every method takes or returns bytes and plain values only."""

    def __init__(
        self,
        public_pem: bytes,
        registry_id: str,
        path: str | None,
        max_age: int,
        leeway: int,
        follow: FeedSource | None = None,
    ) -> None:
        verifier = RegistryVerifier.from_pem(
            public_pem, registry_id=registry_id, max_age=max_age, leeway=leeway
        )
        self._registry = TrustRegistry(verifier, path=path)
        self._lock = threading.Lock()  # the follower thread submits beside actor method calls
        self._follower: Any = None
        if follow is not None:  # given at creation, so a restarted actor follows again
            self.follow(*follow)

    def submit(self, statement: bytes) -> None:
        """Apply one broker-signed statement (wire bytes); anything else is refused."""
        try:
            if not isinstance(statement, (bytes, bytearray)):
                raise StatementRejected(f"expected statement bytes, got {type(statement).__name__}")
            self._submit_quietly(bytes(statement))
        except StatementRejected as exc:
            log.warning("trust registry: refused a mutation: %s", exc)
            raise StatementRejected("registry statement refused") from None

    def statements(self) -> list[bytes]:
        """Signed admits of the current entries, after dropping expired and dead nodes."""
        alive = _alive_node_ids()
        with self._lock:
            self._registry.prune(alive=alive)
            return [s.to_bytes() for s in self._registry.statements()]

    def follow(self, target: str, ca_pem: bytes | None) -> None:
        """Pull statements from the broker at ``target`` (its ``GetStatements`` feed) from now on.

        The broker outside Ray cannot call this actor, so the actor fetches (docs/placement.md
        section 6). Every statement is verified on submit, so whoever names the broker can at worst
        make the registry follow one that says nothing (availability), never admit a node.
        """
        if not isinstance(target, str) or not (ca_pem is None or isinstance(ca_pem, bytes)):
            raise TypeError("follow(target: str, ca_pem: bytes | None)")
        current = self._follower
        if current is not None and (current.target, current.ca_cert) == (target, ca_pem):
            return
        from ray_confidential.kbs.statement_feed import StatementFollower

        follower = StatementFollower(
            target,
            ca_cert=ca_pem,
            registry_id=self._registry.verifier.registry_id,
            submit=self._submit_quietly,
        )
        follower.start()
        self._follower = follower
        if current is not None:
            current.stop()
        log.info("trust registry: following the statement feed of %s", target)

    def following(self) -> dict[str, Any] | None:
        """The broker followed, statements applied from it, and its last error (None: not following)."""
        f = self._follower
        return None if f is None else {"target": f.target, "applied": f.applied, "last_error": f.last_error}

    def _submit_quietly(self, statement: bytes) -> None:
        with self._lock:
            self._registry.submit(statement)
        _record_metrics(statement)

    def identity(self) -> tuple[str, str]:
        """``(registry id, statement-key fingerprint)`` this actor was created with."""
        v = self._registry.verifier
        return v.registry_id, v.fingerprint


def _record_metrics(statement: bytes) -> None:
    """Dashboard figures of an applied (verified) statement: an admit is a routing attestation the
    broker accepted (``confidential_attestations_total{result="ok"}``) and holds the node in
    ``confidential_attested_nodes{pool}`` until its ``exp``; a revoke ends that at once. The registry
    is long-lived, so these reach the sink without any job running (docs/placement.md)."""
    try:
        import json

        from ray_confidential import metrics

        body = json.loads(SignedStatement.from_bytes(statement).payload)
        if body["kind"] == "admit":
            metrics.inc("confidential_attestations_total", tee=str(body["tee"]), result="ok")
            metrics.note_attested(str(body["node_id"]), str(body["pool"]), float(body["exp"]))
        else:
            metrics.note_attested(str(body["node_id"]), "none", 0.0)
        metrics.flush_soon()
    except Exception as exc:  # figures are best effort; the statement is applied either way
        log.debug("trust registry: could not record metrics: %s", exc)


def _alive_node_ids() -> set[str]:
    return {str(n["NodeID"]) for n in ray.nodes() if n.get("Alive")}  # type: ignore[no-untyped-call]


def get_or_create_registry(
    verifier: RegistryVerifier,
    *,
    path: str | None = None,
    node_id: str | None = None,
    follow: FeedSource | None = None,
) -> Any:
    """The cluster's registry actor, created (detached, restartable) if it does not exist.

    Args:
        verifier: the pinned statement key and registry id.
        path: persistence file on the actor's node (a restart reloads and re-verifies it).
        node_id: node to pin the actor to (default: this process's node), so a restart finds its file.
        follow: ``(broker target, CA PEM)``: the actor pulls the broker's statement feed (a broker
            outside Ray); an existing actor is told to follow it too.

    Raises:
        StatementRejected: an actor of that name exists with another registry id or statement key
            (squatted or misconfigured).
    """
    node = node_id or ray.get_runtime_context().get_node_id()
    cls = ray.remote(RegistryActor)
    handle = cls.options(
        name=REGISTRY_ACTOR_NAME,
        namespace=REGISTRY_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        label_selector={NODE_ID_LABEL: node},
    ).remote(verifier.public_pem(), verifier.registry_id, path, verifier.max_age, verifier.leeway, follow)
    deadline = time.monotonic() + 30
    while True:  # an actor that is restarting answers once it has reloaded its file
        try:
            identity = tuple(ray.get(handle.identity.remote()))  # type: ignore[attr-defined]
            break
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    if identity != (verifier.registry_id, verifier.fingerprint):
        raise StatementRejected(
            f"registry actor {REGISTRY_ACTOR_NAME!r} is pinned to {identity}, expected "
            f"{(verifier.registry_id, verifier.fingerprint)}: refusing it"
        )
    if follow is not None:
        ray.get(handle.follow.remote(*follow))  # type: ignore[attr-defined]
    return handle


def submit(handle: Any, statement: SignedStatement) -> None:
    """Send one signed statement to the registry actor (the broker's call)."""
    ray.get(handle.submit.remote(statement.to_bytes()))


class RegistryClient:
    """A driver's view of the registry: every statement re-verified against the driver's own pin.

    Args:
        verifier: the statement key and registry id this driver pins (from its configuration).
        handle: the actor (default: look up the named actor).
        alive: ``alive()`` returns alive node ids (default: ``ray.nodes()``).
        max_staleness_s: reuse the last fetched view for this long (one actor call and one
            ``ray.nodes()`` per period, not per placement). A revoked or dead node stays routable
            that long; routing only, the broker refuses it keys at once (docs/placement.md).
        monotonic: clock for the staleness period.
        follow: ``(broker target, CA PEM)`` of a broker outside Ray: the actor is created if missing
            and pulls that broker's statement feed (docs/placement.md section 6).
    """

    def __init__(
        self,
        verifier: RegistryVerifier,
        handle: Any = None,
        *,
        alive: Callable[[], Collection[str]] | None = None,
        max_staleness_s: float = DEFAULT_MAX_STALENESS_S,
        monotonic: Callable[[], float] = time.monotonic,
        follow: FeedSource | None = None,
    ) -> None:
        self.verifier = verifier
        self._handle = handle
        self._follow = follow
        self._alive = alive or _alive_node_ids
        self._cache: dict[bytes, RegistryEntry | None] = {}
        self._last: list[RegistryEntry] = []
        self._fetched_at: float | None = None
        self.max_staleness_s = max_staleness_s
        self._monotonic = monotonic

    def _actor(self) -> Any:
        if self._handle is None:
            if self._follow is not None:  # a broker outside Ray: create the registry, have it follow
                self._handle = get_or_create_registry(self.verifier, follow=self._follow)
            else:
                self._handle = ray.get_actor(REGISTRY_ACTOR_NAME, namespace=REGISTRY_NAMESPACE)
        return self._handle

    def entries(self, now: float | None = None) -> list[RegistryEntry]:
        """Verified, unexpired admits of alive nodes (the newest per node)."""
        t = time.time() if now is None else now
        m = self._monotonic()
        if self._fetched_at is None or m - self._fetched_at >= self.max_staleness_s:
            self._last = self._fetch()
            self._fetched_at = m
        return [e for e in self._last if e.expires_at > t]

    def invalidate(self) -> None:
        """Fetch again on the next :meth:`entries` (the placer calls this while it waits for a node)."""
        self._fetched_at = None

    def _fetch(self) -> list[RegistryEntry]:
        raw: list[bytes] = ray.get(self._actor().statements.remote())
        newest: dict[str, RegistryEntry] = {}
        for data in raw:
            entry = self._verify(data)
            if entry is not None and (entry.node_id not in newest or entry.seq > newest[entry.node_id].seq):
                newest[entry.node_id] = entry
        alive = set(self._alive())
        return [e for _, e in sorted(newest.items()) if e.node_id in alive]

    def describe_cluster(self) -> str:
        """One line for :class:`NoAttestedNodeError`: alive nodes, and TEE-labelled ones not attested."""
        nodes = [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
        registered = {e.node_id for e in self._last}
        claimed = Counter(
            str(n.get("Labels", {}).get(TEE_LABEL))
            for n in nodes
            if TEE_LABEL in n.get("Labels", {}) and n["NodeID"] not in registered
        )
        text = f"the cluster has {len(nodes)} alive nodes"
        if claimed:
            text += "; labelled as TEEs but holding no routing token: " + ", ".join(
                f"{n} x {k}" for k, n in sorted(claimed.items())
            )
        return text

    def placer(self, **kwargs: Any) -> Placer:
        """A :class:`~scheduler.placement.Placer` over this client (kwargs: wait_s, pools_config, ...)."""
        kwargs.setdefault("on_miss", self.invalidate)
        return Placer(self.entries, describe_cluster=self.describe_cluster, **kwargs)

    def _verify(self, data: bytes) -> RegistryEntry | None:
        key = data if isinstance(data, bytes) else b""
        if key in self._cache:
            return self._cache[key]
        entry: RegistryEntry | None = None
        try:
            st = SignedStatement.from_bytes(data)
            body = self.verifier.verify(st, now=0, fresh=False)
            if body.kind == "admit":
                entry = RegistryEntry.from_admit(body)
        except StatementRejected as exc:
            log.warning("trust registry actor returned a statement that does not verify: %s", exc)
        if len(self._cache) >= MAX_CACHE:
            self._cache.clear()
        self._cache[key] = entry
        return entry
