"""Validate verified Nitro claims against reference values (PCR pins, debug, nonce, key, user data).

    >>> from ray_confidential.attestation.claims import VerifiedClaims
    >>> claims = VerifiedClaims(tee="nitro", debug=True, report_data=b"",
    ...                         measurements={"pcr0": bytes(48)})
    >>> policy = Policy(measurements=measurement_pins(["11" * 48]))
    >>> sorted(v.field for v in validate_claims(claims, policy))
    ['debug', 'pcr0']

Collects every violation. PCR0 (the enclave image, attestation_process.md section 2.2 and the AWS
"Where to get an enclave's measurements" guide) is pinned through
:func:`~ray_confidential.attestation.reference.measurement_pins`; other PCRs (1: kernel and
bootstrap, 2: application, 3: IAM role, 4: instance id, 8: signing certificate) may be pinned to
exact values. A debug enclave reports PCR0..2 as zeros and is refused unless ``allow_debug``.

Not checked here: signatures and chain (``verify``), the document's age, and the binding of
``user_data`` / ``nonce`` / ``public_key`` to a session beyond the exact values given here (the
``attest`` layer compares the canonical binding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ray_confidential.attestation.claims import VerifiedClaims, Violation
from ray_confidential.attestation.nitro.abi import MAX_NONCE_SIZE, MAX_PCRS, MAX_USER_DATA_SIZE, PCR_SIZE
from ray_confidential.attestation.reference import (
    UNSAFE_ANY_MEASUREMENT,
    MeasurementPins,
    is_pinned,
    measurement_pins,
    reference_bytes,
)

TEE = "nitro"


def _hex(value: bytes | None) -> str:
    return "null" if value is None else value.hex()


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Reference values for a Nitro enclave. ``None`` = not checked.

    Attributes:
        measurements: allow-list of PCR0 values (48 bytes each), from :func:`measurement_pins`;
            mandatory (``UNSAFE_ANY_MEASUREMENT`` to accept any image, development only).
        pcrs: exact values for other PCR indices (0..31 -> 48 bytes), e.g. {1: ..., 2: ..., 8: ...}.
        allow_debug: accept a debug enclave (PCR0..2 all zeros). Default False.
        expected_nonce: exact ``nonce`` (0..512 bytes).
        expected_user_data: exact ``user_data`` (0..512 bytes; an absent field counts as b"").
        expected_public_key: exact ``public_key`` (1..1024 bytes).
    """

    measurements: MeasurementPins
    pcrs: Mapping[int, bytes] | None = None
    allow_debug: bool = False
    expected_nonce: bytes | None = None
    expected_user_data: bytes | None = None
    expected_public_key: bytes | None = None

    def __post_init__(self) -> None:
        if is_pinned(self.measurements):
            if not isinstance(self.measurements, frozenset):
                raise TypeError("measurements must come from measurement_pins([...])")
            for pin in self.measurements:
                if len(pin) != PCR_SIZE:
                    raise ValueError(f"PCR0 pins are {PCR_SIZE} bytes (96 hex digits), got {len(pin)}")
        if self.pcrs is not None:
            for index, value in self.pcrs.items():
                if type(index) is not int or not 0 <= index < MAX_PCRS:
                    raise ValueError(f"PCR index must be 0..{MAX_PCRS - 1}, got {index!r}")
                if not isinstance(value, bytes) or len(value) != PCR_SIZE:
                    raise ValueError(f"PCR{index} must be {PCR_SIZE} bytes")
            # A private copy: the caller's dict cannot change a policy after construction.
            object.__setattr__(self, "pcrs", MappingProxyType(dict(sorted(self.pcrs.items()))))
        for name, limit in (("expected_nonce", MAX_NONCE_SIZE), ("expected_user_data", MAX_USER_DATA_SIZE)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, bytes) or len(value) > limit):
                raise ValueError(f"{name} must be at most {limit} bytes")
        if self.expected_public_key is not None and not 1 <= len(self.expected_public_key) <= 1024:
            raise ValueError("expected_public_key must be 1..1024 bytes")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        """Build from plain data (YAML/JSON): hex strings for bytes.

        Example: ``{"measurements": ["<96 hex>"], "pcrs": {"1": "<96 hex>"}, "allow_debug": false}``;
        ``"measurements": "UNSAFE_ANY"`` accepts any PCR0 (development only, warns).
        """
        known = {"measurements", "pcrs", "allow_debug", "expected_nonce", "expected_user_data",
                 "expected_public_key"}  # fmt: skip
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown nitro policy key(s) {sorted(unknown)}; known: {sorted(known)}")
        if "measurements" not in d:
            raise ValueError(
                "nitro policy needs 'measurements' (PCR0 allow-list); use 'UNSAFE_ANY' only for development"
            )
        raw = d["measurements"]
        pins = measurement_pins(raw if raw == "UNSAFE_ANY" else list(raw))
        pcrs = d.get("pcrs")
        allow_debug = d.get("allow_debug", False)
        if not isinstance(allow_debug, bool):
            raise ValueError("allow_debug must be true or false")

        def opt(name: str) -> bytes | None:
            value = d.get(name)
            return None if value is None else reference_bytes(value, name)

        return cls(
            measurements=pins,
            pcrs=None
            if pcrs is None
            else {int(k): reference_bytes(v, f"pcrs[{k}]") for k, v in pcrs.items()},
            allow_debug=allow_debug,
            expected_nonce=opt("expected_nonce"),
            expected_user_data=opt("expected_user_data"),
            expected_public_key=opt("expected_public_key"),
        )


def validate_claims(claims: VerifiedClaims, policy: Policy) -> list[Violation]:
    """Compare verified claims with ``policy``; return every violation (empty list = acceptable)."""
    out: list[Violation] = []
    if claims.tee != TEE:
        out.append(Violation(field="tee", got=claims.tee, want=TEE))
    if claims.debug and not policy.allow_debug:
        out.append(Violation(field="debug", got="true", want="false"))
    pcr0 = claims.measurements.get("pcr0")
    if policy.measurements is not UNSAFE_ANY_MEASUREMENT:
        assert isinstance(policy.measurements, frozenset)  # narrowing for mypy
        if pcr0 is None or pcr0 not in policy.measurements:
            want = "one of [" + ", ".join(sorted(p.hex() for p in policy.measurements)) + "]"
            out.append(Violation(field="pcr0", got=_hex(pcr0), want=want))
    for index, value in (policy.pcrs or {}).items():
        got = claims.measurements.get(f"pcr{index}")
        if got != value:
            out.append(Violation(field=f"pcr{index}", got=_hex(got), want=value.hex()))
    details = claims.details
    if policy.expected_nonce is not None and details.get("nonce") != policy.expected_nonce:
        out.append(Violation(field="nonce", got=_hex(details.get("nonce")), want=policy.expected_nonce.hex()))
    if policy.expected_user_data is not None and claims.report_data != policy.expected_user_data:
        out.append(
            Violation(field="user_data", got=claims.report_data.hex(), want=policy.expected_user_data.hex())
        )
    if policy.expected_public_key is not None and details.get("public_key") != policy.expected_public_key:
        out.append(
            Violation(
                field="public_key", got=_hex(details.get("public_key")), want=policy.expected_public_key.hex()
            )
        )
    return out
