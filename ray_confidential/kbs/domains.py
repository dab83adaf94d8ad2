"""The broker's domains: owner, release policy, appraisal policy and HPKE key versions, in the key store.

One record per domain under ``domains/<sha256(name)[:32]>`` (JSON, the store encrypts it at rest);
private keys stay in the record and in :class:`~ray_confidential.crypto.hpke.PrivateKeyHandle` objects
in memory, never in a response. The signed descriptor is what executors and drivers fetch
(docs/kbs.md "Descriptors").

    >>> from ray_confidential.kbs.store import MemoryStore
    >>> reg = DomainRegistry(MemoryStore())
    >>> rec = reg.create(owner="CN=a", name="d", policy=DomainPolicy(bundles=("ab",)), appraisal=None,
    ...                  suite="x25519", now=0)
    >>> (rec.owner, rec.live_version)
    ('CN=a', 1)
"""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from ray_confidential.attestation.policy import AppraisalPolicy
from ray_confidential.crypto import hpke
from ray_confidential.domains import ANY, DomainPolicy
from ray_confidential.kbs.store import KeyStore
from ray_confidential.sealed.format import _name as check_name

PREFIX: Final = "domains/"
DESCRIPTOR_FORMAT: Final = 1

MEASUREMENT_CLAIM: Final[dict[str, str]] = {
    "sev-snp": "measurement",
    "tdx": "mr_td",
    "sgx": "mr_enclave",
    "nitro": "pcr0",
}
"""The claim that holds each CPU TEE kind's pinned measurement (SNP MEASUREMENT, TDX MRTD, SGX
MRENCLAVE, Nitro PCR0)."""


