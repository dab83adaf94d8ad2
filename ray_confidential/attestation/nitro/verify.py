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
from ray_confidential.attestation.x509chain import (
    LRUCache,
    check_leaf,
    der_digest,
    require_aware,
    touch,
    verify_path,
)
from ray_confidential.errors import AttestationError, EvidenceFormatError

TEE = "nitro"
_HALF = 48  # ES384: r and s are 48 bytes each (RFC 8152 section 8.1)


def _fail(msg: str) -> AttestationError:
    return AttestationError(f"nitro: {msg}")


def _load_der(der: bytes, what: str) -> x509.Certificate:
    try:
        # cryptography parses some fields lazily: touch every one we use, so that a malformed
        # certificate is a format error here and never a stray ValueError later.
        return touch(x509.load_der_x509_certificate(der))
    except (
        ValueError,
        UnsupportedAlgorithm,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
        x509.InvalidVersion,
    ) as exc:
        raise EvidenceFormatError(f"nitro: {what} is not a DER certificate") from exc


# Chains whose signatures and constraints verified (x509chain steps 3-5), keyed by the SHA-256 of
# every DER in order: the key covers the leaf, and the allow-list and validity are checked per call.
_CHAIN_CACHE: LRUCache[bytes, tuple[x509.Certificate, ...]] = LRUCache()


def verify_chain(doc: NitroDocument, *, trust: TrustConfig, now: datetime) -> tuple[x509.Certificate, ...]:
    """Verify ``certificate`` <- reversed ``cabundle`` (section 3.2.3) at ``now``.

    The root ``cabundle[0]`` is allow-listed and self-signed, every certificate valid at ``now``, CA
    certificates carry the constraints of sections 3.2.3.2-3, and the leaf is an end-entity P-384
    signing key (:func:`~ray_confidential.attestation.x509chain.verify_path`).

    Returns:
        The chain, leaf first, root last.

    Raises:
        EvidenceFormatError: a certificate is not DER.
        AttestationError: root not allow-listed or not self-signed, bad signature, expired, constraints.
    """
    require_aware(now)
    d = doc.document
    ders = (d.certificate, *reversed(d.cabundle))
    key = der_digest(ders)
    chain = _CHAIN_CACHE.get(key)
    if chain is None:
        chain = (
            _load_der(d.certificate, "certificate"),
            *(_load_der(c, f"cabundle[{len(ders) - 1 - i}]") for i, c in enumerate(ders[1:], 1)),
        )
    verify_path(chain, trust=trust, now=now, label=TEE, cache=_CHAIN_CACHE, key=key)
    return chain


def verify_signature(doc: NitroDocument, leaf: x509.Certificate) -> None:
    """Verify the ES384 signature over the Sig_structure (RFC 8152 section 4.4) with the leaf key.

    Raises:
        AttestationError: the signature does not verify.
    """
    key = check_leaf(leaf, label=TEE)
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
    require_aware(now)
    doc = parse_document(evidence)  # (1) parse
    chain = verify_chain(doc, trust=trust, now=now)  # (2) chain to an allow-listed root
    verify_signature(doc, chain[0])  # (3) COSE signature by the leaf
    return claims_of(doc, chain)
