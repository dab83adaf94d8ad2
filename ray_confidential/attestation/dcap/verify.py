"""Verify a DCAP quote: PCK chain, QE report, attestation key binding, quote signature, collateral.

Steps (Intel "SGX ECDSA Quote Library API" A.4 / "TDX DCAP QVL" quote verification; the same order as
Phala-Network/dcap-qvl ``verify_impl``):

1. parse the quote; the QE vendor must be Intel;
2. PCK chain (certification data type 5, or ``certs``) to a self-signed, allow-listed root, valid at ``now``;
3. QE report signature by the PCK leaf key;
4. QE report data == SHA-256(attestation key || QE authentication data) || 32 zero bytes;
5. quote signature by the attestation key over header (+ v5 body descriptor) + body;
6. with collateral: TCB info and QE identity signatures (over their exact bytes), their issuer chains,
   root and PCK CRLs (signature, ``thisUpdate``/``nextUpdate``, every chain certificate not revoked),
   ``issueDate``/``nextUpdate`` windows, QE identity match, platform TCB level (+ TDX module identity);
   the merged TCB status and advisory IDs. "Revoked" and "no matching TCB level" fail.

    >>> from ray_confidential.testing.dcap_fake import DCAPTestRoot, build_evidence
    >>> from datetime import datetime, timezone
    >>> from ray_confidential.attestation.trust import TrustConfig
    >>> root = DCAPTestRoot.generate()
    >>> ev = build_evidence(root, tee="sgx", report_data=bytes(64))
    >>> r = verify_quote(ev.evidence, trust=TrustConfig.development([root.root_certificate]),
    ...                  collateral=ev.collateral, now=datetime.now(timezone.utc))
    >>> r.tcb_status
    'UpToDate'

NOT checked here: the measurements, debug bits, report data binding and TD attributes of the
workload (that is validation, per TEE); without collateral, no CRL is consulted and the TCB status is
``unknown``. Results of chain and collateral checks are cached (keyed by the exact certificates /
collateral bytes and the allow-list, and only reused inside their validity window).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ray_confidential.attestation.claims import TCB_UNKNOWN
from ray_confidential.attestation.trust import TrustConfig, fingerprint
from ray_confidential.attestation.x509chain import (
    LRUCache,
    WindowCache,
    der,
    is_ca,
    not_valid_error,
    valid_at,
)
from ray_confidential.errors import AttestationError, EvidenceFormatError

from .abi import CERT_DATA_TYPE_PCK_CERT_CHAIN, INTEL_QE_VENDOR_ID, Quote, TDReport10
from .collateral import (
    QEIdentity,
    QuoteCollateralV3,
    TcbInfo,
    TcbStatus,
    match_platform_tcb,
    match_qe_identity,
)
from .pck import PCKExtension, pck_extension

_MAX_CHAIN_DEPTH = 5
_MAX_CERTS = 16


def _utc(now: datetime) -> datetime:
    if not isinstance(now, datetime):
        raise TypeError("now must be a datetime, e.g. datetime.now(timezone.utc)")
    return now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)


# --- certificates ---------------------------------------------------------------------------------


def load_certificates(items: Iterable[bytes | str]) -> list[x509.Certificate]:
    """DER or PEM items (each PEM item may hold several certificates) -> certificates.

    Raises:
        EvidenceFormatError: an item is neither a DER certificate nor PEM with certificates.
    """
    out: list[x509.Certificate] = []
    for item in items:
        out.extend(_parse_certificate_item(item.encode() if isinstance(item, str) else bytes(item)))
        if len(out) > _MAX_CERTS:
            raise EvidenceFormatError("too many certificates")
    return out


@functools.lru_cache(maxsize=256)
def _parse_certificate_item(data: bytes) -> tuple[x509.Certificate, ...]:
    """Parse one DER or PEM item. A pure function of the bytes, so equal items share one parse
    (errors are not cached); no verification result is cached here."""
    try:
        if b"-----BEGIN" in data:
            certs = tuple(x509.load_pem_x509_certificates(data.rstrip(b"\0")))
        else:
            certs = (x509.load_der_x509_certificate(data),)
        for cert in certs:  # cryptography parses lazily: force every field we read, once, here
            _ = (cert.subject, cert.issuer, cert.extensions, cert.serial_number)
            _ = (cert.not_valid_before_utc, cert.not_valid_after_utc)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType, x509.InvalidVersion) as e:
        raise EvidenceFormatError(f"unparseable certificate: {e}") from e
    if len(certs) > _MAX_CERTS:
        raise EvidenceFormatError("too many certificates")
    return certs


def _digest(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(der(cert)).digest()


def _ecdsa_verify(key: object, signature_rs: bytes, data: bytes, what: str) -> None:
    """Verify a raw r||s P-256 ECDSA-SHA256 signature; raise AttestationError."""
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise AttestationError(f"{what}: key is not a P-256 key")
    if len(signature_rs) != 64:
        raise AttestationError(f"{what}: signature must be 64 bytes")
    der = encode_dss_signature(
        int.from_bytes(signature_rs[:32], "big"), int.from_bytes(signature_rs[32:], "big")
    )
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as e:
        raise AttestationError(f"{what}: signature does not verify") from e


def _public_key(cert: x509.Certificate) -> object:
    try:
        return cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise AttestationError(f"unsupported public key in {cert.subject.rfc4514_string()}") from e


def _spki(cert: x509.Certificate) -> bytes:
    """DER SubjectPublicKeyInfo (compares CA keys, not just names)."""
    key = _public_key(cert)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise AttestationError(f"{cert.subject.rfc4514_string()} does not hold an EC key")
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedChain:
    """A certificate path leaf..root whose signatures verified, valid in [valid_from, valid_until]."""

    certs: tuple[x509.Certificate, ...]
    root_fingerprint: str
    valid_from: datetime
    valid_until: datetime

    @property
    def leaf(self) -> x509.Certificate:
        return self.certs[0]


_CHAIN_CACHE: WindowCache[tuple[object, ...], VerifiedChain] = WindowCache()


def verify_chain(
    leaf: x509.Certificate, pool: Sequence[x509.Certificate], *, trust: TrustConfig, now: datetime, what: str
) -> VerifiedChain:
    """Build and verify leaf -> ... -> self-signed allow-listed root, each certificate valid at ``now``.

    Cached by (leaf, pool, allow-list); a cached path is reused only while ``now`` is inside every
    certificate's validity.

    Raises:
        AttestationError: no path, bad signature, expired / not yet valid, root not allow-listed.
    """
    now = _utc(now)
    key = (_digest(leaf), tuple(sorted(_digest(c) for c in pool)), trust.root_fingerprints)
    cached = _CHAIN_CACHE.get_at(key, now)
    if cached is not None:
        return cached
    path = [leaf]
    current = leaf
    for _ in range(_MAX_CHAIN_DEPTH):
        if current.issuer == current.subject and _issued_by(current, current):
            break
        issuer = next((c for c in pool if c.subject == current.issuer and _issued_by(current, c)), None)
        if issuer is None:
            raise AttestationError(f"{what}: no issuer certificate for {current.subject.rfc4514_string()}")
        if not is_ca(issuer):
            raise AttestationError(f"{what}: issuer {issuer.subject.rfc4514_string()} is not a CA")
        path.append(issuer)
        current = issuer
    else:
        raise AttestationError(f"{what}: certificate chain too long")
    root = path[-1]
    if not trust.is_allowed_root(root):
        raise AttestationError(
            f"{what}: root {root.subject.rfc4514_string()} (sha256 {fingerprint(root)}) is not allow-listed"
        )
    for cert in path:
        if not valid_at(cert, now):
            raise not_valid_error(cert, now, what=f"certificate {cert.subject.rfc4514_string()}", label=what)
    result = VerifiedChain(
        certs=tuple(path),
        root_fingerprint=fingerprint(root),
        valid_from=max(c.not_valid_before_utc for c in path),
        valid_until=min(c.not_valid_after_utc for c in path),
    )
    _CHAIN_CACHE.put(key, result)
    return result


# --- collateral -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedCollateral:
    """Collateral whose signatures, chains and CRLs verified, usable in [valid_from, valid_until]."""

    tcb_info: TcbInfo
    qe_identity: QEIdentity
    root_fingerprint: str
    root_crl: x509.CertificateRevocationList
    pck_crl: x509.CertificateRevocationList
    pck_crl_issuer: x509.Certificate
    valid_from: datetime
    valid_until: datetime


_COLLATERAL_CACHE: WindowCache[tuple[object, ...], VerifiedCollateral] = WindowCache()


def _load_crl(der: bytes, what: str) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_der_x509_crl(der)
        _ = (crl.issuer, crl.last_update_utc, crl.next_update_utc, [r.serial_number for r in crl])
        return crl
    except ValueError as e:
        raise EvidenceFormatError(f"DCAP collateral: {what} is not a DER CRL") from e


def _check_crl(
    crl: x509.CertificateRevocationList, issuer: x509.Certificate, now: datetime, what: str
) -> None:
    if crl.issuer != issuer.subject:
        raise AttestationError(f"{what}: CRL issuer does not match its issuer certificate")
    try:
        valid = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise AttestationError(f"{what}: CRL signature does not verify")
    nxt = crl.next_update_utc
    if nxt is None or not crl.last_update_utc <= now <= nxt:
        raise AttestationError(f"{what}: CRL is not current at {now.isoformat()}")


def _not_revoked(cert: x509.Certificate, crls: Sequence[x509.CertificateRevocationList], what: str) -> None:
    """The CRL of ``cert``'s issuer must be present (unknown status fails) and not list it."""
    crl = next((c for c in crls if c.issuer == cert.issuer), None)
    if crl is None:
        raise AttestationError(f"{what}: no CRL from {cert.issuer.rfc4514_string()} in the collateral")
    if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        raise AttestationError(f"{what}: certificate {cert.subject.rfc4514_string()} is revoked")