class DomainError(Exception):
    """A domain operation is refused; ``code`` is the coarse wire code, the message the full reason."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


def store_key(name: str) -> str:
    return PREFIX + hashlib.sha256(name.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyVersion:
    version: int
    suite: str
    private_key: bytes = field(repr=False)
    retired: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainRecord:
    """A domain as the broker holds it."""

    name: str
    owner: str
    policy: DomainPolicy
    appraisal: Mapping[str, Any] | None
    versions: tuple[KeyVersion, ...]
    created: int

    @property
    def live_version(self) -> int | None:
        live = [v.version for v in self.versions if not v.retired]
        return live[-1] if live else None

    def version(self, number: int) -> KeyVersion | None:
        for v in self.versions:
            if v.version == number:
                return v
        return None

    def appraisal_policy(self) -> AppraisalPolicy:
        """Reference values for Attest: the owner's appraisal policy, else the policy's measurement
        pins, else (development only) any measurement under the trusted roots."""
        if self.appraisal is not None:
            return AppraisalPolicy.from_dict(self.appraisal)
        if self.policy.measurements:
            return AppraisalPolicy.from_measurements(self.policy.measurements, name=f"domain:{self.name}")
        kinds = None if ANY in self.policy.tee_kinds else list(self.policy.tee_kinds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AppraisalPolicy.inspection(
                [k for k in (kinds or MEASUREMENT_CLAIM) if k in MEASUREMENT_CLAIM]
            )

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "owner": self.owner,
                "policy": self.policy.to_dict(),
                "appraisal": None if self.appraisal is None else dict(self.appraisal),
                "versions": [
                    {
                        "version": v.version,
                        "suite": v.suite,
                        "private_key": v.private_key.hex(),
                        "retired": v.retired,
                    }
                    for v in self.versions
                ],
                "created": self.created,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> DomainRecord:
        d = json.loads(data)
        return cls(
            name=d["name"],
            owner=d["owner"],
            policy=DomainPolicy.from_dict(d["policy"]),
            appraisal=d["appraisal"],
            versions=tuple(
                KeyVersion(
                    version=v["version"],
                    suite=v["suite"],
                    private_key=bytes.fromhex(v["private_key"]),
                    retired=v["retired"],
                )
                for v in d["versions"]
            ),
            created=d["created"],
        )

    def appraisal_hash(self) -> str:
        body = json.dumps(self.appraisal, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(b"ray-confidential/appraisal-policy/v1\x00" + body).hexdigest()

    def descriptor_bytes(self, version: int, public_key: hpke.PublicKey, issuer: str) -> bytes:
        """Canonical JSON of the descriptor of ``version`` (what the broker signs)."""
        body = {
            "format": DESCRIPTOR_FORMAT,
            "issuer": issuer,
            "name": self.name,
            "owner": self.owner,
            "version": version,
            "suite": public_key.suite,
            "public_key": public_key.raw.hex(),
            "policy_hash": self.policy.policy_hash(),
            "appraisal_hash": self.appraisal_hash(),
            "allow_pickle": self.policy.allow_pickle,
            "seal_arguments": self.policy.seal_arguments,
            "recipients": list(self.policy.recipients),
            "retired_versions": [v.version for v in self.versions if v.retired],
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class DomainRegistry:
    """Domain records in a :class:`~ray_confidential.kbs.store.KeyStore`, with an in-memory cache.

    Ownership and policy rules are enforced here; audit and production checks are the broker's.
    """

    def __init__(self, store: KeyStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._records: dict[str, DomainRecord] = {}
        self._keys: dict[tuple[str, int], hpke.PrivateKeyHandle] = {}
        for key in store.keys(PREFIX):
            raw = store.get(key)
            if raw is not None:
                rec = DomainRecord.from_json(raw)
                self._records[rec.name] = rec

    def get(self, name: str) -> DomainRecord | None:
        return self._records.get(name)

    def names(self) -> list[str]:
        return sorted(self._records)

    def private_key(self, rec: DomainRecord, version: KeyVersion) -> hpke.PrivateKeyHandle:
        handle = self._keys.get((rec.name, version.version))
        if handle is None:
            handle = hpke.PrivateKeyHandle(version.suite, version.private_key)
            self._keys[(rec.name, version.version)] = handle
        return handle

    def public_key(self, rec: DomainRecord, version: KeyVersion) -> hpke.PublicKey:
        return self.private_key(rec, version).public_key()

    def _save(self, rec: DomainRecord) -> DomainRecord:
        self._store.put(store_key(rec.name), rec.to_json())
        self._records[rec.name] = rec
        return rec

    def _owned(self, owner: str, name: str) -> DomainRecord:
        rec = self._records.get(name)
        if rec is None:
            raise DomainError("NOT_FOUND", f"unknown domain {name!r}")
        if rec.owner != owner:
            raise DomainError(
                "PERMISSION_DENIED", f"{owner!r} does not own domain {name!r} (owner {rec.owner!r})"
            )
        return rec

    def create(
        self,
        *,
        owner: str,
        name: str,
        policy: DomainPolicy,
        appraisal: Mapping[str, Any] | None,
        suite: str,
        now: int,
    ) -> DomainRecord:
        """Create ``name`` for ``owner`` (idempotent for the same owner, policy and appraisal)."""
        try:
            check_name(name, "domain")
            hpke.SUITES[suite]
        except (ValueError, KeyError) as exc:
            raise DomainError("INVALID_ARGUMENT", f"create_domain: {exc}") from None
        with self._lock:
            existing = self._records.get(name)
            if existing is not None:
                if existing.owner != owner:
                    raise DomainError(
                        "PERMISSION_DENIED", f"{owner!r} cannot create {name!r}: owned by {existing.owner!r}"
                    )
                if existing.policy != policy or existing.appraisal != appraisal:
                    raise DomainError(
                        "ALREADY_EXISTS",
                        f"domain {name!r} exists with a different policy; use UpdatePolicy (audited)",
                    )
                return existing
            key = hpke.generate_private_key(suite)
            rec = DomainRecord(
                name=name,
                owner=owner,
                policy=policy,
                appraisal=appraisal,
                versions=(KeyVersion(version=1, suite=suite, private_key=key.export_private_bytes()),),
                created=now,
            )
            return self._save(rec)

    def update_policy(
        self, *, owner: str, name: str, policy: DomainPolicy, appraisal: Mapping[str, Any] | None
    ) -> tuple[DomainRecord, DomainRecord]:
        """Replace the policy; returns (old, new)."""
        with self._lock:
            old = self._owned(owner, name)
            return old, self._save(replace(old, policy=policy, appraisal=appraisal))

    def rotate(self, *, owner: str, name: str, suite: str | None) -> DomainRecord:
        with self._lock:
            rec = self._owned(owner, name)
            suite = suite or rec.versions[-1].suite
            if suite not in hpke.SUITES:
                raise DomainError("INVALID_ARGUMENT", f"unknown HPKE suite {suite!r}")
            key = hpke.generate_private_key(suite)
            new = KeyVersion(
                version=rec.versions[-1].version + 1, suite=suite, private_key=key.export_private_bytes()
            )
            return self._save(replace(rec, versions=(*rec.versions, new)))

    def retire(self, *, owner: str, name: str, version: int) -> DomainRecord:
        with self._lock:
            rec = self._owned(owner, name)
            if rec.version(version) is None:
                raise DomainError("NOT_FOUND", f"domain {name!r} has no key version {version}")
            versions = tuple(replace(v, retired=True) if v.version == version else v for v in rec.versions)
            self._keys.pop((name, version), None)
            return self._save(replace(rec, versions=versions))


__all__ = ["MEASUREMENT_CLAIM", "DomainError", "DomainRecord", "DomainRegistry", "KeyVersion"]
