"""Verify an SEV-SNP attestation report: the VCEK/VLEK signature and the AMD chain to an allow-listed ARK.

    >>> from ray_confidential.testing.snp_fake import SNPTestRoot, build_evidence
    >>> from ray_confidential.attestation.trust import TrustConfig
    >>> from datetime import datetime, timezone
    >>> root = SNPTestRoot.generate()
    >>> ev = build_evidence(root, report_data=bytes(64))
    >>> claims = verify_evidence(ev.evidence, certs=ev.certs, now=datetime.now(timezone.utc),
    ...                          trust=TrustConfig.development([root.root_certificate]))
    >>> claims.details["product"], claims.details["signing_key"]
    ('Milan', 'vcek')

What is checked, in order, stopping at the first failure (AMD doc 56860 "ATTESTATION_REPORT", doc 57230
"VCEK Certificate and KDS Interface", after go-sev-guest ``verify.SnpAttestation``):

1. The evidence parses (report, optional GHCB certificate table) and the report is signed (SIGNING_KEY
   is VCEK or VLEK).
2. Certificates come from the certificate table and from ``certs`` (DER or PEM, any order); the
   endorsement key is the VCEK whose hwID equals CHIP_ID (or the VLEK, whose ASVK issued it).
3. The ARK is self-signed, its SHA-256 fingerprint is allow-listed in the :class:`TrustConfig`; ARK ->
   ASK/ASVK -> VCEK/VLEK signatures are RSASSA-PSS SHA-384 (salt 48) with RSA-4096 issuers that are CAs;
   every certificate is valid at ``now``.
4. The product line agrees across ARK ("ARK-<P>"), ASK ("SEV-<P>"/"SEV-VLEK-<P>"), the VCEK productName
   extension and, from report v3, the report's CPUID family/model.
5. If ``collateral`` holds AMD KDS CRLs (DER or PEM): one issued by the ARK verifies, is current at
   ``now`` and revokes neither the ASK/ASVK nor the leaf.
6. REPORTED_TCB equals the TCB in the leaf's extensions (blSPL, teeSPL, snpSPL, ucodeSPL, spl4-7, and
   fmcSPL on Turin, in that product's TCB_VERSION layout).
7. The ECDSA P-384 / SHA-384 signature over bytes 0x000..0x29F verifies with the leaf key.

What this module does NOT check: any reference value (measurement, VMPL, policy bits, debug, minimum
TCB, chip allow-list: see ``validate``); whether the TCB is current (AMD publishes no TCB status, so
``tcb_status`` is ``unknown``); revocation when no CRL is supplied (nothing is fetched); report_data
binding (the attest layer's job); the ID block / author key signatures (only their digests are reported).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from ray_confidential.attestation.claims import TCB_UNKNOWN, VerifiedClaims
from ray_confidential.attestation.snp.abi import (
    GUID_ARK,
    GUID_ASK,
    GUID_VCEK,
    GUID_VLEK,
    PRODUCTS,
    SIGNED_SIZE,
    SIGNING_KEY_VCEK,
    SIGNING_KEY_VLEK,
    SNPReport,
    TCBVersion,
    split_evidence,
)
from ray_confidential.attestation.trust import TrustConfig, certificate_errors_are_format_errors, fingerprint
from ray_confidential.attestation.x509chain import (
    LRUCache,
    der,
    der_digest,
    not_valid_error,
    require_aware,
    valid_at,
)
from ray_confidential.errors import AttestationError, EvidenceFormatError

TEE = "sev-snp"

# AMD doc 57230, "VCEK Certificate Extensions": 1.3.6.1.4.1.3704.1.*
_AMD_OID = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = x509.ObjectIdentifier(f"{_AMD_OID}.1")
OID_PRODUCT_NAME = x509.ObjectIdentifier(f"{_AMD_OID}.2")
OID_BL_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.1")
OID_TEE_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.2")
OID_SNP_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.3")
OID_SPL4 = x509.ObjectIdentifier(f"{_AMD_OID}.3.4")
OID_SPL5 = x509.ObjectIdentifier(f"{_AMD_OID}.3.5")
OID_SPL6 = x509.ObjectIdentifier(f"{_AMD_OID}.3.6")
OID_SPL7 = x509.ObjectIdentifier(f"{_AMD_OID}.3.7")
OID_UCODE_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.8")
OID_FMC_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.9")  # Turin and later
OID_HWID = x509.ObjectIdentifier(f"{_AMD_OID}.4")  # VCEK only
OID_CSP_ID = x509.ObjectIdentifier(f"{_AMD_OID}.5")  # VLEK only

AMD_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
"""RSASSA-PSS parameters of every AMD ARK/ASK/ASVK signature (57230: SHA-384, MGF1-SHA-384, salt 48)."""
AMD_RSA_BITS = 4096
P384_ORDER = (
    0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
)
MAX_CERT_ITEMS = 64
MAX_CERT_BYTES = 1 << 20


# --- certificate loading ------------------------------------------------------------------------------
def _load_der(der: bytes) -> x509.Certificate:
    # AMD issues VCEKs with serial number 0: cryptography warns; silence exactly that warning here.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="Parsed a serial number which wasn't positive",
            category=CryptographyDeprecationWarning,
        )
        return x509.load_der_x509_certificate(der)


def load_certificates(items: Sequence[bytes]) -> list[x509.Certificate]:
    """Certificates from DER or PEM items (a PEM item may hold several), deduplicated, order kept.

    Raises:
        EvidenceFormatError: an item is neither a DER certificate nor PEM with at least one certificate.
    """
    if isinstance(items, bytes | bytearray):
        raise TypeError("certs must be a sequence of bytes items, e.g. certs=[vcek_der, chain_pem]")
    if len(items) > MAX_CERT_ITEMS:
        raise EvidenceFormatError(f"too many certificate items ({len(items)} > {MAX_CERT_ITEMS})")
    out: dict[bytes, x509.Certificate] = {}
    for item in items:
        if not isinstance(item, bytes | bytearray | memoryview):
            raise TypeError(f"each certs item must be bytes (DER or PEM), not {type(item).__name__}")
        data = bytes(item)
        if len(data) > MAX_CERT_BYTES:
            raise EvidenceFormatError("certificate item too large")
        try:
            if b"-----BEGIN" in data:
                ders = [_load_der(c.public_bytes(Encoding.DER)) for c in _load_pems(data)]
            else:
                ders = [_load_der(data)]
        except (ValueError, TypeError) as exc:
            raise EvidenceFormatError(f"malformed certificate: {exc}") from None
        for cert in ders:
            out.setdefault(cert.public_bytes(Encoding.DER), cert)
    return list(out.values())


def _load_pems(data: bytes) -> list[x509.Certificate]:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="Parsed a serial number which wasn't positive",
            category=CryptographyDeprecationWarning,
        )
        return x509.load_pem_x509_certificates(data)


# --- minimal DER for the KDS extension values (57230: INTEGER, IA5String, OCTET STRING) --------------
def _der_single(value: bytes, tag: int) -> bytes:
    """Content of the single DER TLV ``value`` with ``tag`` (definite length, nothing left over)."""
    if len(value) < 2 or value[0] != tag:
        raise ValueError(f"expected DER tag 0x{tag:02x}")
    n = value[1]
    pos = 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 2 or len(value) < 2 + k:
            raise ValueError("bad DER length")
        n = int.from_bytes(value[2 : 2 + k], "big")
        pos = 2 + k
    if pos + n != len(value):
        raise ValueError("DER length does not match the value")
    return value[pos:]


def _ext_value(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    val = ext.value
    if not isinstance(val, x509.UnrecognizedExtension):
        raise ValueError(f"unexpected extension type for {oid.dotted_string}")
    return val.value


def _ext_u8(cert: x509.Certificate, oid: x509.ObjectIdentifier, *, required: bool) -> int:
    raw = _ext_value(cert, oid)
    if raw is None:
        if required:
            raise ValueError(f"missing KDS extension {oid.dotted_string}")
        return 0
    content = _der_single(raw, 0x02)
    if not content:
        raise ValueError("empty DER INTEGER")
    v = int.from_bytes(content, "big", signed=True)
    if not 0 <= v <= 255:
        raise ValueError(f"KDS extension {oid.dotted_string} is not a u8: {v}")
    return v


@dataclass(frozen=True, slots=True, kw_only=True)
class EndorsementExtensions:
    """The AMD extensions of a VCEK or VLEK certificate (57230)."""

    product_name: str  # e.g. "Milan-B0", "Genoa", "Turin"
    product: str  # the line: "Milan" / "Genoa" / "Turin"
    hwid: bytes | None  # VCEK: 64 bytes (8 on Turin)
    csp_id: str | None  # VLEK
    tcb: int  # the TCB_VERSION these SPLs compose, in the product's layout

    @property
    def kind(self) -> str:
        return "vcek" if self.hwid is not None else "vlek"


def endorsement_extensions(cert: x509.Certificate) -> EndorsementExtensions:
    """Read the KDS extensions of a VCEK/VLEK certificate.

    Raises:
        ValueError: an extension is missing or malformed, the product is unknown, or both/neither of
            hwID and CSP_ID are present.
    """
    pn_raw = _ext_value(cert, OID_PRODUCT_NAME)
    if pn_raw is None:
        raise ValueError("missing productName extension")
    product_name = _der_single(pn_raw, 0x16).decode("ascii")
    product = product_name.split("-", 1)[0]
    if product not in PRODUCTS:
        raise ValueError(f"unknown SEV-SNP product name {product_name!r}")
    hwid_raw = _ext_value(cert, OID_HWID)
    hwid: bytes | None = None
    if hwid_raw is not None:
        # KDS writes the hwID bare (57230); accept a DER OCTET STRING too, as go-sev-guest does.
        hwid = hwid_raw if len(hwid_raw) in (8, 64) else _der_single(hwid_raw, 0x04)
        if len(hwid) != (8 if product == "Turin" else 64):
            raise ValueError(f"hwID has {len(hwid)} bytes for a {product} VCEK")
    csp_raw = _ext_value(cert, OID_CSP_ID)
    csp_id = _der_single(csp_raw, 0x16).decode("ascii") if csp_raw is not None else None
    if (hwid is None) == (csp_id is None):
        raise ValueError("an endorsement key certificate has exactly one of hwID (VCEK) and CSP_ID (VLEK)")
    bl = _ext_u8(cert, OID_BL_SPL, required=True)
    tee = _ext_u8(cert, OID_TEE_SPL, required=True)
    snp = _ext_u8(cert, OID_SNP_SPL, required=True)
    ucode = _ext_u8(cert, OID_UCODE_SPL, required=True)
    spl = [_ext_u8(cert, oid, required=False) for oid in (OID_SPL4, OID_SPL5, OID_SPL6, OID_SPL7)]
    if product == "Turin":
        fmc = _ext_u8(cert, OID_FMC_SPL, required=True)
        layout = [fmc, bl, tee, snp, spl[1], spl[2], spl[3], ucode]
    else:
        layout = [bl, tee, spl[0], spl[1], spl[2], spl[3], snp, ucode]
    return EndorsementExtensions(
        product_name=product_name,
        product=product,
        hwid=hwid,
        csp_id=csp_id,
        tcb=int.from_bytes(bytes(layout), "little"),
    )


# --- chain ----------------------------------------------------------------------------------------------
def _cn(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _check_ca(cert: x509.Certificate, role: str) -> None:
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != AMD_RSA_BITS:
        raise AttestationError(f"{role} {_cn(cert)!r} must hold an RSA-{AMD_RSA_BITS} key")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise AttestationError(f"{role} {_cn(cert)!r} has no basicConstraints") from None
    if not bc.ca:
        raise AttestationError(f"{role} {_cn(cert)!r} is not a CA")


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate, role: str) -> None:
    """``cert`` carries an RSASSA-PSS SHA-384 signature by ``issuer`` (AMD's only certificate algorithm)."""
    if cert.issuer != issuer.subject:
        raise AttestationError(f"{role} {_cn(cert)!r} was not issued by {_cn(issuer)!r}")
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS or not isinstance(
        cert.signature_hash_algorithm, hashes.SHA384
    ):
        raise AttestationError(f"{role} {_cn(cert)!r} is not signed with RSASSA-PSS SHA-384")
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise AttestationError(f"issuer of {role} {_cn(cert)!r} has no RSA key")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, AMD_PSS, hashes.SHA384())
    except InvalidSignature:
        raise AttestationError(
            f"{role} {_cn(cert)!r}: signature by {_cn(issuer)!r} does not verify"
        ) from None


