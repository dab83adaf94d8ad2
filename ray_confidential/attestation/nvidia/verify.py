"""Verify an NVIDIA H100 attestation report: device certificate chain, FWID binding, SPDM signature.

After NVIDIA/nvtrust's local GPU verifier (``verify_gpu_certificate_chain``,
``verify_attestation_report``). Stops at the first failure.

    >>> from datetime import datetime, timezone
    >>> from ray_confidential.attestation.trust import TrustConfig
    >>> from ray_confidential.testing.nvidia_fake import NVIDIATestRoot, build_evidence
    >>> root = NVIDIATestRoot.generate()
    >>> fake = build_evidence(root, report_data=b"\\x05" * 32)
    >>> claims = verify_evidence(fake.evidence, certs=fake.certs, now=datetime.now(timezone.utc),
    ...                          trust=TrustConfig.development([root.root_certificate]))
    >>> claims.tee, claims.report_data == b"\\x05" * 32
    ('nvidia-gpu', True)

What it checks: the device chain (passed as ``certs``: DER or PEM, any order) links the one
end-entity certificate to a self-signed root whose fingerprint is allow-listed (production: the
NVIDIA Device Identity CA); every certificate is valid at ``now`` and signed by its issuer; CA
certificates carry basicConstraints CA (critical) and keyCertSign and respect path lengths; the
leaf holds a P-384 key; when the report carries a FWID (opaque field 20) the leaf's TCG DICE
extension (2.23.133.5.4.1) ends with that FWID; the ECDSA P-384 / SHA-384 signature over
request || response-without-signature verifies with the leaf key.

What it does NOT check: OCSP revocation of the device certificates (NVIDIA's OCSP service needs the
network; there is no offline CRL), the requester nonce against a session (``validate`` with
``expected_nonce``, and the ``attest`` layer), measurement values and RIMs (``validate``),
GPU CC mode (the SPDM report does not carry it), the SPDM session transcript (the H100 report
is a single signed GET_MEASUREMENTS exchange).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from ray_confidential.attestation.claims import VerifiedClaims
from ray_confidential.attestation.nvidia.abi import GPUAttestationReport, parse_report
from ray_confidential.attestation.trust import TrustConfig, certificate_errors_are_format_errors, fingerprint
from ray_confidential.attestation.x509chain import (
    LRUCache,
    der,
    der_digest,
    is_ca,
    require_aware,
    touch,
    verify_path,
)
from ray_confidential.errors import AttestationError, EvidenceFormatError

TEE = "nvidia-gpu"
# TCG DICE "TcbInfo"-style extension NVIDIA puts in the attestation (leaf) certificate; it ends with
# the FWID as an OCTET STRING of 48 bytes (nvtrust compares the last 48 bytes).
OID_NVIDIA_FWID_EXTENSION = x509.ObjectIdentifier("2.23.133.5.4.1")
MAX_CHAIN_LENGTH = 8
MAX_CERT_BYTES = 64 * 1024
_HALF = 48


def _fail(msg: str) -> AttestationError:
    return AttestationError(f"nvidia-gpu: {msg}")


def load_certificates(items: Sequence[bytes]) -> list[x509.Certificate]:
    """Load DER or PEM certificates (a PEM item may hold several).

    Raises:
        EvidenceFormatError: an item is neither DER nor PEM certificates, or too large.
    """
    out: list[x509.Certificate] = []
    for item in items:
        if not isinstance(item, bytes | bytearray) or len(item) > MAX_CERT_BYTES:
            raise EvidenceFormatError("nvidia-gpu: each certificate item must be bytes of at most 64 KiB")
        try:
            if b"-----BEGIN" in item:
                out.extend(touch(c) for c in x509.load_pem_x509_certificates(bytes(item)))
            else:
                out.append(touch(x509.load_der_x509_certificate(bytes(item))))
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise EvidenceFormatError("nvidia-gpu: certificate is neither DER nor PEM") from exc
    if len(out) > MAX_CHAIN_LENGTH:
        raise EvidenceFormatError(f"nvidia-gpu: more than {MAX_CHAIN_LENGTH} certificates")
    return out


def order_chain(certs: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """Order certificates leaf first, following issuer names up to a self-signed root.

    Raises:
        AttestationError: no single end-entity certificate, a missing link, or a loop.
    """
    leaves = [c for c in certs if not is_ca(c, label=TEE)]
    if len(leaves) != 1:
        raise _fail(f"need exactly one end-entity (attestation) certificate, got {len(leaves)}")
    by_subject = {c.subject.public_bytes(): c for c in certs if is_ca(c, label=TEE)}
    chain = [leaves[0]]
    while chain[-1].issuer != chain[-1].subject:
        issuer = by_subject.get(chain[-1].issuer.public_bytes())
        if issuer is None:
            raise _fail(f"no certificate for issuer {chain[-1].issuer.rfc4514_string()}")
        if issuer in chain or len(chain) >= MAX_CHAIN_LENGTH:
            raise _fail("certificate chain loops or is too long")
        chain.append(issuer)
    return tuple(chain)


# Ordered chains whose signatures and constraints verified (x509chain steps 3-5), keyed by SHA-256
# over every DER in order: the key covers the leaf; allow-list and validity are checked per call.
_CHAIN_CACHE: LRUCache[bytes, tuple[x509.Certificate, ...]] = LRUCache()


def _what(i: int, cert: x509.Certificate) -> str:
    return f"{'leaf' if i == 0 else 'chain'} certificate {i} ({cert.subject.rfc4514_string()})"


def verify_chain(
    certs: Sequence[x509.Certificate], *, trust: TrustConfig, now: datetime
) -> tuple[x509.Certificate, ...]:
    """Order and verify the device chain at ``now``; return it leaf first.

    The root is allow-listed and self-signed, every certificate valid at ``now`` and signed by its
    issuer, CAs carry basicConstraints (critical) and keyCertSign, and the attestation certificate
    holds a P-384 signing key (:func:`~ray_confidential.attestation.x509chain.verify_path`).

    Raises:
        AttestationError: root not allow-listed or not self-signed, bad signature, expired, constraints.
    """
    require_aware(now)
    if not certs:
        raise _fail("no device certificates: pass the GPU's certificate chain as certs")
    chain = order_chain(certs)
    key = der_digest(der(c) for c in chain)
    verify_path(
        chain,
        trust=trust,
        now=now,
        label=TEE,
        cache=_CHAIN_CACHE,
        key=key,
        describe=_what,
        leaf_what="attestation certificate",
    )
    return chain


def verify_fwid(report: GPUAttestationReport, leaf: x509.Certificate) -> None:
    """The report's FWID (opaque field 20) must be the one in the leaf certificate (nvtrust
    ``verify_gpu_certificate_chain``). Reports without a FWID (older drivers) skip this check.

    Raises:
        AttestationError: the leaf has no FWID extension, or it differs.
    """
    fwid = report.fwid
    if fwid is None:
        return
    try:
        ext = leaf.extensions.get_extension_for_oid(OID_NVIDIA_FWID_EXTENSION).value
    except x509.ExtensionNotFound as exc:
        raise _fail("report carries a FWID but the attestation certificate has no FWID extension") from exc
    value = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    # The FWID is the final OCTET STRING of the extension: tag 0x04, length, bytes.
    if not fwid or len(fwid) > 127 or not value.endswith(bytes([0x04, len(fwid)]) + fwid):
        raise _fail("report FWID does not match the attestation certificate")


def verify_signature(report: GPUAttestationReport, leaf: x509.Certificate) -> None:
    """ECDSA P-384 over SHA-384 of request || response-without-signature.

    Raises:
        AttestationError: the signature does not verify.
    """
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _fail("attestation certificate key is not ECDSA")
    r = int.from_bytes(report.signature[:_HALF], "big")
    s = int.from_bytes(report.signature[_HALF:], "big")
    try:
        key.verify(encode_dss_signature(r, s), report.signed_bytes(), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise _fail("SPDM measurement signature does not verify") from exc


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def claims_of(report: GPUAttestationReport, chain: Sequence[x509.Certificate]) -> VerifiedClaims:
    """Claims of a verified report (see the package docstring for the keys)."""
    measurements = {f"measurement_{b.index}": b.value for b in report.blocks}
    measurements["measurement"] = report.measurement_digest
    return VerifiedClaims(
        tee=TEE,
        debug=False,  # not visible in the SPDM report (module docstring)
        report_data=report.requester_nonce,
        measurements=measurements,
        root_fingerprint=fingerprint(chain[-1]),
        details={
            "responder_nonce": report.responder_nonce,
            "driver_version": report.driver_version,
            "vbios_version": report.vbios_version,
            "fwid": report.fwid,
            "hw_model": _common_name(chain[1]) if len(chain) > 1 else "",
            "ueid": str(chain[0].serial_number),
            "leaf_fingerprint": fingerprint(chain[0]),
        },
    )


@certificate_errors_are_format_errors
def verify_evidence(
    evidence: bytes,
    *,
    trust: TrustConfig,
    certs: Sequence[bytes] = (),
    collateral: bytes | None = None,
    now: datetime,
) -> VerifiedClaims:
    """Parse and verify an H100 attestation report (raw or hex) with its device chain.

    Args:
        evidence: the report (request || response), raw or as hex text.
        trust: allow-listed roots (production: the NVIDIA Device Identity CA).
        certs: the GPU's device certificate chain: DER or PEM items, any order.
        collateral: ignored (RIMs are reference values: put them in the :class:`Policy`).
        now: time at which every certificate must be valid (timezone-aware).

    Raises:
        EvidenceFormatError: the report or a certificate is malformed.
        AttestationError: chain, FWID or signature failure.
    """
    del collateral
    require_aware(now)
    report = parse_report(evidence)  # (1) parse
    chain = verify_chain(load_certificates(certs), trust=trust, now=now)  # (2) chain
    verify_fwid(report, chain[0])  # (3) the report's firmware is the certified one
    verify_signature(report, chain[0])  # (4) signature by the attestation key
    return claims_of(report, chain)
