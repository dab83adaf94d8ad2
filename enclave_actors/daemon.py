"""The enclave executor daemon: the only process on a TEE node that holds keys and plaintext.

    ray-confidential executor --socket /run/rc/executor.sock --tee sev-snp --node-id HEX ...

It serves untrusted shims (Ray workers) on a Unix socket (mode 0660: the Ray user and group only,
docs/executor.md), attests through its attestation device, obtains tokens and data keys through a
:class:`~enclave_actors.keys.KeyReleaser`, and runs approved code bundles in worker subprocesses,
one per (domains, bundle) pair, never shared across domains or bundles (design.md sections 2, 5, 8).

A call (``op = "call"``), step by step as in :meth:`Executor.call`:

1. Bundle: the cached bundle for the claimed digest, else the source the shim sent, whose digest
   the executor computes itself and compares with the claim (``need_bundle`` when neither).
2. Inputs: sealed bytes as frames or sealed memfds; headers parsed (bounds-checked).
3. Policy: every domain of the call (inputs and output) must approve the bundle digest; an output
   recipient other than the domain must be listed in the output domain's policy.
4. Token: one per bundle digest, cached, renewed ``renew_margin`` seconds before expiry.
5. Data keys: unwrapped through the releaser, cached per object for at most the token lifetime.
6. Run: the worker for (domains, bundle) opens inputs, runs the entry point, seals the result.
7. Reply: sealed bytes, or ``task_error`` with the sealed detail (never the detail itself).

Lifecycle: a poller reads the revocation epoch every ``poll_interval`` (<= 10 s); a new epoch drops
every cached key and token and stops every worker. When the broker stays unreachable for
``broker_wait`` seconds the executor fails closed (drops keys, stops workers, refuses calls with a
clear error) until it answers again. A crashing or hanging bundle kills only its worker.

What it does NOT do: decide routing (placement is the scheduler's job), or trust anything a shim
sends: every field of a request is untrusted input.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from enclave_actors import protocol
from enclave_actors.keys import BrokerUnavailable, DomainInfo, Grant, KeyReleaser, NodeFacts, bundle_approved
from ray_confidential.bundle import Bundle
from ray_confidential.crypto import hpke
from ray_confidential.errors import DecryptionError, KeyReleaseDenied
from ray_confidential.sealed.format import SealedHeader

logger = logging.getLogger(__name__)

MAX_PARAMS_BYTES = 64 << 10
"""Plain JSON parameters of one call (args and kwargs that are not sealed), encoded size."""
MAX_INPUTS = 32
MAX_POLL_INTERVAL = 10.0
INLINE_INPUT_LIMIT = 1 << 20


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


class _Worker:
    """One worker subprocess and its socket (owned by the daemon)."""

    def __init__(self, bundle: Bundle, memory_limit: int) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lock = threading.Lock()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "enclave_actors.worker", str(child.fileno()), str(memory_limit)],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
            )
        finally:
            child.close()
        self.sock = parent
        self.sock.settimeout(120)
        protocol.send(self.sock, bundle.to_wire(), [d for _, d in bundle.files])
        reply = protocol.recv(self.sock)
        if reply.header.get("status") != "ok":
            self.stop()
            raise CallRefused("bad_request", "the code bundle failed to load in the executor")

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        try:
            self.sock.close()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()


class Executor:
    """Executor state: the key, tokens, data keys, bundles and workers (the daemon's core).

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
        self._grants: dict[bytes, Grant] = {}
        self._deks: dict[tuple[bytes, bytes], tuple[bytearray, float]] = {}
        self._bundles: dict[bytes, Bundle] = {}
        self._workers: dict[tuple[tuple[str, ...], bytes], _Worker] = {}
        self._epoch: int | None = None
        self._last_broker_ok = clock()
        self.unavailable: str | None = None
        self.stats = {"unwraps": 0, "grants": 0, "workers_started": 0}

    # -- lifecycle ---------------------------------------------------------------------------------
    def drop_keys(self, reason: str) -> None:
        """Forget every data key and token and stop every worker (revocation, fail-closed, exit)."""
        with self._lock:
            deks, self._deks = self._deks, {}
            self._grants.clear()
            workers, self._workers = self._workers, {}
        for dek, _ in deks.values():
            dek[:] = bytes(len(dek))
        for worker in workers.values():
            worker.stop()
        if deks or workers:
            logger.warning(
                "executor: dropped %d data keys and %d workers (%s)", len(deks), len(workers), reason
            )

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
        with self._lock:
            return {f"{','.join(k[0])}|{k[1].hex()}": w.pid for k, w in self._workers.items()}

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

    def _grant(self, digest: bytes) -> Grant:
        with self._lock:
            grant = self._grants.get(digest)
        if grant is not None and grant.expires_at - self.renew_margin > self.clock():
            return grant
        fresh: Grant = self._with_broker(
            lambda: self.releaser.grant(bundle_digest=digest, executor_key=self.key, now=self.clock())
        )
        with self._lock:
            self._grants[digest] = fresh
        self.stats["grants"] += 1
        return fresh

    def _dek(self, grant: Grant, header: SealedHeader) -> bytes:
        key = (header.object_id, header.header_hash)
        now = self.clock()
        with self._lock:
            cached = self._deks.get(key)
            if cached is not None and cached[1] > now:
                return bytes(cached[0])
        dek = self._with_broker(lambda: self.releaser.unwrap(grant, header, self.key, now=now))
        with self._lock:
            self._deks[key] = (bytearray(dek), min(grant.expires_at, now + 300))
        self.stats["unwraps"] += 1
        return bytes(dek)

    # -- the call ------------------------------------------------------------------------------------
    def call(self, msg: protocol.Message) -> tuple[dict[str, Any], list[Any], list[int]]:
        """Serve one ``call`` request; returns the reply (header, frames, fds). See the module docstring."""
        if self.unavailable is not None:
            raise CallRefused("unavailable", self.unavailable)
        h = msg.header
        # (1) Bundle: what we hashed ourselves, never what the shim claims.
        try:
            claimed = bytes.fromhex(str(h["bundle_digest"]))
        except (KeyError, ValueError):
            raise CallRefused("bad_request", "bundle_digest missing or not hex") from None
        n_src = int(h.get("bundle", {}).get("files", 0)) if isinstance(h.get("bundle"), dict) else 0
        bundle = self._bundles.get(claimed)
        if bundle is None:
            if not n_src:
                return {"status": "need_bundle"}, [], []
            try:
                bundle = Bundle.from_wire(h["bundle"], msg.frames[:n_src])
            except (KeyError, ValueError, TypeError) as exc:
                raise CallRefused("bad_request", f"malformed bundle: {exc}") from None
            if bundle.digest != claimed:
                raise CallRefused("bad_request", "bundle source does not match its digest")
            with self._lock:
                self._bundles[bundle.digest] = bundle
        digest = bundle.digest
        frames = msg.frames[n_src:]
        # (2) Inputs.
        specs = h.get("inputs", [])
        if not isinstance(specs, list) or len(specs) > MAX_INPUTS:
            raise CallRefused("bad_request", f"at most {MAX_INPUTS} sealed inputs per call")
        views: list[Any] = []
        headers: list[SealedHeader] = []
        for spec in specs:
            try:
                src, index = spec["src"], int(spec["index"])
                view = protocol.map_sealed_memfd(msg.fds[index]) if src == "fd" else frames[index]
                headers.append(SealedHeader.parse(view))
            except (KeyError, IndexError, ValueError, TypeError, protocol.ProtocolError, DecryptionError):
                raise CallRefused("bad_request", "malformed sealed input") from None
            views.append(view)
        params = h.get("params", {})
        if len(json.dumps(params)) > MAX_PARAMS_BYTES:
            raise CallRefused("bad_request", f"plain parameters are limited to {MAX_PARAMS_BYTES} bytes")
        out_domain = str(h.get("domain", ""))
        domains = tuple(sorted({out_domain, *(x.domain for x in headers)}))
        # (3) Policy: every domain of the call approves this bundle.
        infos: dict[str, DomainInfo] = {}
        for name in domains:
            info: DomainInfo = self._with_broker(partial(self.releaser.domain, name))
            if not bundle_approved(info.policy, digest):
                self._audit_denial(digest, name, "bundle not approved")
                raise CallRefused("denied", f"code bundle {digest.hex()} is not approved by domain {name!r}")
            infos[name] = info
        out = self._output_key(infos[out_domain], h.get("recipient"))
        # (4) Token and (5) data keys.
        grant = self._grant(digest)
        deks = [self._dek(grant, x) for x in headers]
        # (6) Run in the worker dedicated to (domains, bundle).
        timeout = min(float(h.get("timeout_s") or self.limits.call_timeout), self.limits.call_timeout)
        inputs: list[dict[str, Any]] = []
        inline: list[Any] = []
        fds: list[int] = []
        for x, view, spec in zip(headers, views, specs, strict=True):
            if spec["src"] == "fd":
                inputs.append(
                    {"src": "fd", "index": len(fds), "allow_pickle": infos[x.domain].descriptor.allow_pickle}
                )
                fds.append(msg.fds[int(spec["index"])])
            else:
                inputs.append(
                    {
                        "src": "frame",
                        "index": len(inline),
                        "allow_pickle": infos[x.domain].descriptor.allow_pickle,
                    }
                )
                inline.append(view)
        request = {
            "op": "call",
            "inputs": inputs,
            "args": params.get("args", []),
            "kwargs": params.get("kwargs", []),
            "kwarg_names": params.get("kwarg_names", []),
            "out": out,
            "ctx": {
                "node_id": self.facts.node_id,
                "tee": self.facts.tee,
                "pool": self.facts.pool,
                "region": self.facts.region,
                "bundle_digest": digest.hex(),
                "domains": list(domains),
            },
        }
        return self._run(domains, bundle, request, [*deks, *inline], fds, timeout)

    def _audit_denial(self, digest: bytes, domain: str, reason: str) -> None:
        audit = getattr(self.releaser, "audit", None)
        if callable(audit):
            audit("call_denied", bundle=digest.hex(), domain=domain, reason=reason)
        logger.warning("executor: denied bundle %s for domain %r: %s", digest.hex(), domain, reason)

    @staticmethod
    def _output_key(info: DomainInfo, recipient: Any) -> dict[str, Any]:
        desc = info.descriptor
        if recipient in (None, "", "domain"):
            return {"domain": desc.name, "version": desc.version, "suite": desc.public_key.suite,
                    "public_key": desc.public_key.raw.hex(), "allow_pickle": desc.allow_pickle}  # fmt: skip
        if not isinstance(recipient, str) or info.policy is None or recipient not in info.policy.recipients:
            raise CallRefused("denied", f"output recipient is not listed in domain {desc.name!r}'s policy")
        suite, _, raw = recipient.partition(":")
        try:
            hpke.PublicKey(suite, bytes.fromhex(raw))
        except ValueError:
            raise CallRefused("bad_request", "malformed recipient key") from None
        # Key version 0 marks "sealed to a policy-listed recipient key" (docs/executor.md).
        return {"domain": desc.name, "version": 0, "suite": suite, "public_key": raw, "allow_pickle": False}

    def _worker(self, domains: tuple[str, ...], bundle: Bundle) -> _Worker:
        key = (domains, bundle.digest)
        with self._lock:
            worker = self._workers.get(key)
            if worker is not None and worker.alive():
                return worker
            if len(self._workers) >= self.limits.max_workers:
                oldest = next(iter(self._workers))
                self._workers.pop(oldest).stop()
        worker = _Worker(bundle, self.limits.memory_limit_bytes)
        self.stats["workers_started"] += 1
        with self._lock:
            self._workers[key] = worker
        return worker

    def _run(
        self,
        domains: tuple[str, ...],
        bundle: Bundle,
        request: dict[str, Any],
        frames: list[Any],
        fds: list[int],
        timeout: float,
    ) -> tuple[dict[str, Any], list[Any], list[int]]:
        worker = self._worker(domains, bundle)
        with worker.lock:
            try:
                worker.sock.settimeout(timeout)
                protocol.send(worker.sock, request, frames, fds)
                reply = protocol.recv(worker.sock)
            except TimeoutError:
                self._discard(domains, bundle, worker)
                raise CallRefused(
                    "timeout", f"confidential call exceeded its time limit ({timeout:.0f} s)"
                ) from None
            except (ConnectionError, OSError, protocol.ProtocolError):
                self._discard(domains, bundle, worker)
                raise CallRefused("crashed", "the confidential call's worker process died") from None
            finally:
                frames.clear()
        status = reply.header.get("status")
        if status not in ("ok", "task_error"):
            reply.close_fds()
            raise CallRefused("crashed", "the confidential call's worker answered badly")
        return {"status": status}, reply.frames, reply.fds

    def _discard(self, domains: tuple[str, ...], bundle: Bundle, worker: _Worker) -> None:
        with self._lock:
            if self._workers.get((domains, bundle.digest)) is worker:
                del self._workers[(domains, bundle.digest)]
        worker.stop()


class ExecutorServer:
    """Serves :class:`Executor` on a Unix socket (one thread per shim connection).

    Args:
        executor: the executor core.
        path: socket path; created with ``mode`` (default 0660: the Ray user and its group).
    """

    def __init__(
        self, executor: Executor, path: str, *, mode: int = 0o660, poll_interval: float = 5.0
    ) -> None:
        if not 0 < poll_interval <= MAX_POLL_INTERVAL:
            raise ValueError(f"poll_interval must be in (0, {MAX_POLL_INTERVAL}] seconds")
        self.executor = executor
        self.path = path
        self.mode = mode
        self.poll_interval = poll_interval
        self._sock: socket.socket | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path + ".tmp")
        finally:
            os.umask(old)
        os.chmod(self.path + ".tmp", self.mode)
        sock.listen(128)
        os.replace(self.path + ".tmp", self.path)  # appears only when ready
        self._sock = sock
        self.executor.poll_revocation()
        threading.Thread(target=self._poll, name="rc-revocation-poll", daemon=True).start()
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
        with conn:
            while True:
                try:
                    msg = protocol.recv(conn)
                except (ConnectionError, OSError, protocol.ProtocolError):
                    return
                try:
                    header, frames, fds = self._handle(msg)
                except CallRefused as exc:
                    header, frames, fds = {"status": exc.status, "message": str(exc)}, [], []
                except KeyReleaseDenied as exc:
                    header, frames, fds = {"status": "denied", "message": str(exc)}, [], []
                except Exception:
                    logger.exception("executor: internal error")
                    header, frames, fds = {"status": "internal", "message": "executor internal error"}, [], []
                finally:
                    msg.close_fds()
                try:
                    protocol.send(conn, header, frames, fds)
                except OSError:
                    return
                finally:
                    for fd in fds:
                        os.close(fd)

    def _handle(self, msg: protocol.Message) -> tuple[dict[str, Any], list[Any], list[int]]:
        op = msg.header.get("op")
        if op == "call":
            return self.executor.call(msg)
        if op == "ping":
            return (
                {"status": "ok", "node_id": self.executor.facts.node_id, "tee": self.executor.facts.tee},
                [],
                [],
            )
        if op == "stats":
            return {"status": "ok", "stats": dict(self.executor.stats), "workers": self.executor.worker_pids(),
                    "pid": os.getpid()}, [], []  # fmt: skip
        raise CallRefused("bad_request", f"unknown operation {op!r}")


__all__ = ["MAX_PARAMS_BYTES", "CallRefused", "Executor", "ExecutorServer", "Limits"]