def _signed_chain(pem: str, trust: TrustConfig, now: datetime, what: str) -> VerifiedChain:
    certs = load_certificates([pem.encode()])
    if not certs:
        raise EvidenceFormatError(f"DCAP collateral: empty {what}")
    return verify_chain(certs[0], certs[1:], trust=trust, now=now, what=what)


def verify_collateral(collateral: bytes, *, trust: TrustConfig, now: datetime) -> VerifiedCollateral:
    """Verify QuoteCollateralV3 JSON bytes at ``now`` (cached by the exact bytes and the allow-list).

    Raises:
        EvidenceFormatError: malformed JSON, CRL, certificate or field.
        AttestationError: a signature, chain, CRL or date check failed.
    """
    now = _utc(now)
    key = (hashlib.sha256(bytes(collateral)).digest(), trust.root_fingerprints)
    cached = _COLLATERAL_CACHE.get_at(key, now)
    if cached is not None:
        return cached
    col = QuoteCollateralV3.from_bytes(collateral)
    tcb_info = TcbInfo.from_json(col.tcb_info)
    qe_identity = QEIdentity.from_json(col.qe_identity)
    root_crl = _load_crl(col.root_ca_crl, "root_ca_crl")
    pck_crl = _load_crl(col.pck_crl, "pck_crl")
    # TCB info (Intel PCS API: signature over the exact bytes of the tcbInfo object)
    if not tcb_info.issue_date <= now:
        raise AttestationError("TCB info issue date is in the future")
    if now > tcb_info.next_update:
        raise AttestationError(f"TCB info expired at {tcb_info.next_update.isoformat()}")
    if not qe_identity.issue_date <= now:
        raise AttestationError("QE identity issue date is in the future")
    if now > qe_identity.next_update:
        raise AttestationError(f"QE identity expired at {qe_identity.next_update.isoformat()}")
    tcb_chain = _signed_chain(col.tcb_info_issuer_chain, trust, now, "TCB info issuer chain")
    qe_chain = _signed_chain(col.qe_identity_issuer_chain, trust, now, "QE identity issuer chain")
    crl_chain = _signed_chain(col.pck_crl_issuer_chain, trust, now, "PCK CRL issuer chain")
    roots = {tcb_chain.root_fingerprint, qe_chain.root_fingerprint, crl_chain.root_fingerprint}
    if len(roots) != 1:
        raise AttestationError("collateral issuer chains end at different roots")
    root = tcb_chain.certs[-1]
    _check_crl(root_crl, root, now, "root CA CRL")
    _check_crl(pck_crl, crl_chain.leaf, now, "PCK CRL")
    crls = (root_crl, pck_crl)
    if root_crl.get_revoked_certificate_by_serial_number(root.serial_number) is not None:
        raise AttestationError("root CA is revoked by its own CRL")
    for chain in (tcb_chain, qe_chain, crl_chain):
        for cert in chain.certs[:-1]:
            _not_revoked(cert, crls, "collateral issuer chain")
    _ecdsa_verify(_public_key(tcb_chain.leaf), col.tcb_info_signature, col.tcb_info.encode(), "TCB info")
    _ecdsa_verify(
        _public_key(qe_chain.leaf), col.qe_identity_signature, col.qe_identity.encode(), "QE identity"
    )
    nexts = [tcb_info.next_update, qe_identity.next_update]
    nexts += [c.next_update_utc for c in crls if c.next_update_utc is not None]
    result = VerifiedCollateral(
        tcb_info=tcb_info,
        qe_identity=qe_identity,
        root_fingerprint=tcb_chain.root_fingerprint,
        root_crl=root_crl,
        pck_crl=pck_crl,
        pck_crl_issuer=crl_chain.leaf,
        valid_from=max(
            [tcb_info.issue_date, qe_identity.issue_date, root_crl.last_update_utc, pck_crl.last_update_utc]
            + [c.valid_from for c in (tcb_chain, qe_chain, crl_chain)]
        ),
        valid_until=min(nexts + [c.valid_until for c in (tcb_chain, qe_chain, crl_chain)]),
    )
    _COLLATERAL_CACHE.put(key, result)
    return result


