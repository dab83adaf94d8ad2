"""The embedded development broker: a real gRPC key broker over the driver's development domains.

    broker = EmbeddedBroker.start(state_dir)            # 127.0.0.1:<ephemeral>, plaintext, env=dev
    broker.launch_path                                  # 0600 launch data for simulated executors
    broker.revoke("node", node_id)                      # takes effect on the next release
    [r for r in broker.audit_records() if r["event"] == "unwrap"]
    broker.stop()

In development the owner's process is the broker (design.md section 9; the ``rc.init`` table): the
domains it serves are exactly those of the driver's :class:`~ray_confidential.keyservice.DevKeyService`
state directory, with the same key material, read through :class:`DevKeyRegistry` on each request
(a domain created with ``rc.create_domain`` after the broker started is visible at once; a changed
policy applies to the next request). Everything else is the ordinary :class:`~ray_confidential.kbs.
broker.Broker` of ``BrokerConfig.development()``: challenges, attestation against the process's
simulated roots (``DevRootOfTrust.for_process()``), ``env=dev`` tokens, signed releases, revocation,
and the signed, chained audit log. It binds 127.0.0.1 only (plaintext is refused elsewhere) and
admits only its own cluster id (A5: the same image joined to another cluster).

Launch data (what an executor needs to use it) is a JSON file, mode 0600 in a 0700 directory, passed
to executors by path: ``target``, ``release_public_key`` (PEM, pinned), ``dev_roots`` (hex of
``DevRootOfTrust.to_launch_data()``: simulated root private keys, development only), ``cluster_id``,
``audience``, ``env`` and ``statement_public_key`` (PEM of the trust-registry statement key). It
never travels through Ray (runtime_env, env vars, GCS).

Trust registry (docs/placement.md): the broker holds a separate P-256 **statement key**. When an
executor attests with scope ``routing`` (at start and on renewal) the broker signs an ``admit``
(expiring with the routing token), and a ``revoke`` when a node is revoked. This broker runs inside
the driver, a Ray process, so it submits them to the registry actor itself (:meth:`EmbeddedBroker.
attach_registry`, called by ``rc.init``); statements issued before that (nodes that joined before
``rc.init``) are kept, newest per node, and submitted on attach. The driver pins
:attr:`EmbeddedBroker.statement_verifier` in its session; it never learns the key through Ray.

:func:`shared` / :func:`release` keep one process-wide instance, reference counted, for ``rc.init``
and ``testing.add_tee_node`` (nodes may be added before or after ``rc.init``).

What it does NOT do: protect anything (it trusts simulated roots and any caller is the owner), or
persist revocations (in-memory store): never use it with real data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from ray_confidential.crypto import hpke
from ray_confidential.domains import DomainPolicy
from ray_confidential.kbs.broker import Broker
from ray_confidential.kbs.config import DEV_OWNER, BrokerConfig, build, launch_data
from ray_confidential.kbs.domains import DomainError, DomainRecord, DomainRegistry, KeyVersion
from ray_confidential.kbs.server import KBSServer
from ray_confidential.kbs.store import MemoryStore
from ray_confidential.keyservice import DevKeyService
from scheduler.registry import RegistryVerifier, SignedStatement, StatementRejected, StatementSigner

log = logging.getLogger("ray_confidential.kbs")


def _record(raw: Mapping[str, Any]) -> DomainRecord:
    """A DevKeyService domain file as the broker's :class:`DomainRecord` (owner: the dev owner)."""
    return DomainRecord(
        name=str(raw["name"]),
        owner=DEV_OWNER,
        policy=DomainPolicy.from_dict(raw["policy"]),
        appraisal=None,
        versions=tuple(
            KeyVersion(version=int(v["version"]), suite=str(v["suite"]),
                       private_key=bytes.fromhex(v["private_key"]), retired=bool(v["retired"]))
            for v in raw["versions"]
        ),
        created=0,
    )  # fmt: skip


