"""Where the executor gets tokens, data keys and domain descriptors: the key broker, over gRPC.

Every use of the key broker goes through :class:`KeyReleaser` (design.md section 5):

- ``grant(bundle_digest, domains, executor_key, now)``: challenge, evidence from the attestation
  device bound to (nonce, executor key and its suite, cluster id, bundle digest), and a release token
  naming ``domains``. The broker checks each domain's release policy (bundle, TEE kind, pool, region)
  and appraises the evidence before it issues one. One token per (bundle digest, domains).
- ``unwrap(grant, header)``: the DEK of one sealed object, in a response signed by the pinned release
  key and sealed to the executor key (``KBSClient.unwrap`` checks both).
- Optional, looked up with ``getattr`` by the executor: ``grant_with_keys`` (a token and the DEKs of
  up to 16 objects in one Attest) and ``unwrap_many(grant, headers)`` (the DEKs of many objects in
  one call, all or nothing), each checked per object as ``unwrap``.
- ``domain(name)``: the domain's descriptor, signed by the pinned release key.
- ``revocation_epoch()``: polled at least every 10 s.

The implementation is :class:`KBSKeyReleaser` over :class:`~ray_confidential.kbs.client.KBSClient`;
its broker address, release key and CA come from the node image or a launch-data file
(:class:`LaunchData`), never from Ray. There is no in-executor development broker: development runs
the real broker embedded in the driver (``ray_confidential.kbs.embedded``).

What this module does NOT do: cache data keys (the executor caches grants and DEKs), or talk to the
device itself (the caller passes an ``evidence`` function).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ray_confidential.attestation.binding import Binding
from ray_confidential.attestation.evidence import Evidence
from ray_confidential.crypto import hpke
from ray_confidential.domains import ANY, DomainDescriptor, DomainPolicy
from ray_confidential.errors import AttestationError, KeyReleaseDenied

logger = logging.getLogger(__name__)

PROFILES = {"sev-snp": "snp-direct", "tdx": "tdx-direct", "sgx": "sgx-gramine", "nitro": "nitro"}
"""Evidence profile per simulated TEE kind."""
UNSET = "(none)"
"""Pool / region sent to the broker for a node without one (the broker requires 1..128 characters;
no policy lists this value, so a policy that names pools or regions never admits such a node)."""


ROUTING_BUNDLE = bytes(32)
"""Bundle digest bound into routing-scope evidence (a routing token names no code)."""


class BrokerUnavailable(ConnectionError):
    """The key broker could not be reached (the executor retries, then fails closed)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeFacts:
    """What the executor attests about its node (bound into tokens by the broker)."""

    tee: str
    node_id: str
    cluster_id: str
    pool: str = ""
    region: str = ""

    @property
    def profile(self) -> str:
        return PROFILES[self.tee]


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """A release token for one bundle digest and set of domains (``token``: the broker's token)."""

    token_id: str
    bundle_digest: bytes
    expires_at: float
    domains: tuple[str, ...] = ()
    token: Any = None

    def __repr__(self) -> str:
        return f"Grant(token_id={self.token_id!r}, bundle={self.bundle_digest.hex()[:16]}…, expires_at={self.expires_at})"


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainInfo:
    """A domain's signed descriptor and, where the releaser can see it, its policy.

    ``policy`` None means the broker alone enforces the policy (it refuses a token to a bundle the
    policy does not approve); the executor then refuses every non-domain recipient.
    """

    descriptor: DomainDescriptor
    policy: DomainPolicy | None


class KeyReleaser(Protocol):
    """The executor's only view of the key broker (module docstring)."""

    def grant(
        self,
        *,
        bundle_digest: bytes,
        domains: tuple[str, ...],
        executor_key: hpke.PrivateKeyHandle,
        now: float,
    ) -> Grant: ...

    def unwrap(
        self, grant: Grant, header: Any, executor_key: hpke.PrivateKeyHandle, *, now: float
    ) -> bytes: ...

    def domain(self, name: str) -> DomainInfo: ...

    def revocation_epoch(self) -> int: ...


def _grant_of(token: Any, bundle_digest: bytes, domains: tuple[str, ...]) -> Grant:
    """The executor's record of a release token the broker issued (``KBSClient`` token)."""
    return Grant(token_id=token.jti, bundle_digest=bundle_digest, expires_at=float(token.expires_at),
                 domains=domains, token=token)  # fmt: skip