def verify_endorsement_chain(
    leaf: x509.Certificate,
    intermediate: x509.Certificate,
    root: x509.Certificate,
    *,
    trust: TrustConfig,
    now: datetime,
) -> str:
    """Verify VCEK/VLEK <- ASK/ASVK <- ARK at ``now`` and return the product line.

    Raises:
        AttestationError: the ARK is not allow-listed or not self-signed, a signature or validity
            period fails, a key or CA flag is wrong, or the product names disagree.
    """
    require_aware(now, error=TypeError)
    if not trust.is_allowed_root(root):
        raise AttestationError(f"ARK {_cn(root)!r} (sha256 {fingerprint(root)}) is not an allow-listed root")
    # Signatures and names are a pure function of the three certificates: cache successes keyed by the
    # digest of all three DER encodings (never reused across leaves). Validity is checked every time.
    key = der_digest(der(c) for c in (leaf, intermediate, root))
    product = _CHAIN_CACHE.get(key)
    if product is None:
        product = _verify_chain_signatures(leaf, intermediate, root)
        _CHAIN_CACHE.put(key, product)
    for cert, role in ((root, "ARK"), (intermediate, "ASK"), (leaf, "VCEK/VLEK")):
        if not valid_at(cert, now):
            raise not_valid_error(cert, now, what=f"{role} certificate {_cn(cert)!r}")
    return product