class DevKeyRegistry(DomainRegistry):
    """The broker's domain registry over a :class:`DevKeyService` state directory (same keys).

    Reads are re-checked against the domain file on every :meth:`get` (one ``stat``; the file is
    parsed again only when it changed). Owner operations (development broker: any caller is
    ``CN=dev-owner``) go to the DevKeyService, so the driver and the broker never disagree.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        super().__init__(MemoryStore())
        self.service = DevKeyService(state_dir)
        self._raw: dict[str, Mapping[str, Any]] = {}
        self._sync_lock = threading.Lock()

    def get(self, name: str) -> DomainRecord | None:
        try:
            raw = self.service._load(name)  # cached by the file's (mtime, size, inode)
        except (OSError, ValueError):
            return None
        if raw is None:
            return None
        with self._sync_lock:
            if self._raw.get(name) is raw and name in self._records:
                return self._records[name]
            rec = _record(raw)
            old = self._records.get(name)
            if old is not None:  # a retired version must never open again from the handle cache
                for v in rec.versions:
                    if v.retired:
                        self._keys.pop((name, v.version), None)
            self._records[name], self._raw[name] = rec, raw
            return rec

    def names(self) -> list[str]:
        return self.service.domains()

    @staticmethod
    def _owner(owner: str) -> None:
        if owner != DEV_OWNER:
            raise DomainError("PERMISSION_DENIED", f"{owner!r} does not own the development domains")

    def create(self, *, owner: str, name: str, policy: DomainPolicy, appraisal: Mapping[str, Any] | None,
               suite: str, now: int) -> DomainRecord:  # fmt: skip
        self._owner(owner)
        if appraisal is not None:
            raise DomainError("INVALID_ARGUMENT", "the development broker takes no appraisal policy")
        if suite not in hpke.SUITES:
            raise DomainError("INVALID_ARGUMENT", f"unknown HPKE suite {suite!r}")
        try:
            self.service.create_domain(name, policy, suite=suite)
        except ValueError as exc:
            raise DomainError(
                "ALREADY_EXISTS" if "exists" in str(exc) else "INVALID_ARGUMENT", str(exc)
            ) from None
        return self._require(name)

    def update_policy(self, *, owner: str, name: str, policy: DomainPolicy,
                      appraisal: Mapping[str, Any] | None) -> tuple[DomainRecord, DomainRecord]:  # fmt: skip
        self._owner(owner)
        old = self._require(name)
        self.service.update_policy(name, policy)
        return old, self._require(name)

    def rotate(self, *, owner: str, name: str, suite: str | None) -> DomainRecord:
        self._owner(owner)
        self._require(name)
        self.service.rotate(name, suite=suite)
        return self._require(name)

    def retire(self, *, owner: str, name: str, version: int) -> DomainRecord:
        self._owner(owner)
        self._require(name)
        try:
            self.service.retire(name, version)
        except ValueError as exc:
            raise DomainError("NOT_FOUND", str(exc)) from None
        return self._require(name)

    def _require(self, name: str) -> DomainRecord:
        rec = self.get(name)
        if rec is None:
            raise DomainError("NOT_FOUND", f"unknown domain {name!r}")
        return rec


class RegistryRelay:
    """Delivers signed statements to the registry actor from a background thread.

    Until :meth:`attach` (and after :meth:`detach`) statements are only kept, the newest per node;
    :meth:`attach` submits the kept ones that are still fresh. A refused submission is logged (the
    actor refuses replays, e.g. a kept statement it already applied).
    """

    def __init__(self, *, max_age: float = 290.0) -> None:
        self._kept: dict[str, SignedStatement] = {}
        self._handle: Any = None
        self._queue: queue.Queue[tuple[Any, SignedStatement] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._max_age = max_age
        self._thread = threading.Thread(target=self._run, name="rc-registry-relay", daemon=True)
        self._thread.start()

    def deliver(self, statement: SignedStatement) -> None:
        body = json.loads(statement.payload)
        with self._lock:
            self._kept[str(body["node_id"])] = statement
            if self._handle is not None:
                self._queue.put((self._handle, statement))

    def attach(self, handle: Any) -> None:
        now = time.time()
        with self._lock:
            self._handle = handle
            for st in sorted(self._kept.values(), key=lambda s: json.loads(s.payload)["seq"]):
                if json.loads(st.payload)["iat"] >= now - self._max_age:
                    self._queue.put((handle, st))

    def detach(self) -> None:
        with self._lock:
            self._handle = None

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued statement was submitted (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.detach()
        self._queue.put(None)

    def _run(self) -> None:
        from scheduler.registry_actor import submit

        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                handle, st = item
                with self._lock:
                    current = self._handle is handle
                if current:
                    submit(handle, st)
            except StatementRejected:
                log.info("registry refused a kept statement (already applied or stale)")
            except Exception as exc:  # Ray gone, actor restarting: routing only, renewals follow
                log.warning("could not submit a registry statement: %s", exc)
            finally:
                self._queue.task_done()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class EmbeddedBroker:
    """A running development broker over a DevKeyService state directory. Build with :meth:`start`."""

    def __init__(self, *, config: BrokerConfig, broker: Broker, server: KBSServer, port: int,
                 folder: Path, cluster_id: str, registry: DevKeyRegistry, relay: RegistryRelay) -> None:  # fmt: skip
        self.config, self.broker, self.server, self.port = config, broker, server, port
        self.folder, self.cluster_id, self.registry = folder, cluster_id, registry
        self.launch_path = folder / "launch-data.json"
        self.audit_path = config.audit_path
        self._paused = False
        assert config.statement_key is not None and server.feed is not None
        self.statement_verifier: RegistryVerifier = StatementSigner(
            config.statement_key, registry_id=cluster_id
        ).verifier()
        """The pinned statement key (``rc.init`` puts it in the driver's session)."""
        self.relay = relay
        """Submits the broker's statements to the registry actor once attached (the feed serves them too)."""
        self.feed = server.feed
        """The same statements for a registry that follows this broker (``GetStatements``)."""

    @classmethod
    def start(
        cls, state_dir: str | os.PathLike[str] | None = None, *, cluster_id: str | None = None,
        token_ttl: int | None = None,
    ) -> EmbeddedBroker:  # fmt: skip
        """Start a broker on 127.0.0.1 (ephemeral port) serving the domains of ``state_dir``.

        Args:
            state_dir: the DevKeyService state directory (default: ``default_state_dir()``).
            cluster_id: the only cluster id admitted (default: ``dev-<random>``).
            token_ttl: token lifetime in seconds (default 300; tests of expiry use a few seconds).
        """
        folder = Path(tempfile.mkdtemp(prefix="rc-kbs-dev-"))  # mode 0700
        cluster_id = cluster_id or f"dev-{secrets.token_hex(6)}"
        config = BrokerConfig.development(audit_path=folder / "audit.log", rate_limit=None)
        settings = dataclasses.replace(
            config.settings,
            cluster_ids=frozenset({cluster_id}),
            token_ttl=int(token_ttl or config.settings.token_ttl),
        )
        config = dataclasses.replace(
            config, settings=settings, statement_key=ec.generate_private_key(ec.SECP256R1())
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the development banner: rc.init already warns loudly
            relay = RegistryRelay()
            server, broker = build(config, also_deliver=relay.deliver)
        registry = DevKeyRegistry(state_dir if state_dir is not None else DevKeyService().state_dir)
        broker.domains = registry
        try:
            port = server.start()
        except BaseException:
            relay.close()
            broker.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self = cls(config=config, broker=broker, server=server, port=port, folder=folder,
                   cluster_id=cluster_id, registry=registry, relay=relay)  # fmt: skip
        _write_private(self.launch_path, json.dumps(self.launch_data()).encode())
        log.warning("ray_confidential: DEVELOPMENT key broker on %s (simulated TEE roots, env=dev tokens, "
                    "domains of %s)", self.target, registry.service.state_dir)  # fmt: skip
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def state_dir(self) -> Path:
        return self.registry.service.state_dir

    def launch_data(self) -> dict[str, Any]:
        """The executor launch data (module docstring); holds simulated root keys: development only."""
        return {**launch_data(self.config, self.port), "cluster_id": self.cluster_id,
                "statement_public_key": self.statement_verifier.public_pem().decode()}  # fmt: skip

    def attach_registry(self) -> Any:
        """Create (or adopt) the cluster's registry actor and submit statements to it from now on.

        Call from a process connected to Ray (``rc.init``). Development only: an existing actor
        pinned to another key (a previous development broker, or a squatter) is killed and replaced;
        drivers still verify every statement against their own pin.
        """
        import ray

        from scheduler.registry_actor import REGISTRY_ACTOR_NAME, REGISTRY_NAMESPACE, get_or_create_registry

        for _ in range(50):
            try:
                handle = get_or_create_registry(self.statement_verifier)
                break
            except StatementRejected:
                log.warning("development broker: replacing a registry actor pinned to another key")
                try:
                    ray.kill(
                        ray.get_actor(REGISTRY_ACTOR_NAME, namespace=REGISTRY_NAMESPACE), no_restart=True
                    )
                except ValueError:
                    pass
                time.sleep(0.1)
            except ValueError:  # the name is still held by the dying actor
                time.sleep(0.1)
        else:
            raise RuntimeError("could not create the trust registry actor")
        self.relay.attach(handle)
        return handle

    def detach_registry(self) -> None:
        """Stop submitting (before the driver disconnects from Ray); statements are kept."""
        self.relay.detach()

    def revoke(self, kind: str, value: str, reason: str = "") -> int:
        """Revoke (``node``, ``measurement``, ``tcb``, ``token``, ``bundle``) for every domain; the epoch."""
        return self.broker.revoke(DEV_OWNER, kind, value, reason)

    def audit_records(self) -> list[dict[str, Any]]:
        """Every record of the broker's audit log, oldest first (the file, as written)."""
        try:
            lines = self.audit_path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def pause(self) -> None:
        """TESTS: stop serving (the broker becomes unreachable) without forgetting anything."""
        if not self._paused:
            self.server.stop(grace=0)
            self._paused = True

    def resume(self) -> None:
        """TESTS: serve again on the same port."""
        if self._paused:
            self.server = KBSServer(self.broker, address=self.target, tls=None, dev_owner=DEV_OWNER)
            self.server.start()
            self._paused = False

    def stop(self) -> None:
        if not self._paused:
            self.server.stop(grace=0)
            self._paused = True
        self.relay.close()
        self.broker.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __reduce__(self) -> Any:
        raise TypeError("EmbeddedBroker holds keys and cannot be pickled or sent through Ray")

    def __repr__(self) -> str:
        return f"EmbeddedBroker(target={self.target!r}, cluster_id={self.cluster_id!r}, dev=True)"


_shared: EmbeddedBroker | None = None
_users = 0
_shared_lock = threading.Lock()


def shared(state_dir: str | os.PathLike[str] | None = None) -> EmbeddedBroker:
    """The process-wide development broker, started on first use; each call takes a reference that
    :func:`release` gives back. A later caller naming another state directory moves it there."""
    global _shared, _users
    with _shared_lock:
        if _shared is None:
            _shared = EmbeddedBroker.start(state_dir)
        elif state_dir is not None and Path(state_dir) != _shared.state_dir:
            log.warning("embedded broker: serving the domains of %s from now on", state_dir)
            _shared.registry.service = DevKeyService(state_dir)
            _shared.registry._raw.clear()
            _shared.registry._records.clear()
        _users += 1
        return _shared


def current() -> EmbeddedBroker | None:
    """The process-wide broker if one runs."""
    return _shared


def release() -> None:
    """Give back a reference taken by :func:`shared`; the last one stops the broker."""
    global _shared, _users
    with _shared_lock:
        _users = max(0, _users - 1)
        if _users == 0 and _shared is not None:
            broker, _shared = _shared, None
            broker.stop()


__all__ = ["DevKeyRegistry", "EmbeddedBroker", "RegistryRelay", "current", "release", "shared"]