def bundle_approved(policy: DomainPolicy | None, bundle_digest: bytes) -> bool:
    """True when ``policy.bundles`` lists the digest (hex) or ``"*"`` (development only); True for
    ``None`` (policy not visible here: the broker checks it before releasing any key)."""
    return policy is None or ANY in policy.bundles or bundle_digest.hex() in policy.bundles


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchData:
    """How an executor reaches its broker: from the image, or a 0600 file the node starter wrote.

    Attributes:
        target: ``HOST:PORT`` of the broker.
        release_public_key: PEM of the broker's release key (pinned).
        ca_cert: PEM CA of the broker's TLS certificate; None only for a loopback development broker.
        cluster_id: this cluster's identity, bound into evidence.
        owner_ca: PEM of the domain owners' CA: when set, the executor uses a domain only if its
            descriptor carries its owner's signature under that CA (docs/kbs.md "Owner signatures").
        dev_roots: ``DevRootOfTrust.to_launch_data()`` bytes (simulation only: enables the simulated
            attestation device), or None on hardware.
    """

    target: str
    release_public_key: bytes = field(repr=False)
    ca_cert: bytes | None = field(default=None, repr=False)
    cluster_id: str = "dev"
    dev_roots: bytes | None = field(default=None, repr=False)
    owner_ca: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LaunchData:
        """Read launch data JSON (``ray_confidential.kbs.embedded``): refuses a file others can read.

        Raises:
            ValueError: the file is readable by group or others, or malformed.
        """
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise ValueError(f"launch data {path} must be mode 0600 (it pins the broker and holds keys)")
        try:
            data = json.loads(Path(path).read_text())
            return cls(
                target=str(data["target"]),
                release_public_key=str(data["release_public_key"]).encode(),
                ca_cert=str(data["ca_cert"]).encode() if data.get("ca_cert") else None,
                cluster_id=str(data.get("cluster_id", "dev")),
                dev_roots=bytes.fromhex(data["dev_roots"]) if data.get("dev_roots") else None,
                owner_ca=str(data["owner_ca"]).encode() if data.get("owner_ca") else None,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"launch data {path} is malformed: {exc}") from None

    def connect(self, *, timeout: float = 5.0) -> Any:
        """A new ``KBSClient`` pinned to this broker (no retries: the executor bounds the wait)."""
        from ray_confidential.kbs.client import KBSClient

        return KBSClient(self.target, release_public_key=self.release_public_key, ca_cert=self.ca_cert,
                         timeout=timeout, retries=0)  # fmt: skip


