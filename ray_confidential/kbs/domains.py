"""The broker's domains: owner, release policy, appraisal policy and HPKE key versions, in the key store.

One record per domain under ``domains/<sha256(name)[:32]>`` (JSON, the store encrypts it at rest);
private keys stay in the record and in :class:`~ray_confidential.crypto.hpke.PrivateKeyHandle` objects
in memory, never in a response. The signed descriptor is what executors and drivers fetch
(docs/kbs.md "Descriptors"). A record also keeps the owner's signatures of its key versions
(docs/kbs.md "Owner signatures"), only while they verify over the current policy.

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
import logging
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from cryptography import x509

from ray_confidential.attestation.policy import AppraisalPolicy
from ray_confidential.crypto import hpke
from ray_confidential.domains import ANY, DomainPolicy
from ray_confidential.kbs import owner_sig
from ray_confidential.kbs.store import KeyStore
from ray_confidential.sealed.format import _name as check_name

log = logging.getLogger("ray_confidential.kbs")

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


def appraisal_hash(appraisal: Mapping[str, Any] | None) -> str:
    """SHA-256 over the canonical JSON of an appraisal policy dict (``null`` when derived from the policy)."""
    body = json.dumps(appraisal, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(b"ray-confidential/appraisal-policy/v1\x00" + body).hexdigest()


def store_key(name: str) -> str:
    return PREFIX + hashlib.sha256(name.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyVersion:
    version: int
    suite: str
    private_key: bytes = field(repr=False)
    retired: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnerSignature:
    """The owner's signature of one key version's statement, with the certificate whose key made it."""

    signature: bytes
    certificate: bytes
    """DER of the owner's client certificate (verified by mutual TLS when the owner signed)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainRecord:
    """A domain as the broker holds it.

    ``owner_signatures`` (key version -> :class:`OwnerSignature`) holds only signatures that verify
    over the version's current owner statement: :class:`DomainRegistry` checks each when it signs,
    loads or changes the policy, and drops those that no longer verify.
    """

    name: str
    owner: str
    policy: DomainPolicy
    appraisal: Mapping[str, Any] | None
    versions: tuple[KeyVersion, ...]
    created: int
    owner_signatures: Mapping[int, OwnerSignature] = field(default_factory=dict)

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
                "owner_signatures": {
                    str(n): {"signature": s.signature.hex(), "certificate": s.certificate.hex()}
                    for n, s in self.owner_signatures.items()
                },
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
            owner_signatures={
                int(n): OwnerSignature(
                    signature=bytes.fromhex(s["signature"]), certificate=bytes.fromhex(s["certificate"])
                )
                for n, s in (d.get("owner_signatures") or {}).items()
            },
        )

    def appraisal_hash(self) -> str:
        return appraisal_hash(self.appraisal)

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

    def owner_statement(self, version: int, public_key: hpke.PublicKey) -> bytes:
        """The owner statement of ``version`` under the current policy (what the owner signs)."""
        return owner_sig.statement_bytes(name=self.name, owner=self.owner, version=version,
                                         suite=public_key.suite, public_key=public_key.raw,
                                         policy_hash=self.policy.policy_hash(),
                                         appraisal_hash=self.appraisal_hash(),
                                         allow_pickle=self.policy.allow_pickle,
                                         seal_arguments=self.policy.seal_arguments,
                                         recipients=self.policy.recipients)  # fmt: skip


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
                self._records[rec.name] = self._verified_signatures(rec)

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

    def _check_owner_signature(self, rec: DomainRecord, version: KeyVersion, sig: OwnerSignature) -> None:
        """Raises OwnerSignatureError unless ``sig`` is the owner's over ``version``'s current statement."""
        try:
            cert = x509.load_der_x509_certificate(sig.certificate)
        except ValueError as exc:
            raise owner_sig.OwnerSignatureError(f"owner certificate does not parse: {exc}") from None
        subject = cert.subject.rfc4514_string()
        if subject != rec.owner:
            raise owner_sig.OwnerSignatureError(
                f"certificate subject {subject!r} is not the owner {rec.owner!r} of {rec.name!r}"
            )
        statement = rec.owner_statement(version.version, self.public_key(rec, version))
        owner_sig.verify_statement(owner_sig.certificate_key(cert), statement, sig.signature)

    def _verified_signatures(self, rec: DomainRecord) -> DomainRecord:
        """``rec`` keeping only owner signatures that verify over its current statements."""
        kept = {}
        for number, sig in rec.owner_signatures.items():
            version = rec.version(number)
            try:
                if version is None or version.retired:
                    raise owner_sig.OwnerSignatureError(f"no live key version {number}")
                self._check_owner_signature(rec, version, sig)
            except owner_sig.OwnerSignatureError as exc:
                log.info("domain %r version %d: owner signature dropped: %s", rec.name, number, exc)
                continue
            kept[number] = sig
        return rec if len(kept) == len(rec.owner_signatures) else replace(rec, owner_signatures=kept)

    def signed(self, rec: DomainRecord, version: int) -> bool:
        """Whether ``version`` has an owner signature over its current statement (policy included)."""
        return version in rec.owner_signatures

    def policy_signed(self, rec: DomainRecord) -> bool:
        """Whether some live version has an owner signature over its current statement: the owner has
        signed the current policy."""
        return any(not v.retired and v.version in rec.owner_signatures for v in rec.versions)

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
        """Replace the policy; returns (old, new). Owner signatures over the old policy are dropped (the
        statement names the policy and appraisal hashes): the owner signs the new one."""
        with self._lock:
            old = self._owned(owner, name)
            new = self._verified_signatures(replace(old, policy=policy, appraisal=appraisal))
            return old, self._save(new)

    def sign(
        self, *, owner: str, name: str, version: int, signature: bytes, certificate: bytes
    ) -> DomainRecord:
        """Keep the owner's signature of ``version``'s statement, once it verifies with the key of
        ``certificate`` (the caller's verified client certificate, DER), whose subject must be the owner.

        Raises:
            DomainError: not the owner (PERMISSION_DENIED), no such or a retired version (NOT_FOUND,
                INVALID_ARGUMENT), or the signature does not verify (PERMISSION_DENIED).
        """
        with self._lock:
            rec = self._owned(owner, name)
            v = rec.version(version)
            if v is None:
                raise DomainError("NOT_FOUND", f"domain {name!r} has no key version {version}")
            if v.retired:
                raise DomainError("INVALID_ARGUMENT", f"key version {version} of {name!r} is retired")
            sig = OwnerSignature(signature=bytes(signature), certificate=bytes(certificate))
            try:
                self._check_owner_signature(rec, v, sig)
            except owner_sig.OwnerSignatureError as exc:
                raise DomainError(
                    "PERMISSION_DENIED", f"owner signature of {name!r} v{version}: {exc}"
                ) from None
            return self._save(replace(rec, owner_signatures={**rec.owner_signatures, version: sig}))

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
            signatures = {n: s for n, s in rec.owner_signatures.items() if n != version}
            return self._save(replace(rec, versions=versions, owner_signatures=signatures))


__all__ = [
    "MEASUREMENT_CLAIM",
    "DomainError",
    "DomainRecord",
    "DomainRegistry",
    "KeyVersion",
    "OwnerSignature",
]
