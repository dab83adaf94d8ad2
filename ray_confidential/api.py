"""The Ray-facing API: ``init``, ``shutdown``, ``create_domain``, ``put``, ``get``, ``export``.

    >>> import ray_confidential as rc                    # doctest: +SKIP
    >>> rc.init()                                        # doctest: +SKIP
    >>> rc.create_domain("hospital")                     # doctest: +SKIP
    >>> ref = rc.put(table, domain="hospital")           # doctest: +SKIP
    >>> rc.get(ref).equals(table)                        # doctest: +SKIP
    True

Ray only ever sees ciphertext: a sealed value is stored as its sealed bytes (``bytes`` up to
``SMALL_SEALED_BYTES``, else a ``pickle.PickleBuffer`` over them), so the object store, spill files
and transfers hold ciphertext (docs/sealed-format.md).
How ``init`` chooses between the embedded development services and a configured broker is the
table in the README ("rc.init").
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

import ray

from ray_confidential import _ray_compat, metrics
from ray_confidential.domains import DomainDescriptor, DomainPolicy
from ray_confidential.errors import KeyReleaseDenied
from ray_confidential.keyservice import DevKeyService, KeyService, PublicDirectory
from ray_confidential.sealed import open_sealed
from ray_confidential.sealed.format import VERSION, DomainPublicKey, seal_with_id

logger = logging.getLogger(__name__)
PLACEMENT_WAIT_ENV = "RAY_CONFIDENTIAL_PLACEMENT_WAIT_S"
"""Default for ``rc.init(placement_wait_s=...)`` (seconds; 60 when unset)."""
DEFAULT_PLACEMENT_WAIT_S = 60.0
DOMAINS_ENV = "RAY_CONFIDENTIAL_DOMAINS"
"""Path of a published-descriptors JSON file (``ray-confidential domain export``) for drivers that
hold no key service: they can seal to those domains but never open."""


SMALL_SEALED_BYTES = 64 << 10
"""Sealed objects up to this size are stored in Ray as plain ``bytes``, which Ray serializes without
pickle (about 0.1 ms less per object stored and again per read); larger ones as ``_SealedPayload``,
without a copy."""


_SEALED_VERSION = bytes([VERSION])


class _SealedPayload:
    """What Ray stores for a large sealed object: its bytes, serialized out-of-band as one
    ``PickleBuffer``."""

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, tuple[pickle.PickleBuffer]]:
        return (_SealedPayload, (pickle.PickleBuffer(self.data),))


class SealedRef:
    """A reference to a sealed object in Ray's object store, with its public metadata.

    Safe to pass to tasks and actors: it carries only the ObjectRef, domain name, key version,
    object id and size. Open it with :func:`get` where the right to open exists.
    """

    __slots__ = ("domain", "key_version", "object_id", "object_ref", "size")

    def __init__(
        self, object_ref: ray.ObjectRef[Any], *, domain: str, key_version: int, object_id: str, size: int
    ):
        self.object_ref = object_ref
        self.domain = domain
        self.key_version = key_version
        self.object_id = object_id
        self.size = size

    def __reduce__(self) -> Any:
        return (_sealed_ref, (self.object_ref, self.domain, self.key_version, self.object_id, self.size))

    def __repr__(self) -> str:
        return f"SealedRef(domain={self.domain!r}, version={self.key_version}, object_id={self.object_id[:16]}…, size={self.size})"


def storable(sealed: Any) -> Any:
    """What to hand Ray for the sealed bytes ``sealed`` (see ``SMALL_SEALED_BYTES``)."""
    if len(sealed) <= SMALL_SEALED_BYTES:
        return bytes(sealed)
    return _SealedPayload(sealed)


def sealed_data(value: Any) -> Any:
    """The sealed bytes in what Ray returned for a stored sealed object (``storable``); anything
    else is returned unchanged (the executor refuses what is not a sealed object)."""
    return value.data if isinstance(value, _SealedPayload) else value


def _sealed_ref(
    object_ref: ray.ObjectRef[Any], domain: str, key_version: int, object_id: str, size: int
) -> SealedRef:
    return SealedRef(object_ref, domain=domain, key_version=key_version, object_id=object_id, size=size)


@dataclass
class _Session:
    key_service: KeyService
    owner: bool
    mode: str
    started_ray: bool
    services: Any = None
    """Development broker and executors (``enclave_actors.embedded.DevServices``) for rows 1-3."""
    placement_wait_s: float = 60.0
    """How long a confidential call waits for a qualifying attested node (``NoAttestedNodeError``)."""
    registry_verifier: Any = None
    """The pinned trust-registry statement key (``scheduler.registry.RegistryVerifier``), or None."""
    registry: Any = None
    """The registry actor handle this init attached (development broker), or None."""
    placer: Any = None
    """``scheduler.placement.Placer`` built on first use (``scheduler.calls``)."""


_session: _Session | None = None
_lock = threading.Lock()


class _Staging:
    """A reused staging buffer for sealing (sealing writes here, ``ray.put`` copies it to plasma)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.lock = threading.Lock()

    def allocate(self, size: int) -> memoryview:
        if len(self._buf) < size:
            self._buf = bytearray(max(size, len(self._buf) * 5 // 4))
        return memoryview(self._buf)[:size]


_staging = _Staging()


def _session_or_die() -> _Session:
    if _session is None:
        raise RuntimeError("ray_confidential is not initialised: call rc.init() first")
    return _session


def init(*, dev: bool | None = None, placement_wait_s: float | None = None, **ray_init_kwargs: Any) -> None:
    """Connect to (or start) Ray and choose the key service, exactly as the README's table says.

    Args:
        dev: True starts the development key service in this process even when connecting to an
            existing cluster; None (default) starts it only for a new local cluster.
        placement_wait_s: how long a confidential call waits for a qualifying attested node before
            ``NoAttestedNodeError`` (default ``$RAY_CONFIDENTIAL_PLACEMENT_WAIT_S``, else 60 s).
        **ray_init_kwargs: passed to ``ray.init`` unchanged.

    Raises:
        ValueError: connecting without ``dev=True`` and no published domain descriptors configured.
    """
    global _session
    with _lock:
        if _session is not None:
            raise RuntimeError("ray_confidential is already initialised; call rc.shutdown() first")
        wait_s = _placement_wait(placement_wait_s)
        address = ray_init_kwargs.get("address")
        implicit = _ray_compat.running_cluster_address() if address in (None, "auto") else None
        connecting = address not in (None, "local") or implicit is not None
        if connecting and not dev:
            service: KeyService = _configured_key_service()
            owner, mode = False, "connect"
        elif dev is False:
            raise ValueError(
                "dev=False with a new local cluster leaves no key service; omit dev or pass dev=True"
            )
        else:
            service, owner = DevKeyService(), True
            mode = (
                "local"
                if not connecting
                else ("dev-implicit" if address in (None, "auto") else "dev-explicit")
            )
            logger.warning(
                "ray_confidential: DEVELOPMENT key service in this process (state in %s); "
                "no attestation, this driver owns its domains",
                DevKeyService().state_dir,
            )
        started = False
        if not ray.is_initialized():
            if mode == "local":  # row 1: the new local node is a (simulated) TEE node
                from enclave_actors.embedded import node_labels

                ray_init_kwargs["labels"] = node_labels(ray_init_kwargs)
            ray.init(**ray_init_kwargs)
            started = True
        services = None
        if isinstance(service, DevKeyService):  # rows 1-3: a real gRPC dev broker over these domains
            from enclave_actors.embedded import start_dev_services

            try:
                services = start_dev_services(mode, service.state_dir, labelled=started)
                registry = services.broker.attach_registry()  # the broker submits its statements
            except BaseException:
                if services is not None:
                    services.stop()
                if started:
                    ray.shutdown()
                raise
        _session = _Session(
            key_service=service,
            owner=owner,
            mode=mode,
            started_ray=started,
            services=services,
            placement_wait_s=wait_s,
        )
        if services is not None:
            _session.registry_verifier, _session.registry = services.broker.statement_verifier, registry


def _placement_wait(value: float | None) -> float:
    if value is None:
        raw = os.environ.get(PLACEMENT_WAIT_ENV)
        try:
            value = float(raw) if raw else DEFAULT_PLACEMENT_WAIT_S
        except ValueError:
            raise ValueError(f"{PLACEMENT_WAIT_ENV}={raw!r} is not a number of seconds") from None
    if not 0 <= value <= 3600:
        raise ValueError(f"placement_wait_s must be between 0 and 3600 seconds, got {value}")
    return float(value)


def _configured_key_service() -> KeyService:
    """Row 4: the broker in ``$RAY_CONFIDENTIAL_KBS``, else published descriptors, else an error."""
    from ray_confidential.kbs.directory import KBS_ENV

    if os.environ.get(KBS_ENV):
        from ray_confidential.kbs.directory import BrokerDirectory

        return BrokerDirectory.from_file(os.environ[KBS_ENV])
    if os.environ.get(DOMAINS_ENV):
        return PublicDirectory.from_file(os.environ[DOMAINS_ENV])
    raise ValueError(
        "connecting to an existing Ray cluster without development services: no key broker is "
        f"configured. Set {KBS_ENV}=kbs-client.yaml (the broker's address, CA and release key; see "
        f"docs/kbs.md) or {DOMAINS_ENV}=descriptors.json (published domain descriptors), or pass "
        "dev=True to start clearly labelled development services in this process"
    )


def shutdown() -> None:
    """Forget keys held by this process and disconnect from Ray (if ``init`` connected)."""
    global _session
    with _lock:
        session, _session = _session, None
    if session is not None and ray.is_initialized():
        try:
            metrics.flush(timeout=10.0)  # hand this driver's figures to the long-lived sink
        except Exception as exc:  # metrics never block shutdown
            logger.warning("ray_confidential: could not flush metrics: %s", exc)
    if session is not None and session.services is not None:
        session.services.broker.detach_registry()
        session.services.stop()  # executors this init started, and its broker reference
    if session is not None and session.started_ray and ray.is_initialized():
        ray.shutdown()


def create_domain(name: str, *, policy: DomainPolicy | None = None) -> DomainDescriptor:
    """Create a domain (development key service only).

    ``policy=None`` means the development policy (any bundle, any measurement under the simulated
    root, any TEE kind, pool or region, no pickle), with a loud warning. Creating it again with the
    same policy is a no-op; with a different policy, a ValueError.
    """
    service = _session_or_die().key_service
    if not isinstance(service, DevKeyService):
        raise KeyReleaseDenied(
            "domains are created by their owner at the key broker, not from a cluster driver; "
            "use rc.init(dev=True) for local development"
        )
    if policy is None:
        policy = DomainPolicy.development()
    return service.create_domain(name, policy)


def put(value: Any, *, domain: str) -> SealedRef:
    """Seal ``value`` to ``domain``'s current public key and store the ciphertext with ``ray.put``."""
    session = _session_or_die()
    if not isinstance(domain, str):
        raise TypeError("domain must be the domain name, e.g. rc.put(table, domain='hospital')")
    return seal_and_put(value, session.key_service.descriptor(domain))


def seal_and_put(value: Any, descriptor: DomainDescriptor) -> SealedRef:
    """Seal ``value`` to a published descriptor and ``ray.put`` the ciphertext.

    Needs only public information, so it also works inside ordinary (untrusted) Ray workers.
    """
    key = DomainPublicKey(
        domain=descriptor.name, version=descriptor.version, public_key=descriptor.public_key
    )
    producer = ray.get_runtime_context().get_node_id()[:32]
    started = time.perf_counter()
    with _staging.lock:
        sealed, object_id = seal_with_id(
            value, key, producer_id=producer, allow_pickle=descriptor.allow_pickle, allocate=_staging.allocate
        )
        object_ref = ray.put(storable(sealed))
    metrics.observe("confidential_seal_seconds", time.perf_counter() - started)
    metrics.inc("confidential_sealed_bytes_total", len(sealed), direction="out")
    return SealedRef(
        object_ref,
        domain=descriptor.name,
        key_version=descriptor.version,
        object_id=object_id.hex(),
        size=len(sealed),
    )


def _object_ref(ref: Any) -> ray.ObjectRef[Any]:
    if isinstance(ref, SealedRef):
        ref = ref.object_ref
    if not isinstance(ref, ray.ObjectRef):
        raise TypeError(f"expected a SealedRef (or an ObjectRef holding one), got {type(ref).__name__}")
    return ref


def _payloads(refs: Sequence[Any], timeout: float | None) -> list[Any]:
    """The sealed bytes behind ``refs``: one ``ray.get`` for all of them (then one per nested ref)."""
    if len(refs) == 1:  # one ref: Ray's single-object get, as before lists were accepted
        values = [ray.get(_object_ref(refs[0]), timeout=timeout)]
    else:
        values = ray.get([_object_ref(r) for r in refs], timeout=timeout)
    out = []
    for value in values:
        if isinstance(value, SealedRef):
            value = _payloads([value], timeout)[0]
        elif isinstance(value, _SealedPayload):
            value = value.data
        elif not (isinstance(value, bytes) and value[:1] == _SEALED_VERSION):
            raise TypeError("this ObjectRef does not hold a sealed object")
        out.append(value)
    return out


def _open(session: _Session, payload: Any) -> Any:
    started = time.perf_counter()
    value = open_sealed(payload, session.key_service)
    metrics.observe("confidential_unseal_seconds", time.perf_counter() - started)
    metrics.inc("confidential_sealed_bytes_total", len(payload), direction="in")
    return value


@overload
def get(ref: SealedRef | ray.ObjectRef[Any], *, timeout: float | None = None) -> Any: ...
@overload
def get(ref: list[SealedRef | ray.ObjectRef[Any]], *, timeout: float | None = None) -> list[Any]: ...
def get(ref: Any, *, timeout: float | None = None) -> Any:
    """Fetch and open a sealed object (or a list of them, fetched with one ``ray.get`` as Ray's own
    ``ray.get(list)``) where this process holds the right to open it.

    Raises:
        KeyReleaseDenied: this driver holds no key for the domain (open the export off-cluster).
        DecryptionError: the object was tampered with or its key version is retired.
    """
    session = _session_or_die()
    if isinstance(ref, list):
        return [_open(session, payload) for payload in _payloads(ref, timeout)]
    return _open(session, _payloads([ref], timeout)[0])


def export(ref: SealedRef | ray.ObjectRef[Any], *, timeout: float | None = None) -> bytes:
    """The sealed bytes of ``ref``, for the owner to open off-cluster (``ray-confidential open``)."""
    return bytes(_payloads([ref], timeout)[0])