CHAIN_CACHE_SIZE = 256
"""Verified ARK/ASK/VCEK triples remembered per process (least recently used dropped first)."""
_CHAIN_CACHE: LRUCache[bytes, str] = LRUCache(CHAIN_CACHE_SIZE)


def _verify_chain_signatures(
    leaf: x509.Certificate, intermediate: x509.Certificate, root: x509.Certificate
) -> str:
    _check_ca(root, "ARK")
    _check_signed_by(root, root, "ARK")
    _check_ca(intermediate, "ASK")
    _check_signed_by(intermediate, root, "ASK")
    leaf_key = leaf.public_key()
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or not isinstance(leaf_key.curve, ec.SECP384R1):
        raise AttestationError("the VCEK/VLEK must hold an ECDSA P-384 key")
    _check_signed_by(leaf, intermediate, "VCEK/VLEK")
    try:
        ext = endorsement_extensions(leaf)
    except ValueError as exc:
        raise AttestationError(f"VCEK/VLEK extensions: {exc}") from None
    want_ask = f"SEV-{ext.product}" if ext.kind == "vcek" else f"SEV-VLEK-{ext.product}"
    if _cn(root) != f"ARK-{ext.product}" or _cn(intermediate) != want_ask:
        raise AttestationError(
            f"product mismatch: {ext.kind.upper()} says {ext.product_name!r}, chain is "
            f"{_cn(intermediate)!r} <- {_cn(root)!r}"
        )
    return ext.product


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedReport:
    """A report whose signature and chain verified, with what the chain said about it."""

    report: SNPReport
    product: str
    signing_key: str  # "vcek" / "vlek"
    reported_tcb: TCBVersion
    leaf: x509.Certificate
    intermediate: x509.Certificate
    root: x509.Certificate


