"""Where the executor gets tokens, data keys and domain policies: one protocol, :class:`KeyReleaser`.

Every use of the key broker goes through this interface (design.md section 5):

- ``grant(bundle_digest, executor_key, now)``: challenge, evidence from the attestation device
  bound to (nonce, executor key, cluster, bundle digest), and a token. One token per bundle digest.
- ``unwrap(grant, header)``: the DEK of one sealed object, released only if the domain's policy
  approves the token's bundle, TEE and node.
- ``domain(name)``: the domain's public key and policy (to seal results and check approvals).
- ``revocation_epoch()``: polled at least every 10 s.

Implementations:

- :class:`UnsafeLocalKeyReleaser` (DEVELOPMENT ONLY): plays the broker inside the executor over a
  ``DevKeyService`` state directory and the simulated roots from launch data. It performs the same
  checks a broker does (evidence verified with ``attest``, policy approval of the bundle, token
  expiry), so the executor's tests exercise real denials, but it reads domain private keys from
  disk: never use it outside development.
- :class:`KBSKeyReleaser` (written, not yet tested against a running broker): over ``ray_confidential.kbs.client.KBSClient`` (the key broker issue).

What this module does NOT do: cache (the executor caches grants and DEKs), or talk to the device
itself (the caller passes an ``evidence`` function).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ray_confidential.attestation.binding import Binding
from ray_confidential.attestation.evidence import Evidence
from ray_confidential.crypto import hpke
from ray_confidential.domains import ANY, DomainDescriptor, DomainPolicy
from ray_confidential.errors import AttestationError, KeyReleaseDenied, PolicyViolation
from ray_confidential.sealed.format import SealedHeader

PROFILES = {"sev-snp": "snp-direct", "tdx": "tdx-direct", "sgx": "sgx-gramine", "nitro": "nitro"}
"""Evidence profile per simulated TEE kind."""

HPKE_SUITE_NAMES = {
    "x25519": "X25519-HKDF-SHA256-AES-256-GCM",
    "mlkem768-x25519": "MLKEM768-X25519-HKDF-SHA256-AES-256-GCM",
}


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
    """A release token for one bundle digest. ``token`` is the broker's opaque token object."""

    token_id: str
    bundle_digest: bytes
    expires_at: float
    token: Any = None

    def __repr__(self) -> str:
        return f"Grant(token_id={self.token_id!r}, bundle={self.bundle_digest.hex()[:16]}…, expires_at={self.expires_at})"


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainInfo:
    """A domain's signed descriptor and, where the releaser can see it, its policy.

    ``policy`` None means the broker alone enforces the policy (it refuses release to a token whose
    bundle the policy does not approve); the executor then refuses every non-domain recipient.
    """

    descriptor: DomainDescriptor
    policy: DomainPolicy | None


class KeyReleaser(Protocol):
    """The executor's only view of the key broker (module docstring)."""

    def grant(self, *, bundle_digest: bytes, executor_key: hpke.PrivateKeyHandle, now: float) -> Grant: ...

    def unwrap(
        self, grant: Grant, header: SealedHeader, executor_key: hpke.PrivateKeyHandle, *, now: float
    ) -> bytes: ...

    def domain(self, name: str) -> DomainInfo: ...

    def revocation_epoch(self) -> int: ...


def bundle_approved(policy: DomainPolicy | None, bundle_digest: bytes) -> bool:
    """True when ``policy.bundles`` lists the digest (hex) or ``"*"`` (development only); True for
    ``None`` (policy not visible here: the broker checks it before releasing any key)."""
    return policy is None or ANY in policy.bundles or bundle_digest.hex() in policy.bundles