# --- quote ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DCAPVerification:
    """What :func:`verify_quote` established.

    Attributes:
        quote: the parsed quote. pck: the PCK leaf's SGX extension. pck_chain: leaf..root.
        root_fingerprint: SHA-256 of the root's DER. tcb_status / advisories: merged platform + QE
        status (``unknown`` / () without collateral). platform_tcb_status, qe_tcb_status: the parts.
        collateral_expires: earliest ``nextUpdate`` of the collateral used, or None.
        tcb_evaluation_data_number: of the TCB info used, or None.
    """

    quote: Quote
    pck: PCKExtension
    pck_chain: tuple[x509.Certificate, ...]
    root_fingerprint: str
    tcb_status: str = TCB_UNKNOWN
    advisories: tuple[str, ...] = ()
    platform_tcb_status: str = TCB_UNKNOWN
    qe_tcb_status: str = TCB_UNKNOWN
    collateral_expires: datetime | None = None
    tcb_evaluation_data_number: int | None = None


def _pck_certs(quote: Quote, certs: Sequence[bytes]) -> tuple[x509.Certificate, list[x509.Certificate]]:
    cd = quote.signature_data.qe.certification_data
    extra = load_certificates(certs)
    if cd.cert_type == CERT_DATA_TYPE_PCK_CERT_CHAIN:
        embedded = load_certificates([cd.data])
        if not embedded:
            raise EvidenceFormatError("quote certification data holds no certificate")
        return embedded[0], embedded[1:] + extra
    leaves = [c for c in extra if not is_ca(c)]
    if not leaves:
        raise AttestationError(
            f"quote certification data type {cd.cert_type} carries no PCK chain; "
            "pass the PCK certificate in certs"
        )
    return leaves[0], [c for c in extra if c is not leaves[0]]