def _select_leaf(
    report: SNPReport, certs: list[x509.Certificate]
) -> tuple[x509.Certificate, EndorsementExtensions]:
    kind = "vcek" if report.signing_key == SIGNING_KEY_VCEK else "vlek"
    candidates: list[tuple[x509.Certificate, EndorsementExtensions]] = []
    for cert in certs:
        if not isinstance(cert.public_key(), ec.EllipticCurvePublicKey):
            continue
        try:
            ext = endorsement_extensions(cert)
        except ValueError:
            continue
        if ext.kind == kind:
            candidates.append((cert, ext))
    if not candidates:
        raise AttestationError(
            f"no {kind.upper()} certificate supplied: pass it in certs (AMD KDS) or in the extended report"
        )
    if kind == "vcek" and not report.mask_chip_key:
        candidates = [(c, e) for c, e in candidates if _hwid_matches(e.hwid, report.chip_id)]
        if not candidates:
            raise AttestationError(f"no VCEK certificate for CHIP_ID {report.chip_id.hex()} (hwID differs)")
    matching = [(c, e) for c, e in candidates if e.tcb == report.reported_tcb]
    if not matching:
        got = candidates[0][1]
        raise AttestationError(
            f"REPORTED_TCB 0x{report.reported_tcb:016x} != {kind.upper()} TCB 0x{got.tcb:016x}"
        )
    if len(matching) > 1:
        raise AttestationError(
            f"ambiguous: {len(matching)} different {kind.upper()} certificates match the report"
        )
    return matching[0]


