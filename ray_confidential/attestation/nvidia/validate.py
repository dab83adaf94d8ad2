"""Validate verified H100 claims: session nonce, measurement pins, RIM comparison, versions.

    >>> from ray_confidential.attestation.claims import VerifiedClaims
    >>> claims = VerifiedClaims(tee="nvidia-gpu", debug=False, report_data=b"\\x01" * 32,
    ...                         measurements={"measurement": b"\\x02" * 48})
    >>> policy = Policy(measurements=measurement_pins([b"\\x02" * 48]), expected_nonce=b"\\x03" * 32)
    >>> [v.field for v in validate_claims(claims, policy)]
    ['nonce']

Collects every violation. The GPU report is composite evidence next to a CPU TEE: its requester
nonce must be the one derived from the CPU session (``expected_nonce``), or a report minted for
another session or host could be relayed. ``measurements`` pins the digest of the whole measurement
record (claim ``measurement``); RIMs whose ``colloquialVersion`` equals the report's driver or VBIOS
version are compared index by index as nvtrust does (RIM index i = SPDM index i + 1; an active index
must equal one of its alternatives; an index claimed by two RIMs is a conflict).

Not checked here: signatures and chains (``verify``); RIM signatures (load RIMs through
:func:`~ray_confidential.attestation.nvidia.rim.verify_rim_signature` before putting them in a
policy; a policy is trusted as a whole); GPU CC mode and OCSP status.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ray_confidential.attestation.claims import VerifiedClaims, Violation
from ray_confidential.attestation.nvidia.abi import NONCE_SIZE
from ray_confidential.attestation.nvidia.rim import ReferenceManifest, parse_rim
from ray_confidential.attestation.reference import (
    MeasurementPins,
    is_pinned,
    measurement_pins,
    reference_bytes,
)

TEE = "nvidia-gpu"
DIGEST_SIZE = 48


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Reference values for an H100 GPU. ``None`` / empty = not checked.

    Attributes:
        measurements: allow-list of measurement-record digests (claim ``measurement``, 48 bytes), from
            :func:`measurement_pins`; mandatory (``UNSAFE_ANY_MEASUREMENT`` to rely on RIMs alone).
        expected_nonce: the 32-byte SPDM requester nonce derived from the CPU session.
        measurement_values: exact values by SPDM index (1..254 -> 48 bytes).
        rims: reference manifests; those matching the report's driver / VBIOS version are compared.
        require_rim: refuse a report when no RIM matches its driver version or its VBIOS version.
        driver_versions: accepted driver versions (e.g. {"550.90.07"}).
        vbios_versions: accepted VBIOS versions, case-insensitive (e.g. {"96.00.9f.00.01"}).
        allow_debug: accepted for symmetry with other TEEs; GPU claims never report debug.
    """

    measurements: MeasurementPins
    expected_nonce: bytes | None = None
    measurement_values: Mapping[int, bytes] | None = None
    rims: tuple[ReferenceManifest, ...] = ()
    require_rim: bool = False
    driver_versions: frozenset[str] | None = None
    vbios_versions: frozenset[str] | None = None
    allow_debug: bool = False

    def __post_init__(self) -> None:
        if is_pinned(self.measurements):
            if not isinstance(self.measurements, frozenset):
                raise TypeError("measurements must come from measurement_pins([...])")
            if any(len(p) != DIGEST_SIZE for p in self.measurements):
                raise ValueError(f"measurement pins are {DIGEST_SIZE}-byte digests (96 hex digits)")
        if self.expected_nonce is not None and (
            not isinstance(self.expected_nonce, bytes) or len(self.expected_nonce) != NONCE_SIZE
        ):
            raise ValueError(f"expected_nonce must be {NONCE_SIZE} bytes")
        if self.measurement_values is not None:
            for index, value in self.measurement_values.items():
                if type(index) is not int or not 1 <= index <= 254:
                    raise ValueError(f"measurement index must be 1..254, got {index!r}")
                if not isinstance(value, bytes) or not 1 <= len(value) <= 128:
                    raise ValueError(f"measurement {index} must be 1..128 bytes")
            object.__setattr__(self, "measurement_values", MappingProxyType(dict(self.measurement_values)))
        object.__setattr__(self, "rims", tuple(self.rims))
        if not all(isinstance(r, ReferenceManifest) for r in self.rims):
            raise TypeError("rims must be ReferenceManifest objects (parse_rim / verify_rim_signature)")
        for name in ("driver_versions", "vbios_versions"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str) or not value:
                    raise ValueError(f"{name} must be a non-empty collection of version strings")
                object.__setattr__(self, name, frozenset(v.lower() for v in value))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        """Build from plain data (YAML/JSON). Bytes as hex; ``rims`` as RIM XML text (parsed, not
        signature-checked: verify RIMs with ``verify_rim_signature`` before writing them into a policy).

        Example: ``{"measurements": "UNSAFE_ANY", "require_rim": true, "rims": [xml, xml],
        "expected_nonce": "<64 hex>"}``.
        """
        known = {
            "measurements",
            "expected_nonce",
            "measurement_values",
            "rims",
            "require_rim",
            "driver_versions",
            "vbios_versions",
            "allow_debug",
        }
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown nvidia-gpu policy key(s) {sorted(unknown)}; known: {sorted(known)}")
        if "measurements" not in d:
            raise ValueError("nvidia-gpu policy needs 'measurements' (or 'UNSAFE_ANY' to rely on RIMs alone)")
        raw = d["measurements"]
        for flag in ("require_rim", "allow_debug"):
            if not isinstance(d.get(flag, False), bool):
                raise ValueError(f"{flag} must be true or false")
        values = d.get("measurement_values")
        nonce = d.get("expected_nonce")
        rims = d.get("rims", ())
        if isinstance(rims, str | bytes):
            raise ValueError("rims must be a list of RIM XML documents")

        def versions(name: str) -> frozenset[str] | None:
            v = d.get(name)
            return None if v is None else frozenset(str(x) for x in v)

        return cls(
            measurements=measurement_pins(raw if raw == "UNSAFE_ANY" else list(raw)),
            expected_nonce=None if nonce is None else reference_bytes(nonce, "expected_nonce"),
            measurement_values=None
            if values is None
            else {int(k): reference_bytes(v, f"measurement_values[{k}]") for k, v in values.items()},
            rims=tuple(parse_rim(r.encode() if isinstance(r, str) else r) for r in rims),
            require_rim=d.get("require_rim", False),
            driver_versions=versions("driver_versions"),
            vbios_versions=versions("vbios_versions"),
            allow_debug=d.get("allow_debug", False),
        )