# Exact (PCK leaf, QE report, signature) inputs whose signature verified (a pure function of those bytes).
_QE_REPORT_CACHE: LRUCache[tuple[bytes, ...], bool] = LRUCache()


def clear_caches() -> None:
    """Drop every cached chain, collateral and QE report result (tests, or after a trust change)."""
    _CHAIN_CACHE.clear()
    _COLLATERAL_CACHE.clear()
    _QE_REPORT_CACHE.clear()


def cache_stats() -> dict[str, tuple[int, int]]:
    """(hits, misses) per cache."""
    return {
        "chain": (_CHAIN_CACHE.hits, _CHAIN_CACHE.misses),
        "collateral": (_COLLATERAL_CACHE.hits, _COLLATERAL_CACHE.misses),
        "qe_report": (_QE_REPORT_CACHE.hits, _QE_REPORT_CACHE.misses),
    }


def verify_quote(
    evidence: bytes | Quote,
    *,
    trust: TrustConfig,
    certs: Sequence[bytes] = (),
    collateral: bytes | None = None,
    now: datetime,
) -> DCAPVerification:
    """Verify a DCAP quote (SGX v3, TDX v4/v5); see the module docstring for the steps.

    Raises:
        EvidenceFormatError: the quote, a certificate or the collateral cannot be parsed.
        AttestationError: any signature, chain, CRL, date or TCB check failed (first failure).
    """
    now = _utc(now)
    # (1) parse
    quote = evidence if isinstance(evidence, Quote) else Quote.from_bytes(evidence)
    if quote.header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise AttestationError(f"unknown QE vendor {quote.header.qe_vendor_id.hex()}")
    sig = quote.signature_data
    # (2) PCK chain
    leaf, pool = _pck_certs(quote, certs)
    chain = verify_chain(leaf, pool, trust=trust, now=now, what="PCK chain")
    if is_ca(leaf):
        raise AttestationError("PCK leaf is a CA certificate")
    pck = pck_extension(leaf)
    # (3) QE report signed by the PCK key. The QE report (it binds the attestation key, not the
    # workload) repeats in every quote of a platform: a signature that verified is remembered under
    # the exact (PCK leaf, report, signature) bytes, so a different leaf or any changed byte verifies afresh.
    qe_report = sig.qe.qe_report.to_bytes()
    qe_key = (_digest(leaf), qe_report, sig.qe.qe_report_signature)
    if _QE_REPORT_CACHE.get(qe_key) is None:
        _ecdsa_verify(_public_key(leaf), sig.qe.qe_report_signature, qe_report, "QE report")
        _QE_REPORT_CACHE.put(qe_key, True)
    if sig.qe.qe_report.debug:
        raise AttestationError("the quoting enclave runs in debug mode")
    # (4) QE report binds the attestation key
    expected = hashlib.sha256(sig.attestation_key + sig.qe.qe_auth_data).digest() + bytes(32)
    if sig.qe.qe_report.report_data != expected:
        raise AttestationError("QE report data does not bind the attestation key")
    # (5) quote signature by the attestation key
    try:
        att_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + sig.attestation_key)
    except ValueError as e:
        raise AttestationError("attestation key is not a P-256 point") from e
    _ecdsa_verify(att_key, sig.signature, quote.signed_bytes(), "quote")
    if collateral is None:
        return DCAPVerification(
            quote=quote, pck=pck, pck_chain=chain.certs, root_fingerprint=chain.root_fingerprint
        )
    # (6) collateral
    col = verify_collateral(collateral, trust=trust, now=now)
    if col.root_fingerprint != chain.root_fingerprint:
        raise AttestationError("collateral and PCK chain end at different roots")
    if (
        len(chain.certs) < 2
        or leaf.issuer != col.pck_crl_issuer.subject
        or _spki(chain.certs[1]) != _spki(col.pck_crl_issuer)
    ):
        raise AttestationError("PCK CRL is not issued by the PCK leaf's CA")
    for cert in chain.certs[:-1]:
        _not_revoked(cert, (col.root_crl, col.pck_crl), "PCK chain")
    tdx = quote.is_tdx
    qe_status = match_qe_identity(col.qe_identity, sig.qe.qe_report, tdx=tdx)
    td = quote.body if isinstance(quote.body, TDReport10) else None
    platform = match_platform_tcb(
        col.tcb_info,
        tdx=tdx,
        cpu_svn=pck.cpu_svn,
        pce_svn=pck.pce_svn,
        fmspc=pck.fmspc,
        pce_id=pck.pce_id,
        td=td,
    )
    status, advisories = TcbStatus.merge(platform, qe_status)
    if status == "Revoked":
        raise AttestationError("TCB status is Revoked")
    return DCAPVerification(
        quote=quote,
        pck=pck,
        pck_chain=chain.certs,
        root_fingerprint=chain.root_fingerprint,
        tcb_status=status,
        advisories=advisories,
        platform_tcb_status=platform[0],
        qe_tcb_status=qe_status[0],
        collateral_expires=col.valid_until,
        tcb_evaluation_data_number=col.tcb_info.tcb_evaluation_data_number,
    )
