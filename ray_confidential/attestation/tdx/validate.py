"""TDX appraisal policy: MRTD pins, RTMR pins, MRCONFIGID / MROWNER, TD attributes, TCB status.

    >>> from ray_confidential.attestation.reference import measurement_pins
    >>> p = Policy(mr_td=measurement_pins(["00" * 48]))
    >>> p.allow_debug, p.require_sept_ve_disable
    (False, True)

Validation compares verified claims with reference values and collects every violation. It does NOT
verify signatures or chains (see :mod:`.verify`), and an RTMR pin is only as good as the event-log
replay behind it (pass ``event_log`` to ``verify_evidence`` to pin RTMRs that change with the kernel).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ray_confidential.attestation.claims import VerifiedClaims, Violation
from ray_confidential.attestation.dcap import policy as _p
from ray_confidential.attestation.reference import MeasurementPins

from .abi import TD_ATTRIBUTES_SEPT_VE_DISABLE_BIT, TD_ATTRIBUTES_SEPT_VE_DISABLE_BYTE

_MR = 48


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Reference values for a TD. ``None`` = not checked.

    Attributes:
        mr_td: mandatory allow-list of MRTD values (48 bytes each), from ``measurement_pins``.
        rtmr0, rtmr1, rtmr2, rtmr3: allow-lists of 48-byte RTMR values.
        mr_config_id, mr_owner, mr_owner_config: exact 48-byte values.
        report_data: exact 64-byte REPORTDATA.
        accepted_tcb_statuses: Intel TCB statuses accepted (e.g. {"UpToDate"}); "unknown" (no
            collateral) never satisfies a set policy.
        allow_debug: accept TD_ATTRIBUTES.DEBUG (never in production).
        require_sept_ve_disable: TD_ATTRIBUTES.SEPT_VE_DISABLE (bit 28) must be set (dcap-qvl's default).
        allow_service_td: accept a non-zero MR_SERVICETD (TD 1.5 bodies).
    """

    mr_td: MeasurementPins
    rtmr0: frozenset[bytes] | None = None
    rtmr1: frozenset[bytes] | None = None
    rtmr2: frozenset[bytes] | None = None
    rtmr3: frozenset[bytes] | None = None
    mr_config_id: bytes | None = None
    mr_owner: bytes | None = None
    mr_owner_config: bytes | None = None
    report_data: bytes | None = None
    accepted_tcb_statuses: frozenset[str] | None = None
    allow_debug: bool = False
    require_sept_ve_disable: bool = True
    allow_service_td: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "mr_td", _p.pins(self.mr_td, _MR, "mr_td"))
        for name in ("rtmr0", "rtmr1", "rtmr2", "rtmr3"):
            set_(self, name, _p.optional_pins(getattr(self, name), _MR, name))
        for name in ("mr_config_id", "mr_owner", "mr_owner_config"):
            set_(self, name, _p.fixed_hex(getattr(self, name), _MR, name))
        set_(self, "report_data", _p.fixed_hex(self.report_data, 64, "report_data"))
        set_(self, "accepted_tcb_statuses", _p.tcb_statuses(self.accepted_tcb_statuses))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        """From YAML/JSON: hex strings, lists of hex strings, ``mr_td: UNSAFE_ANY`` for development."""
        fields_ = [f.name for f in fields(cls)]
        return cls(**_p.policy_args(d, fields_, what="tdx policy", pin_field="mr_td", pin_what="MRTD"))


def validate_claims(claims: VerifiedClaims, policy: Policy) -> list[Violation]:
    """Every way ``claims`` fall short of ``policy`` (empty list = acceptable)."""
    out: list[Violation] = []
    _p.check_common(
        out,
        claims,
        tee="tdx",
        allow_debug=policy.allow_debug,
        report_data=policy.report_data,
        accepted_tcb_statuses=policy.accepted_tcb_statuses,
    )
    m = claims.measurements
    _p.check_pins(out, "mr_td", m.get("mr_td"), policy.mr_td)
    for i, pins in enumerate((policy.rtmr0, policy.rtmr1, policy.rtmr2, policy.rtmr3)):
        _p.check_pins(out, f"rtmr{i}", m.get(f"rtmr{i}"), pins)
    for name in ("mr_config_id", "mr_owner", "mr_owner_config"):
        want = getattr(policy, name)
        if want is not None and m.get(name) != want:
            got = m.get(name)
            out.append(
                Violation(field=name, got=got.hex() if got is not None else "missing", want=want.hex())
            )
    attrs = bytes.fromhex(str(claims.details.get("td_attributes", "")))
    if policy.require_sept_ve_disable and (
        len(attrs) != 8 or not attrs[TD_ATTRIBUTES_SEPT_VE_DISABLE_BYTE] & TD_ATTRIBUTES_SEPT_VE_DISABLE_BIT
    ):
        out.append(Violation(field="td_attributes", got=attrs.hex(), want="SEPT_VE_DISABLE (bit 28) set"))
    service_td = str(claims.details.get("mr_service_td", "00" * _MR))
    if not policy.allow_service_td and service_td.strip("0"):
        out.append(Violation(field="mr_service_td", got=service_td, want="00" * _MR))
    return out
