"""The enclave executor daemon: the only process on a TEE node that holds keys and plaintext.

    ray-confidential executor --socket /run/rc/executor.sock --tee sev-snp --node-id HEX ...

It serves untrusted shims (Ray workers) on a Unix socket (mode 0660: the Ray user and group only,
docs/executor.md), attests through its attestation device, obtains tokens and data keys through a
:class:`~enclave_actors.keys.KeyReleaser`, and runs approved code bundles in worker subprocesses
dedicated to one (domains, bundle) pair each, never shared across domains or bundles; concurrent
calls of a pair run in parallel workers up to ``Limits.workers_per_bundle``
(:mod:`enclave_actors.workers`; design.md sections 2, 5, 8).

A call (``op = "call"``), step by step as in :meth:`Executor.call`:

1. Bundle: the cached bundle for the claimed digest, else the source the shim sent, whose digest
   the executor computes itself and compares with the claim (``need_bundle`` when neither).
2. Inputs: sealed bytes as frames or sealed memfds; headers parsed (bounds-checked).
3. Policy: every domain of the call (inputs and output) must approve the bundle digest (the broker
   checks it before it issues a token); an output recipient other than the domain must be listed in
   the output domain's policy (visible only to releasers that see policies: else refused).
4. Token: one per (bundle digest, domains), cached, renewed ``renew_margin`` seconds before expiry.
5. Data keys: unwrapped through the releaser, cached per object for at most the token lifetime.
6. Run: an idle worker of (domains, bundle), a new one, or the first to come free within the call's
   time limit, opens inputs, runs the entry point, seals the result.
7. Reply: sealed bytes, or ``task_error`` with the sealed detail (never the detail itself).

Lifecycle: a poller reads the revocation epoch every ``poll_interval`` (<= 10 s); a new epoch drops
every cached key and token and stops every worker and actor (a call so stopped is answered
``dropped``, which the shim sends once more: it attests again). When the broker stays unreachable for
``broker_wait`` seconds the executor fails closed (drops keys, stops workers, refuses calls with a
clear error) until it answers again. A crashing or hanging bundle kills only its worker.

Enclave actors (``actor_create`` / ``actor_call``): each actor instance gets its own worker
subprocess, created on one shim connection and stopped when that connection closes (the Ray actor
died), when a call crashes or times out, or when keys are dropped (revocation): its state is lost.

What it does NOT do: decide routing (placement is the scheduler's job), or trust anything a shim
sends: every field of a request is untrusted input.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from enclave_actors import protocol
from enclave_actors.coalesce import Coalescer
from enclave_actors.keys import BrokerUnavailable, DomainInfo, Grant, KeyReleaser, NodeFacts, bundle_approved
from enclave_actors.workers import Key, Worker, WorkerLoadError, WorkerPools
from ray_confidential.bundle import Bundle
from ray_confidential.crypto import hpke
from ray_confidential.errors import DecryptionError, KeyReleaseDenied
from ray_confidential.sealed.format import MAX_HEADER as MAX_SEALED_HEADER
from ray_confidential.sealed.format import SealedHeader

logger = logging.getLogger(__name__)

MAX_PARAMS_BYTES = 64 << 10
"""Plain JSON parameters of one call (args and kwargs that are not sealed), encoded size."""
MAX_INPUTS = 32
MAX_POLL_INTERVAL = 10.0
ROUTING_RETRY_S = 30.0
"""Retry interval after the broker refused a routing token."""
INLINE_INPUT_LIMIT = 1 << 20
MAX_KEYS_WITH_TOKEN = 16
"""Most data keys asked for together with a fresh token (the broker's limit per Attest)."""
MAX_KEYS_PER_FETCH = 64
"""Objects whose keys one broker call fetches (``UnwrapMany``'s limit, docs/kbs.md "Batched unwraps")."""
SEALED_HEADER_BYTES = 5 + MAX_SEALED_HEADER
"""Version byte, u32 header length and the longest header (docs/sealed-format.md)."""


class CallRefused(Exception):
    """A call the executor refuses; ``status`` is the coarse wire code."""

    def __init__(self, status: str, message: str) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Per-call resource and time limits (docs/executor.md, "Limits")."""

    call_timeout: float = 300.0
    """Upper bound for a call's wall time; a shim may ask for less, never more."""
    memory_limit_bytes: int = 0
    """RLIMIT_AS of each worker subprocess (0 = no limit)."""
    max_workers: int = 16
    """Worker subprocesses for calls, all (domains, bundle) pairs together."""
    workers_per_bundle: int = field(default_factory=lambda: min(16, os.cpu_count() or 1))
    """Calls of one (domains, bundle) pair that run in parallel, each in its own worker subprocess
    (:mod:`enclave_actors.workers`); at most ``max_workers``."""
    max_actors: int = 64
    input_cache_bytes: int = 256 << 20
    """Sealed memfds of large inputs kept for calls that name them again (:class:`_InputCache`)."""


class NeedInputs(Exception):
    """A call named a large input by its sealed header that the executor does not hold."""


class _InputCache:
    """Sealed memfds of large inputs that a call already authenticated, by (sealed header, length).

    Copying 64 MiB into a fresh sealed memfd costs the shim about twice the input's decryption, so
    a shim first names a large input by its sealed header alone (``src = "known"``) and sends the
    memfd only when told ``need_inputs``. An entry is kept only after a call on it succeeded: the
    worker authenticated every chunk under that header (a forged body under a copied header is never
    kept). Naming an object by its header grants nothing: its ciphertext is in Ray's object store
    for any worker to read, and every call still checks seals, policy, keys and the AEAD. Entries
    are ciphertext; :meth:`get` hands out a duplicate descriptor, so an eviction never closes a
    descriptor in use.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._fds: OrderedDict[tuple[bytes, int], int] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[bytes, int]) -> int | None:
        """A new descriptor for the kept memfd (the caller closes it), or None."""
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                return None
            self._fds.move_to_end(key)
            return os.dup(fd)

    def put(self, key: tuple[bytes, int], fd: int) -> None:
        """Keep a duplicate of ``fd`` (a sealed memfd a call just authenticated under ``key``)."""
        if key[1] > self.max_bytes:
            return
        evicted = []
        with self._lock:
            if key in self._fds:
                return
            self._fds[key] = os.dup(fd)
            self._bytes += key[1]
            while self._bytes > self.max_bytes:
                old_key, old_fd = self._fds.popitem(last=False)
                self._bytes -= old_key[1]
                evicted.append(old_fd)
        for old_fd in evicted:
            os.close(old_fd)

    def clear(self) -> None:
        with self._lock:
            fds, self._fds, self._bytes = list(self._fds.values()), OrderedDict(), 0
        for fd in fds:
            os.close(fd)


@dataclass(slots=True)
class _Actor:
    """An enclave actor instance: its own worker subprocess, bundle and fixed domain set."""

    actor_id: str
    worker: Worker
    bundle: Bundle
    digest: bytes
    domains: tuple[str, ...]
    out: dict[str, Any]


_METHOD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")


class Executor:
    """Executor state: the key, tokens, data keys, bundles, workers and actors (the daemon's core).

    Args:
        releaser: the broker interface.
        facts: node identity (TEE kind, node id, pool, region, cluster id).
        limits: per-call limits.
        clock: wall-clock seconds (tokens expire in broker time).
        renew_margin: renew a token this many seconds before it expires.
        broker_wait: how long to retry an unreachable broker before failing closed.
    """

    def __init__(
        self,
        releaser: KeyReleaser,
        facts: NodeFacts,
        *,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.time,
        renew_margin: float = 30.0,
        broker_wait: float = 15.0,
        executor_key: hpke.PrivateKeyHandle | None = None,
    ) -> None:
        self.releaser = releaser
        self.facts = facts
        self.limits = limits or Limits()
        self.clock = clock
        self.renew_margin = renew_margin
        self.broker_wait = broker_wait
        self.key = executor_key or hpke.generate_private_key()
        self._lock = threading.Lock()
        self._grants: dict[tuple[bytes, tuple[str, ...]], Grant] = {}
        self._grant_locks: dict[tuple[bytes, tuple[str, ...]], threading.Lock] = {}
        self._deks: dict[tuple[bytes, bytes], tuple[bytearray, float]] = {}
        self._bundles: dict[bytes, Bundle] = {}
        self.pools = WorkerPools(per_key=min(self.limits.workers_per_bundle, self.limits.max_workers),
                                 max_workers=self.limits.max_workers, memory_limit=self.limits.memory_limit_bytes)  # fmt: skip
        self._actors: dict[str, _Actor] = {}
        self._epoch: int | None = None
        self._last_broker_ok = clock()
        self.unavailable: str | None = None
        self.inputs = _InputCache(self.limits.input_cache_bytes)
        self._together: Coalescer[str, Grant, SealedHeader, bytes | KeyReleaseDenied] = Coalescer(
            self._fetch_deks, max_items=MAX_KEYS_PER_FETCH
        )
        self.stats = {"unwraps": 0, "grants": 0, "actors_started": 0, "inputs_known": 0}
        self._report = threading.local()

    # -- per-request report (metrics: the shim records it, docs/executor.md "Protocol") --------------
    def begin_report(self) -> None:
        """Start counting this thread's broker outcomes (one request per connection thread at a time)."""
        self._report.counts = {"attest": {}, "unwrap": {}}
        self._report.attested_until = None

    def _note(self, kind: str, result: str) -> None:
        counts = getattr(self._report, "counts", None)
        if counts is not None:
            counts[kind][result] = counts[kind].get(result, 0) + 1

    def end_report(self) -> dict[str, Any]:
        """What this request did at the broker: attestations and key releases by result (counts),
        and until when this node's attestation holds (None: no grant used). Public metadata only."""
        counts = getattr(self._report, "counts", None) or {"attest": {}, "unwrap": {}}
        until = getattr(self._report, "attested_until", None)
        self._report.counts = None
        return {"tee": self.facts.tee, "pool": self.facts.pool, "node_id": self.facts.node_id,
                "attest": counts["attest"], "unwrap": counts["unwrap"], "attested_until": until}  # fmt: skip

    # -- lifecycle ---------------------------------------------------------------------------------
    def drop_keys(self, reason: str) -> None:
        """Forget every data key and token and stop every worker and actor (revocation, fail-closed, exit)."""
        with self._lock:
            deks, self._deks = self._deks, {}
            self._grants.clear()
            actors, self._actors = self._actors, {}
        self.inputs.clear()
        for dek, _ in deks.values():
            dek[:] = bytes(len(dek))
        workers = self.pools.clear(reason)
        for actor in actors.values():
            actor.worker.stop(reason)
        if deks or workers or actors:
            logger.warning("executor: dropped %d data keys, %d workers and %d actors (%s)", len(deks),
                           workers, len(actors), reason)  # fmt: skip

    def poll_revocation(self) -> None:
        """One poll of the revocation epoch (the poller thread calls this every interval)."""
        try:
            epoch = self.releaser.revocation_epoch()
        except (BrokerUnavailable, OSError) as exc:
            if self.clock() - self._last_broker_ok > self.broker_wait and self.unavailable is None:
                self.unavailable = f"key broker unreachable for over {self.broker_wait:.0f} s ({exc})"
                self.drop_keys("broker unreachable: failing closed")
            return
        self._last_broker_ok = self.clock()
        self.unavailable = None
        if self._epoch is not None and epoch != self._epoch:
            self.drop_keys(f"revocation epoch {self._epoch} -> {epoch}")
        self._epoch = epoch

    def worker_pids(self) -> dict[str, int]:
        pids = self.pools.pids()
        with self._lock:
            pids.update({f"actor:{a.actor_id}": a.worker.pid for a in self._actors.values()})
        return pids

    # -- broker access with a bounded wait ----------------------------------------------------------
    def _with_broker(self, fn: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + self.broker_wait
        delay = 0.05
        while True:
            try:
                result = fn()
                self._last_broker_ok = self.clock()
                return result
            except (BrokerUnavailable, ConnectionError) as exc:
                if time.monotonic() >= deadline:
                    raise CallRefused(
                        "unavailable",
                        f"key broker unreachable after {self.broker_wait:.0f} s ({exc}); failing closed",
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _keys(
        self, digest: bytes, domains: tuple[str, ...], headers: list[SealedHeader]
    ) -> tuple[Grant, list[bytes]]:
        """(4) the token and (5) the data keys of ``headers``.

        Without a valid cached token, one broker call attests and unwraps the objects whose keys are
        not cached (``grant_with_keys``, at most :data:`MAX_KEYS_WITH_TOKEN`): one round trip fewer
        per fresh call; if the broker refuses it, the step-by-step path below runs again, so that the
        refusal the shim sees (and the metrics) name the step that failed. With a token, uncached keys
        are fetched together with those of concurrent calls (:meth:`_fetch_uncached_deks`).
        """
        combined = getattr(self.releaser, "grant_with_keys", None)
        if combined is not None and self._cached_grant(digest, domains) is None:
            with self._granting(digest, domains):  # concurrent fresh calls wait for this one's token
                now = self.clock()
                missing = list({(h.object_id, h.header_hash): h for h in headers
                                if self._cached_dek(h, now) is None}.values())  # fmt: skip
                if self._cached_grant(digest, domains) is None and 0 < len(missing) <= MAX_KEYS_WITH_TOKEN:
                    try:
                        fresh, deks = self._with_broker(lambda: combined(
                            bundle_digest=digest, domains=domains, headers=tuple(missing), executor_key=self.key,
                            now=now))  # fmt: skip
                    except KeyReleaseDenied:
                        pass  # ask again step by step (below) for a precise refusal
                    else:
                        self._keep_grant(digest, domains, fresh)
                        for header, dek in zip(missing, deks, strict=True):
                            self._keep_dek(fresh, header, dek, now)
        grant = self._grant(digest, domains)
        self._fetch_uncached_deks(grant, headers)
        return grant, [self._dek(grant, h) for h in headers]

    def _fetch_uncached_deks(self, grant: Grant, headers: list[SealedHeader]) -> None:
        """With a token, the keys of the uncached objects of ``headers``, fetched together with those
        of concurrent calls under the same token (:class:`~enclave_actors.coalesce.Coalescer`: a call
        alone fetches at once; calls that arrive while a fetch is in flight share the next one) and
        cached. A refusal is raised for this call's own object only.

        Raises:
            KeyReleaseDenied: the broker refused the key of one of these objects.
            CallRefused: the broker is unreachable (the executor fails closed).
        """
        now = self.clock()
        missing = list({(h.object_id, h.header_hash): h for h in headers
                        if self._cached_dek(h, now) is None}.items())  # fmt: skip
        for at in range(0, len(missing), MAX_KEYS_PER_FETCH):
            try:
                results = self._together.run(
                    grant.token_id, dict(missing[at : at + MAX_KEYS_PER_FETCH]), grant
                )
            except CallRefused:
                self._note("unwrap", "error")
                raise
            for result in results.values():
                if isinstance(result, KeyReleaseDenied):
                    raise result

    def _fetch_deks(self, grant: Grant, headers: Sequence[SealedHeader]) -> list[bytes | KeyReleaseDenied]:
        """Fetch and cache the keys of ``headers`` (one batch of :meth:`_fetch_uncached_deks`, on its leader's
        thread): one ``unwrap_many`` for two or more; if the broker refuses that, or for one object,
        one ``unwrap`` per object, so that each refusal names its object. A refusal is the item's
        result; an unreachable broker raises for the whole batch."""
        now = self.clock()
        many = getattr(self.releaser, "unwrap_many", None)
        if many is not None and len(headers) > 1:
            try:
                deks = self._with_broker(lambda: many(grant, tuple(headers), self.key, now=now))
            except KeyReleaseDenied:
                pass  # ask object by object for precise refusals
            else:
                for header, dek in zip(headers, deks, strict=True):
                    self._keep_dek(grant, header, dek, now)
                return list(deks)
        out: list[bytes | KeyReleaseDenied] = []
        for header in headers:
            try:
                dek = self._with_broker(partial(self.releaser.unwrap, grant, header, self.key, now=now))
            except KeyReleaseDenied as exc:
                self._note("unwrap", "denied")
                out.append(exc)
                continue
            self._keep_dek(grant, header, dek, now)
            out.append(dek)
        return out

    def _cached_grant(self, digest: bytes, domains: tuple[str, ...]) -> Grant | None:
        with self._lock:
            grant = self._grants.get((digest, domains))
        if grant is not None and grant.expires_at - self.renew_margin > self.clock():
            return grant
        return None

    def _cached_dek(self, header: SealedHeader, now: float) -> bytes | None:
        with self._lock:
            cached = self._deks.get((header.object_id, header.header_hash))
        return bytes(cached[0]) if cached is not None and cached[1] > now else None

    @contextlib.contextmanager
    def _noting(self, kind: str) -> Iterator[None]:
        """Count a refused (``denied``) or failed (``error``) broker step of ``kind`` for the report."""
        try:
            yield
        except KeyReleaseDenied:
            self._note(kind, "denied")
            raise
        except CallRefused:
            self._note(kind, "error")
            raise

    def _keep_grant(self, digest: bytes, domains: tuple[str, ...], fresh: Grant) -> None:
        self._note("attest", "ok")
        self._report.attested_until = fresh.expires_at
        with self._lock:
            self._grants[(digest, domains)] = fresh
        self.stats["grants"] += 1

    def _keep_dek(self, grant: Grant, header: SealedHeader, dek: bytes, now: float) -> None:
        self._note("unwrap", "granted")
        with self._lock:
            self._deks[(header.object_id, header.header_hash)] = (
                bytearray(dek),
                min(grant.expires_at, now + 300),
            )
        self.stats["unwraps"] += 1

    def _granting(self, digest: bytes, domains: tuple[str, ...]) -> threading.Lock:
        """The lock a call holds while it attests for (digest, domains): concurrent calls that need the
        same token wait for it instead of attesting again."""
        with self._lock:
            return self._grant_locks.setdefault((digest, domains), threading.Lock())

    def _grant(self, digest: bytes, domains: tuple[str, ...]) -> Grant:
        grant = self._cached_grant(digest, domains)
        if grant is None:
            with self._granting(digest, domains):
                grant = self._cached_grant(digest, domains)
                if grant is None:
                    with self._noting("attest"):
                        fresh: Grant = self._with_broker(
                            lambda: self.releaser.grant(
                                bundle_digest=digest, domains=domains, executor_key=self.key, now=self.clock()
                            )
                        )
                    self._keep_grant(digest, domains, fresh)
                    return fresh
        self._report.attested_until = grant.expires_at
        return grant

    def _dek(self, grant: Grant, header: SealedHeader) -> bytes:
        now = self.clock()
        cached = self._cached_dek(header, now)
        if cached is not None:
            return cached
        with self._noting("unwrap"):
            dek = self._with_broker(lambda: self.releaser.unwrap(grant, header, self.key, now=now))
        self._keep_dek(grant, header, dek, now)
        return bytes(dek)

    # -- shared steps of calls and actors ------------------------------------------------------------
    def _bundle(self, h: dict[str, Any], frames: list[Any]) -> tuple[Bundle | None, bytes, list[Any]]:
        """(1) The bundle we hashed ourselves, never what the shim claims, and its digest (computed
        when the source arrived: bundles are cached by it); None: ask for the source."""
        try:
            claimed = bytes.fromhex(str(h["bundle_digest"]))
        except (KeyError, ValueError):
            raise CallRefused("bad_request", "bundle_digest missing or not hex") from None
        n_src = int(h.get("bundle", {}).get("files", 0)) if isinstance(h.get("bundle"), dict) else 0
        bundle = self._bundles.get(claimed)
        if bundle is None:
            if not n_src:
                return None, claimed, frames
            try:
                bundle = Bundle.from_wire(h["bundle"], frames[:n_src])
            except (KeyError, ValueError, TypeError) as exc:
                raise CallRefused("bad_request", f"malformed bundle: {exc}") from None
            if bundle.digest != claimed:
                raise CallRefused("bad_request", "bundle source does not match its digest")
            with self._lock:
                self._bundles[bundle.digest] = bundle
        return bundle, claimed, frames[n_src:]

    def _inputs(
        self, h: dict[str, Any], frames: list[Any], fds: list[int], owned: list[int]
    ) -> list[tuple[SealedHeader, Any, str, int]]:
        """(2) Sealed inputs: (parsed header, bytes, "frame" | "fd", descriptor or -1), bounds-checked.

        ``"known"`` inputs (a sealed header and the length) come from :class:`_InputCache`; their
        descriptors are appended to ``owned`` (the caller closes them). Raises :class:`NeedInputs`
        when one is not kept here.
        """
        specs = h.get("inputs", [])
        if not isinstance(specs, list) or len(specs) > MAX_INPUTS:
            raise CallRefused("bad_request", f"at most {MAX_INPUTS} sealed inputs per call")
        out = []
        missing = False
        for spec in specs:
            try:
                src, index = str(spec["src"]), int(spec["index"])
                if src == "fd":
                    # The header only: the worker maps the body (no page of it is touched here).
                    fd = fds[index]
                    view: Any = protocol.read_sealed_prefix(fd, SEALED_HEADER_BYTES)
                elif src == "frame":
                    fd, view = -1, frames[index]
                elif src == "known":
                    view = bytes(frames[index])
                    kept = self.inputs.get((view, int(spec["length"])))
                    if kept is None:
                        missing = True
                        continue
                    owned.append(kept)
                    self.stats["inputs_known"] += 1
                    fd, src = kept, "fd"
                    if protocol.read_sealed_prefix(fd, len(view)) != view:
                        raise ValueError("kept input does not match its header")
                else:
                    raise ValueError(src)
                out.append((SealedHeader.parse(view), view, src, fd))
            except (KeyError, IndexError, ValueError, TypeError, protocol.ProtocolError, DecryptionError):
                raise CallRefused("bad_request", "malformed sealed input") from None
        if missing:
            raise NeedInputs()
        params = h.get("params", {})
        if not isinstance(params, dict) or len(json.dumps(params)) > MAX_PARAMS_BYTES:
            raise CallRefused("bad_request", f"plain parameters are limited to {MAX_PARAMS_BYTES} bytes")
        return out

    def _approve(
        self, digest: bytes, domains: tuple[str, ...], out_domain: str, recipient: Any
    ) -> tuple[dict[str, DomainInfo], dict[str, Any]]:
        """(3) Every domain of the call approves this bundle (where the policy is visible here; the
        broker checks it again before it issues a token); the output key."""
        infos: dict[str, DomainInfo] = {}
        for name in domains:
            info: DomainInfo = self._with_broker(partial(self.releaser.domain, name))
            if not bundle_approved(info.policy, digest):
                self._audit_denial(digest, name, "bundle not approved")
                raise CallRefused("denied", f"code bundle {digest.hex()} is not approved by domain {name!r}")
            infos[name] = info
        return infos, self._output_key(infos[out_domain], recipient)

    def _request(
        self, op: str, inputs: list[tuple[SealedHeader, Any, str, int]], infos: dict[str, DomainInfo],
        params: dict[str, Any], out: dict[str, Any], digest: bytes, domains: tuple[str, ...],
    ) -> tuple[dict[str, Any], list[Any], list[int]]:  # fmt: skip
        _refuse_plain_params(infos, params)
        specs: list[dict[str, Any]] = []
        inline: list[Any] = []
        fds: list[int] = []
        for header, view, src, fd in inputs:
            pickle_ok = infos[header.domain].descriptor.allow_pickle
            if src == "fd":
                specs.append({"src": "fd", "index": len(fds), "allow_pickle": pickle_ok})
                fds.append(fd)
            else:
                specs.append({"src": "frame", "index": len(inline), "allow_pickle": pickle_ok})
                inline.append(view)
        request = {
            "op": op,
            "inputs": specs,
            "args": params.get("args", []),
            "kwargs": params.get("kwargs", []),
            "kwarg_names": params.get("kwarg_names", []),
            "out": out,
            "ctx": {"node_id": self.facts.node_id, "tee": self.facts.tee, "pool": self.facts.pool,
                    "region": self.facts.region, "bundle_digest": digest.hex(), "domains": list(domains)},
        }  # fmt: skip
        return request, inline, fds

    # -- the call ------------------------------------------------------------------------------------
    def call(self, msg: protocol.Message) -> tuple[dict[str, Any], list[Any], list[int]]:
        """Serve one ``call`` request; returns the reply (header, frames, fds). See the module docstring."""
        if self.unavailable is not None:
            raise CallRefused("unavailable", self.unavailable)
        h = msg.header
        bundle, digest, frames = self._bundle(h, msg.frames)  # (1)
        if bundle is None:
            return {"status": "need_bundle"}, [], []
        inputs = self._inputs(h, frames, msg.fds, msg.fds)  # (2)
        out_domain = str(h.get("domain", ""))
        domains = tuple(sorted({out_domain, *(x[0].domain for x in inputs)}))
        infos, out = self._approve(digest, domains, out_domain, h.get("recipient"))  # (3)
        _, deks = self._keys(digest, domains, [x[0] for x in inputs])  # (4) token and (5) data keys
        # (6) Run in a worker of (domains, bundle): an idle one, a new one, or the first to come free.
        timeout = self._timeout(h)
        request, inline, fds = self._request("call", inputs, infos, h.get("params", {}), out, digest, domains)
        key: Key = (domains, digest)
        deadline = time.monotonic() + timeout
        try:
            with self.pools.lease(key, bundle, timeout=timeout) as worker:
                left = max(0.001, deadline - time.monotonic())
                reply = self._run(worker, request, [*deks, *inline], fds, left,
                                  lambda: self.pools.discard(key, worker))  # fmt: skip
        except TimeoutError:
            raise CallRefused("timeout", f"confidential call exceeded its time limit ({timeout:.0f} s) "
                                         "waiting for a worker") from None  # fmt: skip
        except WorkerLoadError as exc:
            raise CallRefused("bad_request", str(exc)) from None
        finally:
            deks.clear()
        return self._keep_inputs(inputs, reply)

    def _keep_inputs(
        self,
        inputs: list[tuple[SealedHeader, Any, str, int]],
        reply: tuple[dict[str, Any], list[Any], list[int]],
    ) -> tuple[dict[str, Any], list[Any], list[int]]:
        """After ``ok`` (the worker authenticated every input), keep large inputs' memfds for calls
        that name them by header (:class:`_InputCache`)."""
        if reply[0].get("status") == "ok":
            for header, _view, src, fd in inputs:
                if src == "fd":
                    self.inputs.put((header.header_bytes, os.fstat(fd).st_size), fd)
        return reply

    def _timeout(self, h: dict[str, Any]) -> float:
        try:
            asked = float(h.get("timeout_s") or self.limits.call_timeout)
        except (TypeError, ValueError):
            raise CallRefused("bad_request", "timeout_s must be a number") from None
        return max(0.001, min(asked, self.limits.call_timeout))

    # -- enclave actors --------------------------------------------------------------------------------
    def actor_create(
        self, msg: protocol.Message, owned: set[str]
    ) -> tuple[dict[str, Any], list[Any], list[int]]:
        """Start an actor: a worker subprocess dedicated to this instance, constructed from sealed
        inputs and plain parameters. Its domains (the output domain and the constructor inputs') are
        fixed; method calls may bring inputs of those domains only. It lives until its shim's
        connection closes (the Ray actor died), :meth:`stop_actor`, or keys are dropped."""
        if self.unavailable is not None:
            raise CallRefused("unavailable", self.unavailable)
        h = msg.header
        bundle, digest, frames = self._bundle(h, msg.frames)
        if bundle is None:
            return {"status": "need_bundle"}, [], []
        inputs = self._inputs(h, frames, msg.fds, msg.fds)
        out_domain = str(h.get("domain", ""))
        domains = tuple(sorted({out_domain, *(x[0].domain for x in inputs)}))
        infos, out = self._approve(digest, domains, out_domain, h.get("recipient"))
        grant, deks = self._keys(digest, domains, [x[0] for x in inputs])
        with self._lock:
            if len(self._actors) >= self.limits.max_actors:
                raise CallRefused(
                    "unavailable", f"this executor runs {self.limits.max_actors} actors already"
                )
        try:
            worker = Worker(bundle, self.limits.memory_limit_bytes)
        except WorkerLoadError as exc:
            raise CallRefused("bad_request", str(exc)) from None
        self.stats["actors_started"] += 1
        actor = _Actor(uuid.uuid4().hex, worker, bundle, digest, domains, out)
        request, inline, fds = self._request(
            "actor_init", inputs, infos, h.get("params", {}), out, digest, domains
        )
        reply = self._keep_inputs(inputs, self._run(worker, request, [*deks, *inline], fds, self._timeout(h),
                                                    worker.stop))  # fmt: skip
        if reply[0]["status"] != "ok":
            worker.stop()
            return reply
        with self._lock:
            self._actors[actor.actor_id] = actor
        owned.add(actor.actor_id)
        return {**self._trust_state(grant), "status": "ok", "actor_id": actor.actor_id}, [], []

    def actor_call(self, msg: protocol.Message) -> tuple[dict[str, Any], list[Any], list[int]]:
        """Run one method of a live actor on sealed inputs of its domains; the result is sealed."""
        if self.unavailable is not None:
            raise CallRefused("unavailable", self.unavailable)
        h = msg.header
        with self._lock:
            actor = self._actors.get(str(h.get("actor_id", "")))
        if actor is None:
            raise CallRefused("crashed", "the enclave actor is gone (it failed, was stopped, or its node's "
                                         "keys were revoked): its state is lost")  # fmt: skip
        method = h.get("method")
        if not isinstance(method, str) or not _METHOD_RE.match(method):
            raise CallRefused("bad_request", "method must be a public method name")
        inputs = self._inputs(h, msg.frames, msg.fds, msg.fds)
        foreign = {x[0].domain for x in inputs} - set(actor.domains)
        if foreign:
            raise CallRefused("denied", f"inputs of domains {sorted(foreign)} cannot enter an actor of "
                                        f"domains {list(actor.domains)} (domains never share a process)")  # fmt: skip
        digest = actor.digest
        infos = {name: self._with_broker(partial(self.releaser.domain, name)) for name in actor.domains}
        grant, deks = self._keys(digest, actor.domains, [x[0] for x in inputs])
        request, inline, fds = self._request("actor_call", inputs, infos, h.get("params", {}), actor.out, digest,
                                             actor.domains)  # fmt: skip
        request["method"] = method
        try:
            reply = self._run(actor.worker, request, [*deks, *inline], fds, self._timeout(h),
                              lambda: self.stop_actor(actor.actor_id))  # fmt: skip
        except CallRefused as exc:
            if exc.status != "dropped":
                raise
            raise CallRefused(
                "dropped", f"{exc}: the enclave actor was stopped with it, its state is lost"
            ) from None
        header, frames, out_fds = self._keep_inputs(inputs, reply)
        return {**header, **self._trust_state(grant)}, frames, out_fds

    def stop_actor(self, actor_id: str) -> None:
        with self._lock:
            actor = self._actors.pop(actor_id, None)
        if actor is not None:
            actor.worker.stop()

    def _trust_state(self, grant: Grant) -> dict[str, Any]:
        return {"tee": self.facts.tee, "pool": self.facts.pool, "region": self.facts.region,
                "node_id": self.facts.node_id, "attested_until": grant.expires_at}  # fmt: skip

    def _audit_denial(self, digest: bytes, domain: str, reason: str) -> None:
        logger.warning("executor: denied bundle %s for domain %r: %s", digest.hex(), domain, reason)

    @staticmethod
    def _output_key(info: DomainInfo, recipient: Any) -> dict[str, Any]:
        desc = info.descriptor
        if recipient in (None, "", "domain"):
            return {"domain": desc.name, "version": desc.version, "suite": desc.public_key.suite,
                    "public_key": desc.public_key.raw.hex(), "allow_pickle": desc.allow_pickle}  # fmt: skip
        # The policy where this releaser sees it, else the recipients the broker signed into the
        # descriptor (the same list: descriptor_bytes copies it from the policy).
        listed = info.policy.recipients if info.policy is not None else desc.recipients
        if not isinstance(recipient, str) or recipient not in listed:
            raise CallRefused("denied", f"output recipient is not listed in domain {desc.name!r}'s policy")
        suite, _, raw = recipient.partition(":")
        try:
            hpke.PublicKey(suite, bytes.fromhex(raw))
        except ValueError:
            raise CallRefused("bad_request", "malformed recipient key") from None
        # Key version 0 marks "sealed to a policy-listed recipient key" (docs/executor.md).
        return {"domain": desc.name, "version": 0, "suite": suite, "public_key": raw, "allow_pickle": False}

    def _run(
        self,
        worker: Worker,
        request: dict[str, Any],
        frames: list[Any],
        fds: list[int],
        timeout: float,
        on_failure: Callable[[], None],
    ) -> tuple[dict[str, Any], list[Any], list[int]]:
        with worker.lock:
            try:
                worker.sock.settimeout(timeout)
                protocol.send(worker.sock, request, frames, fds)
                reply = protocol.recv(worker.sock)
            except TimeoutError:
                on_failure()
                raise CallRefused(
                    "timeout", f"confidential call exceeded its time limit ({timeout:.0f} s)"
                ) from None
            except (ConnectionError, OSError, protocol.ProtocolError):
                on_failure()
                if worker.stopped_for is not None:  # drop_keys ended the call, not the bundle
                    raise CallRefused("dropped", "the executor stopped this call when it dropped its keys "
                                                 f"({worker.stopped_for})") from None  # fmt: skip
                raise CallRefused("crashed", "the confidential call's worker process died") from None
            finally:
                frames.clear()
        status = reply.header.get("status")
        if status not in ("ok", "task_error"):
            reply.close_fds()
            raise CallRefused("crashed", "the confidential call's worker answered badly")
        return {"status": status}, reply.frames, reply.fds


def _refuse_plain_params(infos: dict[str, DomainInfo], params: Any) -> None:
    """A domain whose signed descriptor sets ``seal_arguments`` admits sealed arguments only:
    a plain JSON parameter (anything but ``["s", i]``) would have crossed Ray in the clear."""
    strict = sorted(name for name, info in infos.items() if info.descriptor.seal_arguments)
    if not strict or not isinstance(params, dict):
        return
    given = [*(params.get("args") or []), *(params.get("kwargs") or [])]
    if any(not (isinstance(p, list) and len(p) == 2 and p[0] == "s") for p in given):
        raise CallRefused("denied", f"the policy of domain(s) {strict} requires sealed arguments "
                                    "(seal_arguments): plain parameters are refused; seal them with "
                                    "rc.put, as rc.remote and rc.enclave_actor do for these domains")  # fmt: skip


class ExecutorServer:
    """Serves :class:`Executor` on a Unix socket (one thread per shim connection).

    Args:
        executor: the executor core.
        path: socket path; created with ``mode`` (default 0660: the Ray user and its group).
        group: the socket's group id (the Ray user's group when the executor runs as another user);
            None keeps the executor's own.
    """

    def __init__(
        self, executor: Executor, path: str, *, mode: int = 0o660, poll_interval: float = 5.0,
        group: int | None = None,
    ) -> None:  # fmt: skip
        if not 0 < poll_interval <= MAX_POLL_INTERVAL:
            raise ValueError(f"poll_interval must be in (0, {MAX_POLL_INTERVAL}] seconds")
        self.executor = executor
        self.path = path
        self.mode = mode
        self.group = group
        self.poll_interval = poll_interval
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self.routing_until: float | None = None

    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path + ".tmp")
        finally:
            os.umask(old)
        os.chmod(self.path + ".tmp", self.mode)
        if self.group is not None:
            os.chown(self.path + ".tmp", -1, self.group)
        sock.listen(128)
        os.replace(self.path + ".tmp", self.path)  # appears only when ready
        self._sock = sock
        self.executor.poll_revocation()
        threading.Thread(target=self._poll, name="rc-revocation-poll", daemon=True).start()
        threading.Thread(target=self._routing, name="rc-routing-attest", daemon=True).start()
        threading.Thread(target=self._accept, name="rc-executor-accept", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.executor.drop_keys("executor stopping")

    def wait(self) -> None:
        self._stop.wait()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self.executor.poll_revocation()
            self.executor.pools.reap()

    def _routing(self) -> None:
        """Attest for a routing token at start and before each expires (trust-registry admission:
        the broker signs an admit per routing token, docs/placement.md); retry after a refusal."""
        attest = getattr(self.executor.releaser, "routing", None)
        if attest is None:
            return
        ex, delay = self.executor, 0.0
        while not self._stop.wait(delay):
            try:
                until = float(ex._with_broker(lambda: attest(executor_key=ex.key, now=ex.clock())))
                self.routing_until = until
                delay = max(1.0, until - ex.clock() - ex.renew_margin)
            except (KeyReleaseDenied, CallRefused) as exc:
                logger.warning("executor: no routing token (%s); retrying in %.0f s", exc, ROUTING_RETRY_S)
                delay = ROUTING_RETRY_S

    def _accept(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        owned: set[str] = set()  # actors created on this connection: they end when it closes
        try:
            with conn:
                self._serve_loop(conn, owned)
        finally:
            for actor_id in owned:
                self.executor.stop_actor(actor_id)

    def _serve_loop(self, conn: socket.socket, owned: set[str]) -> None:
        while True:
            try:
                msg = protocol.recv(conn)
            except (ConnectionError, OSError, protocol.ProtocolError):
                return
            reported = msg.header.get("op") in ("call", "actor_create", "actor_call")
            if reported:
                self.executor.begin_report()
            try:
                header, frames, fds = self._handle(msg, owned)
            except NeedInputs:
                header, frames, fds = {"status": "need_inputs"}, [], []
            except CallRefused as exc:
                header, frames, fds = {"status": exc.status, "message": str(exc)}, [], []
            except KeyReleaseDenied as exc:
                header, frames, fds = {"status": "denied", "message": str(exc)}, [], []
            except Exception:
                logger.exception("executor: internal error")
                header, frames, fds = {"status": "internal", "message": "executor internal error"}, [], []
            finally:
                msg.close_fds()
            if reported:
                header = {**header, "report": self.executor.end_report()}
            try:
                protocol.send(conn, header, frames, fds)
            except OSError:
                return
            finally:
                for fd in fds:
                    os.close(fd)

    def _handle(self, msg: protocol.Message, owned: set[str]) -> tuple[dict[str, Any], list[Any], list[int]]:
        op = msg.header.get("op")
        if op == "call":
            return self.executor.call(msg)
        if op == "actor_create":
            return self.executor.actor_create(msg, owned)
        if op == "actor_call":
            if str(msg.header.get("actor_id", "")) not in owned:
                raise CallRefused("bad_request", "no such actor on this connection")
            return self.executor.actor_call(msg)
        if op == "ping":
            return (
                {"status": "ok", "node_id": self.executor.facts.node_id, "tee": self.executor.facts.tee},
                [],
                [],
            )
        if op == "stats":
            return {"status": "ok", "stats": {**self.executor.stats, "workers_started": self.executor.pools.started}, "workers": self.executor.worker_pids(),
                    "pid": os.getpid()}, [], []  # fmt: skip
        raise CallRefused("bad_request", f"unknown operation {op!r}")


__all__ = ["MAX_PARAMS_BYTES", "CallRefused", "Executor", "ExecutorServer", "Limits"]
