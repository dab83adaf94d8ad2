"""Verify an AWS Nitro Enclaves attestation document: certificate chain, then COSE signature.

Follows aws-nitro-enclaves-nsm-api ``docs/attestation_process.md`` section 3.2.3 (chain from the
``certificate`` through the reversed ``cabundle`` to its first entry, the root) and section 3.2.1
(ES384 signature of the COSE_Sign1 Sig_structure). Stops at the first failure.

    >>> from datetime import datetime, timezone
    >>> from ray_confidential.attestation.trust import TrustConfig
    >>> from ray_confidential.testing.nitro_fake import NitroTestRoot, build_evidence
    >>> root = NitroTestRoot.generate()
    >>> fake = build_evidence(root, report_data=b"binding")
    >>> trust = TrustConfig.development([root.root_certificate])
    >>> claims = verify_evidence(fake.evidence, trust=trust, now=datetime.now(timezone.utc))
    >>> claims.tee, claims.report_data
    ('nitro', b'binding')

What it checks: the root ``cabundle[0]`` is self-signed and allow-listed by fingerprint; every
certificate is within its validity period at ``now`` (the root too); each is signed by the next;
CA certificates have basicConstraints CA (critical), keyCertSign and a path length that allows the
chain; the leaf is not a CA, may sign (digitalSignature) and holds a P-384 key that verifies the
ES384 signature over the exact payload bytes.

What it does NOT check: revocation (AWS publishes no CRL for the attestation PKI; the spec says to
disable CRL checks), freshness of ``timestamp`` or ``nonce`` (the caller's binding does that), PCR
values and debug mode (``validate``), extensions other than the ones above, name constraints.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ray_confidential.attestation.claims import VerifiedClaims
from ray_confidential.attestation.nitro.abi import NitroDocument, parse_document
from ray_confidential.attestation.trust import TrustConfig, certificate_errors_are_format_errors, fingerprint
from ray_confidential.errors import AttestationError, EvidenceFormatError

TEE = "nitro"
_HALF = 48  # ES384: r and s are 48 bytes each (RFC 8152 section 8.1)


def _fail(msg: str) -> AttestationError:
    return AttestationError(f"nitro: {msg}")


def _check_now(now: datetime) -> None:
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime, e.g. datetime.now(timezone.utc)")


def _load_der(der: bytes, what: str) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(der)
        # cryptography parses some fields lazily: touch every one we use, so that a malformed
        # certificate is a format error here and never a stray ValueError later.
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        _ = cert.extensions, cert.not_valid_before_utc, cert.not_valid_after_utc
        _ = cert.signature_hash_algorithm, cert.public_key()
        return cert
    except (
        ValueError,
        UnsupportedAlgorithm,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
        x509.InvalidVersion,
    ) as exc:
        raise EvidenceFormatError(f"nitro: {what} is not a DER certificate") from exc


def _check_validity(cert: x509.Certificate, now: datetime, what: str) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise _fail(
            f"{what} is not valid at {now.isoformat()} "
            f"(valid {cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()})"
        )


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise _fail(f"{what} is not signed by the next certificate in the chain") from exc


def _extension(
    cert: x509.Certificate, kind: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType] | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension) as exc:  # duplicate or malformed extensions
        raise EvidenceFormatError(f"nitro: malformed certificate extensions: {exc}") from exc


def _check_ca(cert: x509.Certificate, cas_below: int, what: str) -> None:
    """Sections 3.2.3.2-3: basicConstraints CA (critical), pathLen allows ``cas_below`` CAs, keyCertSign."""
    bc = _extension(cert, x509.BasicConstraints)
    if bc is None or not bc.critical or not isinstance(bc.value, x509.BasicConstraints) or not bc.value.ca:
        raise _fail(f"{what} is not a CA certificate (basicConstraints)")
    if bc.value.path_length is not None and cas_below > bc.value.path_length:
        raise _fail(f"{what} path length constraint {bc.value.path_length} exceeded")
    ku = _extension(cert, x509.KeyUsage)
    if ku is None or not isinstance(ku.value, x509.KeyUsage) or not ku.value.key_cert_sign:
        raise _fail(f"{what} may not sign certificates (keyUsage)")


def _check_leaf(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    bc = _extension(cert, x509.BasicConstraints)
    if bc is not None and isinstance(bc.value, x509.BasicConstraints) and bc.value.ca:
        raise _fail("leaf certificate is a CA")
    ku = _extension(cert, x509.KeyUsage)
    if ku is not None and isinstance(ku.value, x509.KeyUsage) and not ku.value.digital_signature:
        raise _fail("leaf certificate may not sign (keyUsage)")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise _fail("leaf certificate key is not ECDSA P-384")
    return key


class _ChainCache:
    """Chains whose signatures and constraints verified, keyed by the SHA-256 of every DER in order.

    Only time-independent, trust-independent results are cached: the allow-list and the validity
    period at ``now`` are checked on every call. The key covers the leaf, so a result is never
    reused for another leaf certificate. Bounded (least recently used out first).
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._items: OrderedDict[bytes, tuple[x509.Certificate, ...]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(ders: Sequence[bytes]) -> bytes:
        h = hashlib.sha256()
        for der in ders:
            h.update(len(der).to_bytes(4, "big") + der)
        return h.digest()

    def get(self, key: bytes) -> tuple[x509.Certificate, ...] | None:
        with self._lock:
            chain = self._items.get(key)
            if chain is not None:
                self._items.move_to_end(key)
            return chain

    def put(self, key: bytes, chain: tuple[x509.Certificate, ...]) -> None:
        with self._lock:
            self._items[key] = chain
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_CHAIN_CACHE = _ChainCache()


def _what(i: int, cert: x509.Certificate) -> str:
    return "leaf certificate" if i == 0 else f"chain certificate {i} ({cert.subject.rfc4514_string()})"


def verify_chain(doc: NitroDocument, *, trust: TrustConfig, now: datetime) -> tuple[x509.Certificate, ...]:
    """Verify ``certificate`` <- reversed ``cabundle`` (section 3.2.3) at ``now``.

    Returns:
        The chain, leaf first, root last.

    Raises:
        EvidenceFormatError: a certificate is not DER.
        AttestationError: root not allow-listed or not self-signed, bad signature, expired, constraints.
    """
    _check_now(now)
    d = doc.document
    ders = (d.certificate, *reversed(d.cabundle))
    key = _CHAIN_CACHE.key(ders)
    cached = _CHAIN_CACHE.get(key)
    if cached is None:
        chain = (
            _load_der(d.certificate, "certificate"),
            *(_load_der(c, f"cabundle[{len(ders) - 1 - i}]") for i, c in enumerate(ders[1:], 1)),
        )
    else:
        chain = cached
    root = chain[-1]
    # (1) The root must be one we trust (by fingerprint; per call: trust configurations differ).
    if not trust.is_allowed_root(root):
        raise _fail(f"root certificate {fingerprint(root)} is not allow-listed")
    # (2) Every certificate is valid at `now` (per call: time moves).
    for i, cert in enumerate(chain):
        _check_validity(cert, now, _what(i, cert))
    if cached is not None:
        return cached
    # (3) The root is really self-signed; each certificate is signed by the next one up, and CA
    #     certificates carry the constraints of sections 3.2.3.2-3.
    _check_signed_by(root, root, "root certificate")
    for i, cert in enumerate(chain):
        if i > 0:
            _check_ca(cert, cas_below=i - 1, what=_what(i, cert))
        if i + 1 < len(chain):
            _check_signed_by(cert, chain[i + 1], _what(i, cert))
    # (4) The leaf is an end-entity P-384 signing key.
    _check_leaf(chain[0])
    _CHAIN_CACHE.put(key, chain)
    return chain


def verify_signature(doc: NitroDocument, leaf: x509.Certificate) -> None:
    """Verify the ES384 signature over the Sig_structure (RFC 8152 section 4.4) with the leaf key.

    Raises:
        AttestationError: the signature does not verify.
    """
    key = _check_leaf(leaf)
    r = int.from_bytes(doc.signature[:_HALF], "big")
    s = int.from_bytes(doc.signature[_HALF:], "big")
    try:
        key.verify(encode_dss_signature(r, s), doc.signed_bytes(), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise _fail("COSE_Sign1 signature does not verify") from exc


def claims_of(doc: NitroDocument, chain: Sequence[x509.Certificate]) -> VerifiedClaims:
    """Claims of a verified document. ``debug`` is True when PCR0 is all zeros (a debug enclave)."""
    d = doc.document
    pcr0 = d.pcrs.get(0)
    return VerifiedClaims(
        tee=TEE,
        debug=pcr0 is not None and not any(pcr0),
        report_data=d.user_data or b"",
        measurements={f"pcr{i}": v for i, v in d.pcrs.items()},
        root_fingerprint=fingerprint(chain[-1]),
        details={
            "module_id": d.module_id,
            "digest": d.digest,
            "timestamp": d.timestamp,
            "nonce": d.nonce,
            "public_key": d.public_key,
            "user_data_present": d.user_data is not None,
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
    """Parse and verify a Nitro attestation document (raw COSE_Sign1 or base64).

    Args:
        evidence: the document as the NSM returns it, or its base64 text.
        trust: allow-listed roots (production: the AWS Nitro Enclaves root G1).
        certs: ignored: the document carries its whole chain in ``cabundle``.
        collateral: ignored (Nitro has none).
        now: the time at which every certificate must be valid (timezone-aware).

    Raises:
        EvidenceFormatError: not a well-formed document.
        AttestationError: chain or signature failure.
    """
    del certs, collateral  # the document is self-contained (attestation_process.md section 3.2.3)
    _check_now(now)
    doc = parse_document(evidence)  # (1) parse
    chain = verify_chain(doc, trust=trust, now=now)  # (2) chain to an allow-listed root
    verify_signature(doc, chain[0])  # (3) COSE signature by the leaf
    return claims_of(doc, chain)