class UnsafeLocalKeyReleaser:
    """DEVELOPMENT ONLY: the broker's checks, run inside the executor over a dev key state dir.

    Args:
        state_dir: the ``DevKeyService`` state directory of the owner (the driver).
        facts: this node's identity.
        evidence: returns evidence for a binding (the attestation device).
        trust: the trust configuration a development broker would use (simulated roots).
        token_lifetime: seconds a grant stays valid (<= 300, as broker tokens).
        audit_path: JSON lines of every grant and denial.
    """

    REVOCATION_FILE = "revocation_epoch"

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        facts: NodeFacts,
        evidence: Callable[[Binding], Evidence],
        trust: Any,
        token_lifetime: float = 300.0,
        audit_path: str | os.PathLike[str] | None = None,
    ) -> None:
        from ray_confidential.keyservice import DevKeyService

        if not 0 < token_lifetime <= 300:
            raise ValueError("token_lifetime must be in (0, 300] seconds")
        self._service = DevKeyService(state_dir)
        self._state_dir = Path(state_dir)
        self._facts = facts
        self._evidence = evidence
        self._trust = trust
        self._lifetime = token_lifetime
        self._audit_path = Path(audit_path) if audit_path else None
        self._audit_lock = threading.Lock()
        self._tokens: dict[str, tuple[bytes, float, str]] = {}

    def __reduce__(self) -> Any:
        raise TypeError("UnsafeLocalKeyReleaser reads domain keys and cannot be pickled")

    def audit(self, event: str, **fields: Any) -> None:
        if self._audit_path is None:
            return
        line = json.dumps(
            {"time": time.time(), "event": event, "node_id": self._facts.node_id, **fields}, sort_keys=True
        )
        with self._audit_lock, open(self._audit_path, "a") as f:
            f.write(line + "\n")

    def grant(self, *, bundle_digest: bytes, executor_key: hpke.PrivateKeyHandle, now: float) -> Grant:
        from ray_confidential.attestation import AppraisalPolicy, attest

        public = executor_key.public_key()
        binding = Binding(
            nonce=os.urandom(32),
            executor_public_key=public.raw,
            hpke_suite=HPKE_SUITE_NAMES[public.suite],
            cluster_id=self._facts.cluster_id,
            bundle_digest=bundle_digest,
        )
        try:
            evidence = self._evidence(binding)
            claims = attest(
                evidence,
                profile=self._facts.profile,
                policy=AppraisalPolicy.inspection([self._facts.tee]),
                trust=self._trust,
                expected_binding=binding,
            )
        except (AttestationError, PolicyViolation) as exc:
            self.audit("attest_denied", bundle=bundle_digest.hex(), reason=str(exc))
            raise KeyReleaseDenied("attestation failed: no token issued") from None
        token_id = uuid.uuid4().hex
        measurement = next(iter(claims.measurements.values()), b"").hex()
        self._tokens[token_id] = (bundle_digest, now + self._lifetime, measurement)
        self.audit("token", token_id=token_id, bundle=bundle_digest.hex(), tee=claims.tee)
        return Grant(token_id=token_id, bundle_digest=bundle_digest, expires_at=now + self._lifetime)

    def unwrap(
        self, grant: Grant, header: SealedHeader, executor_key: hpke.PrivateKeyHandle, *, now: float
    ) -> bytes:
        record = self._tokens.get(grant.token_id)
        deny = None
        if record is None:
            deny = "unknown token"
        elif record[1] <= now:
            deny = "token expired"
        else:
            digest, _exp, measurement = record
            try:
                policy = self._service.policy(header.domain)
            except ValueError:
                policy = None
            if policy is None:
                deny = f"unknown domain {header.domain!r}"
            elif not bundle_approved(policy, digest):
                deny = f"bundle {digest.hex()} is not approved by domain {header.domain!r}"
            elif ANY not in policy.tee_kinds and self._facts.tee not in policy.tee_kinds:
                deny = f"TEE kind {self._facts.tee} not allowed by domain {header.domain!r}"
            elif policy.measurements and measurement not in policy.measurements.get(self._facts.tee, ()):
                deny = f"measurement not approved by domain {header.domain!r}"
            elif ANY not in policy.pools and self._facts.pool not in policy.pools:
                deny = f"pool not allowed by domain {header.domain!r}"
            elif ANY not in policy.regions and self._facts.region not in policy.regions:
                deny = f"region not allowed by domain {header.domain!r}"
        if deny is not None:
            self.audit("unwrap_denied", token_id=grant.token_id, domain=header.domain,
                       object_id=header.object_id.hex(), reason=deny)  # fmt: skip
            raise KeyReleaseDenied(f"key release denied: {deny}")
        dek = self._service.unwrap(header.wrapped_dek, header.header_hash, header.header_bytes)
        self.audit("unwrap", token_id=grant.token_id, domain=header.domain, object_id=header.object_id.hex())
        return dek

    def domain(self, name: str) -> DomainInfo:
        try:
            return DomainInfo(descriptor=self._service.descriptor(name), policy=self._service.policy(name))
        except ValueError:
            raise KeyReleaseDenied(f"unknown domain {name!r}") from None

    def revocation_epoch(self) -> int:
        try:
            return int((self._state_dir / self.REVOCATION_FILE).read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            raise BrokerUnavailable(str(exc)) from None


class KBSKeyReleaser:
    """The key broker over gRPC (``ray_confidential.kbs.client.KBSClient``).

    UNTESTED against a running broker in this issue (see docs/executor.md); the broker enforces the
    domain policy, so :meth:`domain` returns the signed descriptor with ``policy=None``.

    Args:
        client: a ``KBSClient`` whose release key (and TLS CA) come from the image or launch data.
        facts: this node's identity.
        evidence: returns evidence for a binding (the attestation device).
    """

    def __init__(self, client: Any, *, facts: NodeFacts, evidence: Callable[[Binding], Evidence]) -> None:
        self._client = client
        self._facts = facts
        self._evidence = evidence

    def grant(self, *, bundle_digest: bytes, executor_key: hpke.PrivateKeyHandle, now: float) -> Grant:
        try:
            challenge = self._client.challenge()
            binding = challenge.binding(
                executor_key, cluster_id=self._facts.cluster_id, bundle_digest=bundle_digest
            )
            token = self._client.attest(
                challenge,
                self._evidence(binding),
                profile=self._facts.profile,
                executor_key=executor_key,
                cluster_id=self._facts.cluster_id,
                bundle_digest=bundle_digest,
                scope="release",
                node_id=self._facts.node_id,
                pool=self._facts.pool,
                region=self._facts.region,
            )
        except AttestationError:
            raise KeyReleaseDenied("attestation failed: no token issued") from None
        except KeyReleaseDenied as exc:
            if type(exc).__name__ == "BrokerUnavailableError":
                raise BrokerUnavailable(str(exc)) from None
            raise
        return Grant(
            token_id=token.jti, bundle_digest=bundle_digest, expires_at=float(token.expires_at), token=token
        )

    def unwrap(
        self, grant: Grant, header: SealedHeader, executor_key: hpke.PrivateKeyHandle, *, now: float
    ) -> bytes:
        try:
            return bytes(self._client.unwrap(grant.token, header.header_bytes, executor_key))
        except KeyReleaseDenied as exc:
            if type(exc).__name__ == "BrokerUnavailableError":
                raise BrokerUnavailable(str(exc)) from None
            raise

    def domain(self, name: str) -> DomainInfo:
        return DomainInfo(descriptor=self._client.descriptor(name), policy=None)

    def revocation_epoch(self) -> int:
        try:
            return int(self._client.revocation_epoch())
        except KeyReleaseDenied as exc:
            raise BrokerUnavailable(str(exc)) from None


def bump_revocation_epoch(state_dir: str | os.PathLike[str]) -> int:
    """DEVELOPMENT: revoke everything :class:`UnsafeLocalKeyReleaser` executors hold (tests)."""
    path = Path(state_dir) / UnsafeLocalKeyReleaser.REVOCATION_FILE
    try:
        epoch = int(path.read_text().strip() or 0) + 1
    except FileNotFoundError:
        epoch = 1
    path.write_text(str(epoch))
    return epoch


__all__ = [
    "BrokerUnavailable",
    "DomainInfo",
    "Grant",
    "KBSKeyReleaser",
    "KeyReleaser",
    "NodeFacts",
    "UnsafeLocalKeyReleaser",
    "bump_revocation_epoch",
    "bundle_approved",
]
