"""What a verified piece of evidence proves, and how a policy says it is not enough.

Every TEE backend (``ray_confidential.attestation.<tee>``) turns evidence into one
:class:`VerifiedClaims`; every validator returns :class:`Violation` records. Both are plain frozen
values so that they can cross process and Ray boundaries.

    >>> v = Violation(field="measurement", got="aa", want="one of [bb]")
    >>> str(v)
    'measurement: got aa, want one of [bb]'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TEE_KINDS = ("sev-snp", "tdx", "sgx", "nitro", "nvidia-gpu")
"""Names of the TEE kinds, used as ``VerifiedClaims.tee`` and on the CLI (``--tee``)."""

TCB_UNKNOWN = "unknown"
"""``tcb_status`` when no collateral was supplied (only a policy with a minimum TCB fails on it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Violation:
    """One mismatch between a claim and a reference value: ``field``, what was found, what was wanted."""

    field: str
    got: str
    want: str

    def __str__(self) -> str:
        return f"{self.field}: got {self.got}, want {self.want}"


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedClaims:
    """Claims of evidence whose signatures and chain verified to an allow-listed root.

    Attributes:
        tee: one of :data:`TEE_KINDS`.
        debug: True when the TEE runs in a debug mode (host can read its memory).
        report_data: the caller-chosen bytes the evidence signs (SNP REPORT_DATA, TDX/SGX REPORTDATA,
            64 bytes; Nitro: ``user_data``; NVIDIA: the SPDM requester nonce, 32 bytes).
        measurements: named measurement registers, lower-case names: ``measurement`` (SNP);
            ``mr_td``, ``rtmr0``..``rtmr3``, ``mr_config_id``, ``mr_owner`` (TDX);
            ``mr_enclave``, ``mr_signer`` (SGX); ``pcr0``..``pcrN`` (Nitro).
        tcb_status: Intel-style TCB status ("UpToDate", "OutOfDate", ...), or :data:`TCB_UNKNOWN`.
        advisories: advisory IDs that apply to the platform's TCB (e.g. "INTEL-SA-00615").
        root_fingerprint: SHA-256 (hex) of the DER of the root certificate the chain ended at.
        details: TEE-specific fields (SNP: vmpl, policy, reported_tcb, chip_id; SGX: isv_prod_id,
            isv_svn; Nitro: nonce, public_key, module_id; ...), documented by each backend.
    """

    tee: str
    debug: bool
    report_data: bytes
    measurements: Mapping[str, bytes]
    tcb_status: str = TCB_UNKNOWN
    advisories: tuple[str, ...] = ()
    root_fingerprint: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
