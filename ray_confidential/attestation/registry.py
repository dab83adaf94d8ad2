"""Registry of TEE backends, keyed by TEE kind; each backend module is imported on first use.

Adding a TEE is one subpackage (``ray_confidential/attestation/<pkg>/``, exporting the backend
contract below) plus one line in :data:`BACKENDS`. After trustee's ``deps/verifier/src/lib.rs``.

    >>> BACKENDS["sev-snp"]
    'ray_confidential.attestation.snp'
    >>> sorted(BACKENDS) == sorted(TEE_KINDS)
    True

Backend contract (checked by :func:`backend` when the module is first imported): ``TEE`` (the kind),
``verify_evidence(evidence, *, trust, certs=(), collateral=None, now) -> VerifiedClaims`` (parse and
verify: raises :class:`~ray_confidential.errors.EvidenceFormatError` /
:class:`~ray_confidential.errors.AttestationError`), ``Policy`` (frozen reference values with
``from_dict``) and ``validate_claims(claims, policy) -> list[Violation]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import ModuleType
from typing import Any, Protocol, cast

from ray_confidential.attestation.claims import TEE_KINDS, VerifiedClaims, Violation
from ray_confidential.attestation.trust import TrustConfig

BACKENDS: dict[str, str] = {
    "sev-snp": "ray_confidential.attestation.snp",
    "tdx": "ray_confidential.attestation.tdx",
    "sgx": "ray_confidential.attestation.sgx",
    "nitro": "ray_confidential.attestation.nitro",
    "nvidia-gpu": "ray_confidential.attestation.nvidia",
}
"""TEE kind -> module path of its backend. Tests may point a kind at a fake backend (monkeypatch)."""


class Backend(Protocol):
    """What a backend module exports (structural type of the module object)."""

    TEE: str
    Policy: Any

    def verify_evidence(
        self,
        evidence: bytes,
        *,
        trust: TrustConfig,
        certs: Sequence[bytes] = (),
        collateral: bytes | None = None,
        now: datetime,
    ) -> VerifiedClaims: ...

    def validate_claims(self, claims: VerifiedClaims, policy: Any) -> list[Violation]: ...


_REQUIRED = ("TEE", "verify_evidence", "Policy", "validate_claims")


class BackendUnavailableError(ImportError):
    """The backend of a known TEE kind is not installed in this build (its subpackage is missing)."""


def backend(tee: str) -> Backend:
    """The backend module of ``tee``, imported on first use.

    Raises:
        ValueError: ``tee`` is not a known TEE kind (the message lists the known ones).
        BackendUnavailableError: the kind is known but its backend module cannot be imported.
    """
    try:
        path = BACKENDS[tee]
    except KeyError:
        raise ValueError(f"unknown TEE kind {tee!r}; known kinds: {', '.join(sorted(BACKENDS))}") from None
    try:
        module: ModuleType = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name is not None and path.startswith(exc.name):
            raise BackendUnavailableError(f"the {tee} backend ({path}) is not available: {exc}") from exc
        raise
    missing = [name for name in _REQUIRED if not hasattr(module, name)]
    if missing:
        raise BackendUnavailableError(f"{path} does not implement the backend contract: missing {missing}")
    if module.TEE != tee:
        raise BackendUnavailableError(f"{path} declares TEE {module.TEE!r}, registered as {tee!r}")
    return cast(Backend, module)


def available() -> Mapping[str, Backend]:
    """Every registered backend that can be imported (missing ones are left out, in registry order)."""
    found: dict[str, Backend] = {}
    for tee in BACKENDS:
        try:
            found[tee] = backend(tee)
        except BackendUnavailableError:
            continue
    return found


__all__ = ["BACKENDS", "TEE_KINDS", "Backend", "BackendUnavailableError", "available", "backend"]
