"""A tiny backend obeying the backend contract, for testing the attest() layer on its own.

Evidence: JSON {tee, report_data, measurement, debug, nonce} || 64-byte Ed25519 signature by a
self-signed root whose DER travels in ``certs``. ``install(monkeypatch, tee)`` points the registry
at it for one TEE kind.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from ray_confidential.attestation import registry
from ray_confidential.attestation.claims import VerifiedClaims, Violation
from ray_confidential.attestation.reference import MeasurementPins, measurement_pins
from ray_confidential.attestation.trust import TrustConfig, fingerprint
from ray_confidential.errors import AttestationError, EvidenceFormatError


class FakeRoot:
    def __init__(self) -> None:
        self.key = ed25519.Ed25519PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake backend root")])
        now = datetime.now(timezone.utc)
        self.root_certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(1)
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1))
            .sign(self.key, None)
        )

    def evidence(
        self,
        tee: str,
        *,
        report_data: bytes,
        measurement: bytes = b"\x11" * 48,
        debug: bool = False,
        **extra: Any,
    ) -> tuple[bytes, bytes]:
        body = json.dumps(
            {"tee": tee, "report_data": report_data.hex(), "measurement": measurement.hex(), "debug": debug}
            | {k: v.hex() for k, v in extra.items()}
        ).encode()
        return body + self.key.sign(body), self.root_certificate.public_bytes(Encoding.DER)


def make_module(tee: str) -> types.ModuleType:
    module = types.ModuleType(f"fake_backend_{tee.replace('-', '_')}")

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Policy:
        measurements: MeasurementPins
        allow_debug: bool = False

        @classmethod
        def from_dict(cls, d: dict[str, Any]) -> Policy:
            return cls(
                measurements=measurement_pins(d["measurements"]),
                allow_debug=bool(d.get("allow_debug", False)),
            )

    def verify_evidence(
        evidence: bytes,
        *,
        trust: TrustConfig,
        certs: Sequence[bytes] = (),
        collateral: bytes | None = None,
        now: datetime,
    ) -> VerifiedClaims:
        if len(evidence) < 65:
            raise EvidenceFormatError("fake: truncated")
        body, sig = evidence[:-64], evidence[-64:]
        try:
            fields = json.loads(body)
            cert = x509.load_der_x509_certificate(certs[0])
        except (ValueError, IndexError) as exc:
            raise EvidenceFormatError(f"fake: {exc}") from None
        if fields.get("tee") != tee:
            raise EvidenceFormatError(f"fake: not {tee} evidence")
        if not trust.is_allowed_root(cert):
            raise AttestationError("fake: root not allow-listed")
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise AttestationError("fake: root expired")
        try:
            cert.public_key().verify(sig, body)  # type: ignore[call-arg, union-attr]
        except InvalidSignature:
            raise AttestationError("fake: bad signature") from None
        details = {"nonce": bytes.fromhex(fields["nonce"])} if "nonce" in fields else {}
        return VerifiedClaims(
            tee=tee,
            debug=fields["debug"],
            report_data=bytes.fromhex(fields["report_data"]),
            measurements={"measurement": bytes.fromhex(fields["measurement"])},
            root_fingerprint=fingerprint(cert),
            details=details,
        )

    def validate_claims(claims: VerifiedClaims, policy: Policy) -> list[Violation]:
        out = []
        if claims.debug and not policy.allow_debug:
            out.append(Violation(field="debug", got="true", want="false"))
        if (
            isinstance(policy.measurements, frozenset)
            and claims.measurements["measurement"] not in policy.measurements
        ):
            out.append(
                Violation(
                    field="measurement",
                    got=claims.measurements["measurement"].hex(),
                    want=f"one of [{', '.join(sorted(m.hex() for m in policy.measurements))}]",
                )
            )
        return out

    module.TEE = tee  # type: ignore[attr-defined]
    module.Policy = Policy  # type: ignore[attr-defined]
    module.verify_evidence = verify_evidence  # type: ignore[attr-defined]
    module.validate_claims = validate_claims  # type: ignore[attr-defined]
    return module


def install(monkeypatch: Any, *tees: str) -> None:
    """Point the registry at a fake backend for each of ``tees`` (undone by monkeypatch)."""
    for tee in tees:
        module = make_module(tee)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(registry.BACKENDS, tee, module.__name__)