def _hwid_matches(hwid: bytes | None, chip_id: bytes) -> bool:
    # Turin hwIDs are 8 bytes; the report's CHIP_ID carries them in its first 8 bytes, the rest zero.
    return hwid is not None and chip_id[: len(hwid)] == hwid and not any(chip_id[len(hwid) :])


def _find_issuer(cert: x509.Certificate, certs: list[x509.Certificate], role: str) -> x509.Certificate:
    want = cert.issuer
    found = []
    for c in certs:
        if c is cert or (subject := c.subject) != want:
            continue
        if (c.issuer == subject) == (role == "ARK") and isinstance(c.public_key(), rsa.RSAPublicKey):
            found.append(c)
    if not found:
        raise AttestationError(
            f"no {role} certificate issued {_cn(cert)!r}: pass AMD's cert_chain (ASK/ASVK + ARK) in certs"
        )
    if len(found) > 1:
        raise AttestationError(
            f"ambiguous: {len(found)} different {role} certificates named {_cn(found[0])!r}"
        )
    return found[0]


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def _check_crls(
    collateral: bytes, ark: x509.Certificate, revocable: list[x509.Certificate], now: datetime
) -> None:
    try:
        if b"-----BEGIN" in collateral:
            crls = [x509.load_pem_x509_crl(m.group(0)) for m in _PEM_CRL.finditer(collateral)]
            if not crls:
                raise ValueError("no X509 CRL PEM block")
        else:
            crls = [x509.load_der_x509_crl(collateral)]
    except ValueError as exc:
        raise EvidenceFormatError(f"SEV-SNP collateral is not an AMD CRL (DER or PEM): {exc}") from None
    ours = [c for c in crls if c.issuer == ark.subject]
    if not ours:
        raise AttestationError(f"collateral holds no CRL issued by {_cn(ark)!r}")
    key = ark.public_key()
    assert isinstance(key, rsa.RSAPublicKey)  # checked by _check_ca
    for crl in ours:
        try:
            key.verify(crl.signature, crl.tbs_certlist_bytes, AMD_PSS, hashes.SHA384())
        except InvalidSignature:
            raise AttestationError(f"CRL signature by {_cn(ark)!r} does not verify") from None
        if crl.last_update_utc > now or (crl.next_update_utc is not None and crl.next_update_utc < now):
            raise AttestationError(f"CRL of {_cn(ark)!r} is not current at {now.isoformat()}")
        for cert in revocable:
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                raise AttestationError(f"certificate {_cn(cert)!r} (serial {cert.serial_number}) is revoked")


