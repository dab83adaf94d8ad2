"""Domains: a named HPKE key pair per version, an owner-approved release policy, a public descriptor.

The descriptor (name, version, suite, public key, policy hash) is what sealing needs and may be
published; the private key never leaves the key service that created it.

    >>> policy = DomainPolicy.development(warn=False)
    >>> policy.allow_pickle, policy.is_development
    (False, True)
    >>> DomainPolicy.from_dict(policy.to_dict()) == policy
    True
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ray_confidential.crypto import hpke

ANY = "*"


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainPolicy:
    """An owner's release policy for a domain (design.md section 4).

    Attributes:
        bundles: approved code-bundle digests (hex), or ``("*",)`` = any bundle (UnsafeAnyCode).
        tee_kinds: TEE kinds allowed to receive keys, ``("*",)`` = any.
        pools, regions: node pools / regions allowed, ``("*",)`` = any.
        measurements: per TEE kind, approved measurements (hex); empty mapping = any measurement
            under the trusted roots (development only).
        recipients: HPKE public keys (hex, "suite:hex") results may be sealed to besides the domain.
        allow_pickle: open pickle payloads in this domain (anyone with the public key can seal).
        seal_arguments: every argument of a confidential call in this domain must be sealed: the
            decorators seal plain arguments automatically (``rc.put``), and executors refuse plain
            JSON parameters, which Ray would otherwise carry in the clear (docs/executor.md).
        dev: this is the development policy; production brokers refuse it.
    """

    bundles: tuple[str, ...] = (ANY,)
    tee_kinds: tuple[str, ...] = (ANY,)
    pools: tuple[str, ...] = (ANY,)
    regions: tuple[str, ...] = (ANY,)
    measurements: Mapping[str, tuple[str, ...]] | None = None
    recipients: tuple[str, ...] = ()
    allow_pickle: bool = False
    seal_arguments: bool = False
    dev: bool = False

    @classmethod
    def development(cls, *, allow_pickle: bool = False, warn: bool = True) -> DomainPolicy:
        """Any code bundle, any measurement under the simulated root, any TEE, pool or region."""
        if warn:
            warnings.warn(
                "development domain policy: ANY code bundle and ANY measurement may receive keys "
                "(UnsafeAnyCode). A production broker refuses this policy.",
                UserWarning,
                stacklevel=3,
            )
        return cls(allow_pickle=allow_pickle, dev=True)

    @property
    def is_development(self) -> bool:
        return self.dev or ANY in self.bundles

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["measurements"] = (
            None if self.measurements is None else {k: list(v) for k, v in self.measurements.items()}
        )
        if not self.seal_arguments:  # added later: omitted when off, so earlier policy hashes hold
            del d["seal_arguments"]
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DomainPolicy:
        """Build from a mapping (YAML/JSON). Unknown keys are an error, so typos never widen a policy."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown domain policy keys {sorted(unknown)}; known keys: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for k, v in data.items():
            if k == "measurements":
                kwargs[k] = None if v is None else {str(t): tuple(str(m) for m in ms) for t, ms in v.items()}
            elif k in ("allow_pickle", "seal_arguments", "dev"):
                if not isinstance(v, bool):
                    raise ValueError(f"domain policy {k} must be true or false")
                kwargs[k] = v
            else:
                if isinstance(v, str):
                    v = [v]
                kwargs[k] = tuple(str(x) for x in v)
                if not kwargs[k] and k != "recipients":
                    raise ValueError(f"domain policy {k} is empty; list allowed values or '*'")
        return cls(**kwargs)

    def canonical_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def policy_hash(self) -> str:
        """SHA-256 over the canonical JSON (what the signed descriptor names)."""
        return hashlib.sha256(b"ray-confidential/domain-policy/v1\x00" + self.canonical_json()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainDescriptor:
    """Public description of one domain key version: safe to publish and to pass through Ray."""

    name: str
    version: int
    public_key: hpke.PublicKey
    policy_hash: str
    allow_pickle: bool = False
    seal_arguments: bool = False
    recipients: tuple[str, ...] = ()
    """The policy's result recipients ("suite:hex" public keys): executors seal only to these."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "suite": self.public_key.suite,
            "public_key": self.public_key.raw.hex(),
            "policy_hash": self.policy_hash,
            "allow_pickle": self.allow_pickle,
            **({"seal_arguments": True} if self.seal_arguments else {}),
            **({"recipients": list(self.recipients)} if self.recipients else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DomainDescriptor:
        return cls(
            name=str(data["name"]),
            version=int(data["version"]),
            public_key=hpke.PublicKey(str(data["suite"]), bytes.fromhex(str(data["public_key"]))),
            policy_hash=str(data["policy_hash"]),
            allow_pickle=bool(data.get("allow_pickle", False)),
            seal_arguments=bool(data.get("seal_arguments", False)),
            recipients=tuple(str(r) for r in data.get("recipients") or ()),
        )
