"""Validate verified SEV-SNP claims against reference values; collects every violation.

    >>> from ray_confidential.attestation.claims import VerifiedClaims
    >>> claims = VerifiedClaims(tee="sev-snp", debug=True, report_data=bytes(64),
    ...     measurements={"measurement": bytes(48)},
    ...     details={"vmpl": 1, "policy": 0xB0000, "guest_svn": 0, "product": "Milan", "signing_key": "vcek",
    ...              "reported_tcb": {"bl": 2, "tee": 0, "snp": 5, "ucode": 68}, "chip_id": bytes(64),
    ...              "host_data": bytes(32), "family_id": bytes(16), "image_id": bytes(16)})
    >>> [v.field for v in validate_claims(claims, Policy(measurements=measurement_pins([bytes(48)])))]
    ['debug', 'vmpl']

Reference values follow AMD doc 56860 (GUEST_POLICY, VMPL, TCB_VERSION) and go-sev-guest
``validate.Options``. A field set to None is not checked.

What this module does NOT check: signatures, certificates, the VCEK/TCB binding (``verify`` does);
that ``report_data`` binds this session's nonce and key (the attest layer computes the expected value;
pass it as ``report_data`` here only when you have it); whether the TCB is current (AMD publishes no
TCB status: use ``min_tcb``); ID block / author key policies beyond their digests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ray_confidential.attestation.claims import VerifiedClaims, Violation
from ray_confidential.attestation.reference import (
    MeasurementPins,
    UnsafeAnyMeasurement,
    is_pinned,
    measurement_pins,
)
from ray_confidential.attestation.snp import abi
from ray_confidential.attestation.snp.abi import TCBVersion

_TCB_COMPONENTS = ("fmc", "bl", "tee", "snp", "ucode")


def _hex_bytes(value: bytes | str, size: int, name: str) -> bytes:
    raw = bytes.fromhex(value) if isinstance(value, str) else bytes(value)
    if len(raw) != size:
        raise ValueError(f"{name} must be {size} bytes ({2 * size} hex digits), got {len(raw)}")
    return raw


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """SEV-SNP reference values. Sizes are in bytes; ``None`` = not checked.

    Attributes:
        measurements: allow-list of 48-byte MEASUREMENT values (launch digest), from
            :func:`~ray_confidential.attestation.reference.measurement_pins`; required.
        report_data: exact 64-byte REPORT_DATA (usually checked by the attest layer).
        host_data: exact 32-byte HOST_DATA.
        family_id / image_id: exact 16-byte FAMILY_ID / IMAGE_ID of the ID block.
        vmpl: exact VMPL (0..3). Default 0: a less-privileged VMPL can ask for reports with its own data.
        allow_debug: accept POLICY.DEBUG (the host can read guest memory). Default False.
        allow_smt: accept POLICY.SMT (guest may run with SMT on). Default True (cloud default).
        allow_migration_agent: accept POLICY.MIGRATE_MA. Default False.
        min_tcb: per-component minimum of REPORTED_TCB (``bl``, ``tee``, ``snp``, ``ucode``; ``fmc`` is
            checked only on Turin).
        min_guest_svn: minimum GUEST_SVN (u32).
        chip_ids: allow-list of 64-byte CHIP_IDs (residency pinning to known machines).
        products: allowed product lines ("Milan", "Genoa", "Turin").
        signing_keys: allowed endorsement keys ("vcek", "vlek").
    """

    measurements: MeasurementPins
    report_data: bytes | None = None
    host_data: bytes | None = None
    family_id: bytes | None = None
    image_id: bytes | None = None
    vmpl: int | None = 0
    allow_debug: bool = False
    allow_smt: bool = True
    allow_migration_agent: bool = False
    min_tcb: TCBVersion | None = None
    min_guest_svn: int | None = None
    chip_ids: frozenset[bytes] | None = None
    products: frozenset[str] | None = None
    signing_keys: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.measurements, frozenset | UnsafeAnyMeasurement):
            raise TypeError("measurements must come from measurement_pins([...]) (or UNSAFE_ANY_MEASUREMENT)")
        if isinstance(self.measurements, frozenset):
            if not self.measurements:
                raise ValueError("empty measurement allow-list; use measurement_pins([...])")
            for m in self.measurements:
                _hex_bytes(m, abi.MEASUREMENT_SIZE, "measurement")
        for name, size in (
            ("report_data", abi.REPORT_DATA_SIZE),
            ("host_data", abi.HOST_DATA_SIZE),
            ("family_id", abi.FAMILY_ID_SIZE),
            ("image_id", abi.IMAGE_ID_SIZE),
        ):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _hex_bytes(value, size, name))
        if self.vmpl is not None and self.vmpl not in (0, 1, 2, 3):
            raise ValueError(f"vmpl must be 0..3 or None, got {self.vmpl!r}")
        if self.min_guest_svn is not None and not 0 <= self.min_guest_svn < 1 << 32:
            raise ValueError("min_guest_svn must be a u32")
        if self.chip_ids is not None:
            if not self.chip_ids:
                raise ValueError("empty chip_ids allow-list; use None to not check chip ids")
            object.__setattr__(
                self, "chip_ids", frozenset(_hex_bytes(c, abi.CHIP_ID_SIZE, "chip id") for c in self.chip_ids)
            )
        if isinstance(self.min_tcb, Mapping):
            object.__setattr__(self, "min_tcb", TCBVersion.from_mapping(self.min_tcb))
        if self.min_tcb is not None and not isinstance(self.min_tcb, TCBVersion):
            raise TypeError("min_tcb must be a TCBVersion or a mapping {bl, tee, snp, ucode[, fmc]}")
        if self.products is not None and (not self.products or not self.products <= set(abi.PRODUCTS)):
            raise ValueError(f"products must be a non-empty subset of {list(abi.PRODUCTS)}")
        if self.signing_keys is not None and (
            not self.signing_keys or not self.signing_keys <= {"vcek", "vlek"}
        ):
            raise ValueError('signing_keys must be a non-empty subset of {"vcek", "vlek"}')

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        """Build from a YAML/JSON mapping: byte fields as hex strings, ``measurements`` a list of hex
        (or ``"UNSAFE_ANY"``), ``min_tcb`` a mapping ``{bl, tee, snp, ucode[, fmc]}``, sets as lists.

        Raises:
            ValueError: unknown key (the message lists the known ones) or a bad value.
        """
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SEV-SNP policy key(s) {sorted(unknown)}; known: {sorted(known)}")
        if "measurements" not in d:
            raise ValueError("SEV-SNP policy needs 'measurements': a list of 48-byte hex values")
        kw: dict[str, Any] = {"measurements": measurement_pins(d["measurements"])}
        for name, size in (("report_data", 64), ("host_data", 32), ("family_id", 16), ("image_id", 16)):
            if d.get(name) is not None:
                kw[name] = _hex_bytes(d[name], size, name)
        for name in ("vmpl", "min_guest_svn"):
            if name in d:
                if d[name] is not None and (isinstance(d[name], bool) or not isinstance(d[name], int)):
                    raise ValueError(f"{name} must be an integer or null, got {d[name]!r}")
                kw[name] = d[name]
        for name in ("allow_debug", "allow_smt", "allow_migration_agent"):
            if name in d:
                if not isinstance(d[name], bool):
                    raise ValueError(f"{name} must be true or false, got {d[name]!r}")
                kw[name] = d[name]
        if d.get("min_tcb") is not None:
            if not isinstance(d["min_tcb"], Mapping):
                raise ValueError("min_tcb must be a mapping like {bl: 3, tee: 0, snp: 8, ucode: 115}")
            kw["min_tcb"] = TCBVersion.from_mapping(d["min_tcb"])
        if d.get("chip_ids") is not None:
            kw["chip_ids"] = frozenset(
                _hex_bytes(c, abi.CHIP_ID_SIZE, "chip id") for c in _as_list(d["chip_ids"])
            )
        for name in ("products", "signing_keys"):
            if d.get(name) is not None:
                kw[name] = frozenset(str(x) for x in _as_list(d[name]))
        return cls(**kw)


def _as_list(v: Any) -> Iterable[Any]:
    if isinstance(v, str | bytes) or not isinstance(v, Iterable):
        raise ValueError(f"expected a list, got {v!r}")
    return v


def _one_of(values: Iterable[bytes]) -> str:
    return "one of [" + ", ".join(sorted(v.hex() for v in values)) + "]"


def validate_claims(claims: VerifiedClaims, policy: Policy) -> list[Violation]:
    """Every mismatch between verified SEV-SNP ``claims`` and ``policy`` (empty list = acceptable).

    Raises:
        ValueError: ``claims`` are not SEV-SNP claims.
    """
    if claims.tee != "sev-snp":
        raise ValueError(f"validate_claims(sev-snp) got {claims.tee!r} claims")
    d = claims.details
    out: list[Violation] = []

    def bad(field: str, got: object, want: str) -> None:
        out.append(Violation(field=field, got=got.hex() if isinstance(got, bytes) else str(got), want=want))

    pol = int(d["policy"])
    if claims.debug and not policy.allow_debug:
        bad("debug", "true", "false (POLICY.DEBUG set: the host can read guest memory)")
    measurement = bytes(claims.measurements["measurement"])
    if is_pinned(policy.measurements):
        assert isinstance(policy.measurements, frozenset)
        if measurement not in policy.measurements:
            bad("measurement", measurement, _one_of(policy.measurements))
    if policy.report_data is not None and claims.report_data != policy.report_data:
        bad("report_data", claims.report_data, policy.report_data.hex())
    for name in ("host_data", "family_id", "image_id"):
        want = getattr(policy, name)
        if want is not None and bytes(d[name]) != want:
            bad(name, bytes(d[name]), want.hex())
    if policy.vmpl is not None and d["vmpl"] != policy.vmpl:
        bad("vmpl", d["vmpl"], str(policy.vmpl))
    if pol >> abi.POLICY_SMT_BIT & 1 and not policy.allow_smt:
        bad("policy.smt", "allowed", "not allowed")
    if pol >> abi.POLICY_MIGRATE_MA_BIT & 1 and not policy.allow_migration_agent:
        bad("policy.migrate_ma", "allowed", "no migration agent")
    if policy.min_tcb is not None:
        got_tcb: Mapping[str, int] = d["reported_tcb"]
        want_tcb = policy.min_tcb.as_dict()
        for comp in _TCB_COMPONENTS:
            if comp not in want_tcb or comp not in got_tcb:
                continue  # fmc exists on Turin only
            if got_tcb[comp] < want_tcb[comp]:
                bad(f"reported_tcb.{comp}", got_tcb[comp], f">= {want_tcb[comp]}")
    if policy.min_guest_svn is not None and d["guest_svn"] < policy.min_guest_svn:
        bad("guest_svn", d["guest_svn"], f">= {policy.min_guest_svn}")
    if policy.chip_ids is not None and bytes(d["chip_id"]) not in policy.chip_ids:
        bad("chip_id", bytes(d["chip_id"]), _one_of(policy.chip_ids))
    if policy.products is not None and d["product"] not in policy.products:
        bad("product", d["product"], "one of " + ", ".join(sorted(policy.products)))
    if policy.signing_keys is not None and d["signing_key"] not in policy.signing_keys:
        bad("signing_key", d["signing_key"], "one of " + ", ".join(sorted(policy.signing_keys)))
    return out
