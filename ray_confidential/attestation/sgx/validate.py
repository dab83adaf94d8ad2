"""SGX appraisal policy: MRENCLAVE pins, MRSIGNER, ISV product id, minimum ISV SVN, debug, TCB status.

    >>> from ray_confidential.attestation.reference import measurement_pins
    >>> p = Policy(mr_enclave=measurement_pins(["00" * 32]), isv_prod_id=0)
    >>> p.allow_debug
    False

Validation compares verified claims with reference values and collects every violation. It does NOT
verify signatures or chains (see :mod:`.verify`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ray_confidential.attestation.claims import VerifiedClaims, Violation
from ray_confidential.attestation.dcap import policy as _p
from ray_confidential.attestation.reference import MeasurementPins


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Reference values for an SGX enclave. ``None`` = not checked.

    Attributes:
        mr_enclave: mandatory allow-list of MRENCLAVE values (32 bytes each), from ``measurement_pins``.
        mr_signer: allow-list of MRSIGNER values (32 bytes each).
        isv_prod_id: exact ISVPRODID (u16).
        min_isv_svn: minimum ISVSVN (u16).
        report_data: exact 64-byte REPORTDATA.
        accepted_tcb_statuses: Intel TCB statuses accepted; "unknown" never satisfies a set policy.
        allow_debug: accept ATTRIBUTES.DEBUG (never in production).
    """

    mr_enclave: MeasurementPins
    mr_signer: frozenset[bytes] | None = None
    isv_prod_id: int | None = None
    min_isv_svn: int | None = None
    report_data: bytes | None = None
    accepted_tcb_statuses: frozenset[str] | None = None
    allow_debug: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "mr_enclave", _p.pins(self.mr_enclave, 32, "mr_enclave"))
        set_(self, "mr_signer", _p.optional_pins(self.mr_signer, 32, "mr_signer"))
        for name in ("isv_prod_id", "min_isv_svn"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFFFF):
                raise ValueError(f"{name} must be an integer in [0, 65535]")
        set_(self, "report_data", _p.fixed_hex(self.report_data, 64, "report_data"))
        set_(self, "accepted_tcb_statuses", _p.tcb_statuses(self.accepted_tcb_statuses))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        """From YAML/JSON: hex strings, lists of hex strings, ``mr_enclave: UNSAFE_ANY`` for development."""
        fields_ = [f.name for f in fields(cls)]
        return cls(
            **_p.policy_args(d, fields_, what="sgx policy", pin_field="mr_enclave", pin_what="MRENCLAVE")
        )


def validate_claims(claims: VerifiedClaims, policy: Policy) -> list[Violation]:
    """Every way ``claims`` fall short of ``policy`` (empty list = acceptable)."""
    out: list[Violation] = []
    _p.check_common(
        out,
        claims,
        tee="sgx",
        allow_debug=policy.allow_debug,
        report_data=policy.report_data,
        accepted_tcb_statuses=policy.accepted_tcb_statuses,
    )
    _p.check_pins(out, "mr_enclave", claims.measurements.get("mr_enclave"), policy.mr_enclave)
    _p.check_pins(out, "mr_signer", claims.measurements.get("mr_signer"), policy.mr_signer)
    prod = claims.details.get("isv_prod_id")
    if policy.isv_prod_id is not None and prod != policy.isv_prod_id:
        out.append(Violation(field="isv_prod_id", got=str(prod), want=str(policy.isv_prod_id)))
    svn = claims.details.get("isv_svn")
    if policy.min_isv_svn is not None and (not isinstance(svn, int) or svn < policy.min_isv_svn):
        out.append(Violation(field="isv_svn", got=str(svn), want=f">= {policy.min_isv_svn}"))
    return out