class KBSKeyReleaser:
    """The key broker over gRPC (``ray_confidential.kbs.client.KBSClient``).

    The broker enforces the domain policy, so :meth:`domain` returns the signed descriptor with
    ``policy=None``. Descriptors are cached for ``descriptor_ttl`` seconds (and dropped when the
    revocation epoch changes), so a warm call costs no broker round trip. After the broker was
    unreachable the client is rebuilt (a fresh channel, without gRPC's reconnect backoff).

    Args:
        connect: returns a new ``KBSClient`` pinned to the broker.
        facts: this node's identity.
        evidence: returns evidence for a binding (the attestation device).
        clock: for the descriptor cache.
        owner_ca: pin the domain owners' CA: a domain whose descriptor lacks a valid owner signature
            under it is refused (``LaunchData.owner_ca``).
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        facts: NodeFacts,
        evidence: Callable[[Binding], Evidence],
        descriptor_ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        owner_ca: bytes | None = None,
    ) -> None:
        self._owner_ca = owner_ca
        self._connect = connect
        self._client = connect()
        self._facts = facts
        self._evidence = evidence
        self._ttl = descriptor_ttl
        self._clock = clock
        self._descriptors: dict[str, tuple[DomainDescriptor, float]] = {}
        self._lock = threading.Lock()
        self._epoch: int | None = None

    def _unavailable(self, exc: Exception) -> BrokerUnavailable:
        with self._lock:
            old, self._client = self._client, self._connect()
        old.close()
        return BrokerUnavailable(str(exc))

    def _run(self, fn: Callable[[Any], Any]) -> Any:
        from ray_confidential.kbs.client import BrokerUnavailableError

        try:
            return fn(self._client)
        except BrokerUnavailableError as exc:
            raise self._unavailable(exc) from None

    def _attest(
        self,
        executor_key: hpke.PrivateKeyHandle,
        bundle_digest: bytes,
        *,
        scope: str,
        domains: tuple[str, ...] | None = None,
        headers: tuple[bytes, ...] | None = None,
    ) -> Any:
        """Challenge, evidence bound to this executor key, cluster and bundle, then a token of ``scope``
        (with ``headers``: the token and the DEKs of those sealed headers, in the same Attest call)."""
        facts = self._facts

        def attest(client: Any) -> Any:
            challenge = client.challenge()
            binding = challenge.binding(
                executor_key, cluster_id=facts.cluster_id, bundle_digest=bundle_digest
            )
            try:
                evidence = self._evidence(binding)
            except AttestationError as exc:
                raise KeyReleaseDenied(f"attestation failed: {exc}") from None
            common = {"profile": facts.profile, "executor_key": executor_key, "cluster_id": facts.cluster_id,
                      "bundle_digest": bundle_digest, "node_id": facts.node_id, "pool": facts.pool or UNSET,
                      "region": facts.region or UNSET}  # fmt: skip
            if headers is not None:
                return client.attest_and_unwrap(challenge, evidence, headers, domains=domains or (), **common)
            extra = {} if domains is None else {"domains": domains}
            return client.attest(challenge, evidence, scope=scope, **common, **extra)

        return self._run(attest)

    def grant(
        self,
        *,
        bundle_digest: bytes,
        domains: tuple[str, ...],
        executor_key: hpke.PrivateKeyHandle,
        now: float,
    ) -> Grant:
        from ray_confidential.kbs.client import BrokerRefusedError

        try:
            token = self._attest(executor_key, bundle_digest, scope="release", domains=domains)
        except BrokerRefusedError as exc:
            raise KeyReleaseDenied(
                f"the key broker refused a token for this call ({exc.code}): attestation failed, or a domain "
                f"policy of {list(domains)} does not admit this code bundle, TEE, pool or region, or this "
                "node is revoked; the broker's audit log has the reason"
            ) from None
        return _grant_of(token, bundle_digest, domains)

    def grant_with_keys(
        self,
        *,
        bundle_digest: bytes,
        domains: tuple[str, ...],
        headers: tuple[Any, ...],
        executor_key: hpke.PrivateKeyHandle,
        now: float,
    ) -> tuple[Grant, list[bytes]]:
        """:meth:`grant` and the DEKs of up to 16 sealed ``headers`` in one broker call (the broker
        runs and audits every unwrap check per object; ``KBSClient.attest_and_unwrap``).

        Raises:
            KeyReleaseDenied: the broker refused the token or any of the keys (the executor then asks
                again step by step, so that the refusal it reports names the step).
        """
        from ray_confidential.kbs.client import BrokerRefusedError

        raw = tuple(h.header_bytes for h in headers)
        try:
            token, deks = self._attest(
                executor_key, bundle_digest, scope="release", domains=domains, headers=raw
            )
        except BrokerRefusedError as exc:
            raise KeyReleaseDenied(f"the key broker refused a token with keys ({exc.code})") from None
        return _grant_of(token, bundle_digest, domains), [bytes(d) for d in deks]

    def routing(self, *, executor_key: hpke.PrivateKeyHandle, now: float) -> float:
        """Attest for a routing-scope token (trust registry admission, docs/placement.md); its expiry.

        Raises:
            KeyReleaseDenied: the broker refused (this node cannot attest, or is revoked).
        """
        from ray_confidential.kbs.client import BrokerRefusedError

        try:
            token = self._attest(executor_key, ROUTING_BUNDLE, scope="routing")
        except BrokerRefusedError as exc:
            raise KeyReleaseDenied(f"the key broker refused a routing token ({exc.code})") from None
        return float(token.expires_at)

    def unwrap(self, grant: Grant, header: Any, executor_key: hpke.PrivateKeyHandle, *, now: float) -> bytes:
        from ray_confidential.kbs.client import BrokerRefusedError

        try:
            return bytes(self._run(lambda c: c.unwrap(grant.token, header.header_bytes, executor_key)))
        except BrokerRefusedError as exc:
            raise KeyReleaseDenied(
                f"the key broker refused the data key of object {header.object_id.hex()} ({exc.code}); "
                "its audit log has the reason"
            ) from None

    def unwrap_many(
        self, grant: Grant, headers: tuple[Any, ...], executor_key: hpke.PrivateKeyHandle, *, now: float
    ) -> list[bytes]:
        """The DEKs of sealed ``headers``, in order, in one broker call per 64 objects (``UnwrapMany``:
        the broker runs and audits every unwrap check per object, all or nothing;
        ``KBSClient.unwrap_many`` verifies each response as :meth:`unwrap` does).

        Raises:
            KeyReleaseDenied: the broker refused (the executor then asks object by object, so that
                the refusal it reports names the object).
        """
        from ray_confidential.kbs.client import BrokerRefusedError

        raw = [h.header_bytes for h in headers]
        try:
            deks = self._run(lambda c: c.unwrap_many(grant.token, raw, executor_key))
        except BrokerRefusedError as exc:
            ids = ", ".join(h.object_id.hex() for h in headers)
            raise KeyReleaseDenied(
                f"the key broker refused the data keys of objects {ids} ({exc.code}); its audit log has the "
                "reason"
            ) from None
        return [bytes(d) for d in deks]

    def domain(self, name: str) -> DomainInfo:
        from ray_confidential.kbs.client import BrokerRefusedError

        now = self._clock()
        with self._lock:
            cached = self._descriptors.get(name)
        if cached is not None and cached[1] > now:
            return DomainInfo(descriptor=cached[0], policy=None)
        try:
            desc: DomainDescriptor = self._run(lambda c: c.descriptor(name, owner_ca=self._owner_ca))
        except BrokerRefusedError as exc:
            raise KeyReleaseDenied(f"unknown domain {name!r} at the key broker ({exc.code})") from None
        with self._lock:
            self._descriptors[name] = (desc, now + self._ttl)
        return DomainInfo(descriptor=desc, policy=None)

    def revocation_epoch(self) -> int:
        epoch = int(self._run(lambda c: c.revocation_epoch()))
        if epoch != self._epoch:
            with self._lock:
                self._descriptors.clear()
            self._epoch = epoch
        return epoch

    def close(self) -> None:
        self._client.close()


__all__ = [
    "UNSET",
    "BrokerUnavailable",
    "DomainInfo",
    "Grant",
    "KBSKeyReleaser",
    "KeyReleaser",
    "LaunchData",
    "NodeFacts",
    "bundle_approved",
]