def _hex(value: object) -> str:
    return value.hex() if isinstance(value, bytes) else "null"


def compare_rims(claims: VerifiedClaims, rims: tuple[ReferenceManifest, ...]) -> list[Violation]:
    """nvtrust-style comparison of the report's measurements with the RIMs given (already selected)."""
    out: list[Violation] = []
    golden: dict[int, tuple[ReferenceManifest, tuple[bytes, ...]]] = {}
    for rim in rims:
        for m in rim.measurements:
            if not m.active:
                continue
            if m.index in golden:
                out.append(
                    Violation(
                        field=f"measurement_{m.index + 1}",
                        got=f"claimed by RIMs {golden[m.index][0].version} and {rim.version}",
                        want="one RIM per index",
                    )
                )
                continue
            golden[m.index] = (rim, m.values)
    for index, (rim, values) in sorted(golden.items()):
        got = claims.measurements.get(f"measurement_{index + 1}")
        if got not in values:
            want = "one of [" + ", ".join(v.hex() for v in values) + f"] (RIM {rim.version})"
            out.append(Violation(field=f"measurement_{index + 1}", got=_hex(got), want=want))
    return out


def validate_claims(claims: VerifiedClaims, policy: Policy) -> list[Violation]:
    """Compare verified GPU claims with ``policy``; return every violation (empty list = acceptable)."""
    out: list[Violation] = []
    details = claims.details
    if claims.tee != TEE:
        out.append(Violation(field="tee", got=claims.tee, want=TEE))
    if claims.debug and not policy.allow_debug:
        out.append(Violation(field="debug", got="true", want="false"))
    if policy.expected_nonce is not None and claims.report_data != policy.expected_nonce:
        out.append(Violation(field="nonce", got=claims.report_data.hex(), want=policy.expected_nonce.hex()))
    if isinstance(policy.measurements, frozenset):
        got = claims.measurements.get("measurement")
        if got not in policy.measurements:
            want = "one of [" + ", ".join(sorted(p.hex() for p in policy.measurements)) + "]"
            out.append(Violation(field="measurement", got=_hex(got), want=want))
    for index, value in (policy.measurement_values or {}).items():
        got = claims.measurements.get(f"measurement_{index}")
        if got != value:
            out.append(Violation(field=f"measurement_{index}", got=_hex(got), want=value.hex()))
    driver = details.get("driver_version")
    vbios = details.get("vbios_version")
    if policy.driver_versions is not None and str(driver).lower() not in policy.driver_versions:
        out.append(
            Violation(
                field="driver_version", got=str(driver), want=f"one of {sorted(policy.driver_versions)}"
            )
        )
    if policy.vbios_versions is not None and str(vbios).lower() not in policy.vbios_versions:
        out.append(
            Violation(field="vbios_version", got=str(vbios), want=f"one of {sorted(policy.vbios_versions)}")
        )
    driver_rims = tuple(r for r in policy.rims if r.matches_version(driver))
    vbios_rims = tuple(r for r in policy.rims if r.matches_version(vbios))
    if policy.require_rim:
        if not driver_rims:
            out.append(Violation(field="driver_rim", got=str(driver), want="a RIM for this driver version"))
        if not vbios_rims:
            out.append(Violation(field="vbios_rim", got=str(vbios), want="a RIM for this VBIOS version"))
    selected = tuple(dict.fromkeys(driver_rims + vbios_rims))
    if selected:
        out.extend(compare_rims(claims, selected))
    return out