def verify_report(
    report: SNPReport,
    certs: Sequence[x509.Certificate],
    *,
    trust: TrustConfig,
    now: datetime,
    collateral: bytes | None = None,
) -> VerifiedReport:
    """Steps 1-7 of the module docstring for a parsed report and a pool of certificates.

    Raises:
        AttestationError: first failed check.
        EvidenceFormatError: the collateral is not a CRL.
    """
    require_aware(now, error=TypeError)
    # (1) A signed report.
    if report.signing_key not in (SIGNING_KEY_VCEK, SIGNING_KEY_VLEK):
        raise AttestationError("the SEV-SNP report is not signed (SIGNING_KEY = none)")
    if report.mask_chip_key and any(report.chip_id):
        raise AttestationError("MASK_CHIP_KEY is set but CHIP_ID is not zero")
    # (2) Endorsement key, its issuer and the root from the pool.
    pool = list(certs)
    leaf, ext = _select_leaf(report, pool)
    intermediate = _find_issuer(leaf, pool, "ASK/ASVK")
    root = _find_issuer(intermediate, pool, "ARK")
    # (3) Chain to an allow-listed ARK, (4) product names.
    product = verify_endorsement_chain(leaf, intermediate, root, trust=trust, now=now)
    cpuid_product = report.cpuid_product
    if report.cpuid_fam_id is not None and cpuid_product != product:
        raise AttestationError(
            f"report CPUID family 0x{report.cpuid_fam_id:02x} model 0x{report.cpuid_mod_id or 0:02x} "
            f"is not a {product} part"
        )
    # (5) Revocation, when CRLs are supplied.
    if collateral is not None:
        _check_crls(bytes(collateral), root, [intermediate, leaf], now)
    # (6) REPORTED_TCB vs the certificate (already matched in _select_leaf; kept explicit here).
    if ext.tcb != report.reported_tcb:
        raise AttestationError("REPORTED_TCB does not match the VCEK/VLEK TCB")
    # (7) The report signature.
    r, s = report.signature_r, report.signature_s
    if not (0 < r < P384_ORDER and 0 < s < P384_ORDER):
        raise AttestationError("SEV-SNP report signature is out of range")
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)  # checked by verify_endorsement_chain
    try:
        key.verify(encode_dss_signature(r, s), report.to_bytes()[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError(
            f"SEV-SNP report signature does not verify with the {ext.kind.upper()}"
        ) from None
    return VerifiedReport(
        report=report,
        product=product,
        signing_key=ext.kind,
        reported_tcb=TCBVersion.decode(report.reported_tcb, product=product),
        leaf=leaf,
        intermediate=intermediate,
        root=root,
    )


_TABLE_GUIDS = (GUID_VCEK, GUID_VLEK, GUID_ASK, GUID_ARK)


@certificate_errors_are_format_errors
def verify_evidence(
    evidence: bytes,
    *,
    trust: TrustConfig,
    certs: Sequence[bytes] = (),
    collateral: bytes | None = None,
    now: datetime,
) -> VerifiedClaims:
    """Parse and verify SEV-SNP evidence; the backend entry point (see the package docstring).

    Args:
        evidence: the 1184-byte report, optionally followed by the extended report's certificate table.
        trust: allow-listed ARK fingerprints.
        certs: VCEK/VLEK, ASK/ASVK, ARK as DER or PEM items in any order (added to the table's).
        collateral: AMD KDS CRL(s), DER or PEM; None = no revocation check.
        now: the time at which certificates must be valid (timezone-aware).

    Raises:
        EvidenceFormatError: evidence, certificates or collateral do not parse.
        AttestationError: a signature, chain, validity, TCB or product check fails.
    """
    require_aware(now, error=TypeError)
    report, table = split_evidence(evidence)
    items: list[bytes] = [blob for guid, blob in table if guid in _TABLE_GUIDS]
    pool = load_certificates([*items, *certs])
    try:
        verified = verify_report(report, pool, trust=trust, now=now, collateral=collateral)
    except (UnsupportedAlgorithm, ValueError) as exc:  # defensive: odd keys in supplied certificates
        raise AttestationError(f"SEV-SNP verification failed: {exc}") from None
    return claims_from_verified(verified)


def _tcb_dict(raw: int, product: str) -> dict[str, int]:
    return TCBVersion.decode(raw, product=product).as_dict()


def claims_from_verified(v: VerifiedReport) -> VerifiedClaims:
    """The :class:`VerifiedClaims` of a verified report (``details`` keys: see the package docstring)."""
    r = v.report
    details: dict[str, Any] = {
        "version": r.version,
        "vmpl": r.vmpl,
        "policy": r.policy,
        "guest_svn": r.guest_svn,
        "reported_tcb": v.reported_tcb.as_dict(),
        "current_tcb": _tcb_dict(r.current_tcb, v.product),
        "committed_tcb": _tcb_dict(r.committed_tcb, v.product),
        "launch_tcb": _tcb_dict(r.launch_tcb, v.product),
        "chip_id": r.chip_id,
        "product": v.product,
        "signing_key": v.signing_key,
        "host_data": r.host_data,
        "family_id": r.family_id,
        "image_id": r.image_id,
        "id_key_digest": r.id_key_digest,
        "author_key_digest": r.author_key_digest,
        "report_id": r.report_id,
        "platform_info": r.platform_info,
        "smt_allowed": r.smt_allowed,
        "migrate_ma": r.migrate_ma,
        "firmware": f"{r.current_major}.{r.current_minor}.{r.current_build}",
        "vcek_sha256": hashlib.sha256(v.leaf.public_bytes(Encoding.DER)).hexdigest(),
    }
    return VerifiedClaims(
        tee=TEE,
        debug=r.debug,
        report_data=r.report_data,
        measurements={"measurement": r.measurement},
        tcb_status=TCB_UNKNOWN,
        root_fingerprint=fingerprint(v.root),
        details=details,
    )
