"""Simulated AWS Nitro Enclaves attestation documents, in the real COSE_Sign1 format.

A test hierarchy (P-384 root -> intermediate -> leaf, like AWS's root -> regional -> ... -> leaf)
is generated at run time; documents are signed with ES384 by its leaf and carry ``cabundle`` =
[root, intermediate], exactly as the NSM does (aws-nitro-enclaves-nsm-api
``docs/attestation_process.md``). They verify under ``TrustConfig.development([root.root_certificate])``
and fail under ``TrustConfig.production()`` (the test root is not allow-listed).

    >>> from datetime import datetime, timezone
    >>> from ray_confidential.attestation import nitro
    >>> from ray_confidential.attestation.trust import TrustConfig
    >>> root = NitroTestRoot.generate()
    >>> fake = build_evidence(root, report_data=b"\\x01" * 32)
    >>> nitro.verify_evidence(fake.evidence, trust=TrustConfig.development([root.root_certificate]),
    ...                       now=datetime.now(timezone.utc)).debug
    False

Break hooks (keyword arguments of :func:`build_evidence`, each breaks one property):
``bad_signature``, ``tamper_payload``, ``untrusted_root``, ``foreign_leaf``, ``drop_intermediate``,
``expired_leaf``, ``extra_field``, ``wrong_alg``.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from ray_confidential.attestation.nitro.abi import (
    COSE_ALG_ES384,
    COSE_HEADER_ALG,
    AttestationDocument,
    NitroDocument,
)
from ray_confidential.testing.evidence import FakeEvidence
from ray_confidential.testing.x509_fake import ThreeLevelPKI, issue, key_usage

TEE = "nitro"
DEFAULT_MEASUREMENT = hashlib.sha384(b"ray_confidential simulated nitro enclave image").digest()
_PCR1 = hashlib.sha384(b"ray_confidential simulated nitro kernel").digest()
_PCR2 = hashlib.sha384(b"ray_confidential simulated nitro application").digest()
_BREAKS = frozenset(
    {
        "bad_signature",
        "tamper_payload",
        "untrusted_root",
        "foreign_leaf",
        "drop_intermediate",
        "expired_leaf",
        "extra_field",
        "wrong_alg",
    }
)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ray_confidential test"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "simulated nitro"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    path_length: int | None,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    return issue(
        _name(subject),
        key,
        issuer,
        issuer_key,
        not_before=not_before,
        not_after=not_after,
        extensions=[
            (x509.BasicConstraints(ca=ca, path_length=path_length), True),
            (key_usage(ca=ca, digital_signature=True, content_commitment=not ca), ca),
            (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
        ],
        algorithm=hashes.SHA384(),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class NitroTestRoot(ThreeLevelPKI):
    """A run-time generated Nitro-like PKI: root, one intermediate, one document-signing leaf.

    Private keys never appear in ``repr``; :meth:`to_pem` / :meth:`from_pem` move the whole
    hierarchy to another process as launch data.
    """

    @classmethod
    def generate(
        cls, *, now: datetime | None = None, leaf_lifetime: timedelta = timedelta(days=7)
    ) -> NitroTestRoot:
        """Fresh P-384 keys. The root and intermediate are valid for 10 years from ``now`` - 1 day; the
        leaf for ``leaf_lifetime`` from ``now`` - 1 hour."""
        now = now or datetime.now(timezone.utc)
        start = now - timedelta(days=1)
        root_key = ec.generate_private_key(ec.SECP384R1())
        inter_key = ec.generate_private_key(ec.SECP384R1())
        leaf_key = ec.generate_private_key(ec.SECP384R1())
        far = start + timedelta(days=3650)
        root = _issue("test.nitro-enclaves", root_key, None, root_key,
                      ca=True, path_length=None, not_before=start, not_after=far)  # fmt: skip
        inter = _issue("zonal.test.nitro-enclaves", inter_key, root, root_key,
                       ca=True, path_length=0, not_before=start, not_after=far)  # fmt: skip
        leaf = _issue("enclave.test.nitro-enclaves", leaf_key, inter, inter_key, ca=False, path_length=None,
                      not_before=now - timedelta(hours=1), not_after=now + leaf_lifetime)  # fmt: skip
        return cls(
            root_certificate=root,
            intermediate_certificate=inter,
            leaf_certificate=leaf,
            root_key=root_key,
            intermediate_key=inter_key,
            leaf_key=leaf_key,
        )


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA384())))
    return r.to_bytes(48, "big") + s.to_bytes(48, "big")


def build_evidence(
    root: NitroTestRoot,
    *,
    report_data: bytes,
    measurement: bytes | None = None,
    debug: bool = False,
    nonce: bytes | None = None,
    public_key: bytes | None = None,
    pcrs: dict[int, bytes] | None = None,
    now: datetime | None = None,
    tagged: bool = False,
    as_base64: bool = False,
    **breaks: Any,
) -> FakeEvidence:
    """A signed attestation document: ``user_data`` = ``report_data``, PCR0 = ``measurement``.

    Args:
        root: the hierarchy that signs.
        report_data: becomes ``user_data`` (0..512 bytes).
        measurement: PCR0 (48 bytes); default :data:`DEFAULT_MEASUREMENT`.
        debug: a debug enclave: PCR0, PCR1 and PCR2 are all zeros (``measurement`` is then ignored).
        nonce, public_key: the optional document fields.
        pcrs: extra PCR values by index (override the defaults; 48 bytes each).
        now: document timestamp (default: the current time).
        tagged: wrap in CBOR tag 18. as_base64: emit base64 text instead of raw bytes.
        **breaks: one or more of the hooks in the module docstring set to True.

    Raises:
        TypeError: an unknown break hook.
    """
    unknown = set(breaks) - _BREAKS
    if unknown:
        raise TypeError(f"unknown break hook(s) {sorted(unknown)}; known: {sorted(_BREAKS)}")
    brk = {k for k, v in breaks.items() if v}
    if measurement is not None and len(measurement) != 48:
        raise ValueError("measurement (PCR0) must be 48 bytes")
    now = now or datetime.now(timezone.utc)

    signer = NitroTestRoot.generate(now=now) if "untrusted_root" in brk else root
    leaf_cert, leaf_key = signer.leaf_certificate, signer.leaf_key
    if "foreign_leaf" in brk:
        other = NitroTestRoot.generate(now=now)
        leaf_cert, leaf_key = other.leaf_certificate, other.leaf_key
    if "expired_leaf" in brk:
        leaf_key = ec.generate_private_key(ec.SECP384R1())
        leaf_cert = _issue("expired.test.nitro-enclaves", leaf_key, signer.intermediate_certificate,
                           signer.intermediate_key, ca=False, path_length=None,
                           not_before=now - timedelta(days=2), not_after=now - timedelta(days=1))  # fmt: skip
    cabundle = [_der(signer.root_certificate)]
    if "drop_intermediate" not in brk:
        cabundle.append(_der(signer.intermediate_certificate))

    values = {i: bytes(48) for i in range(16)}
    values[0] = DEFAULT_MEASUREMENT if measurement is None else measurement
    values[1], values[2] = _PCR1, _PCR2
    values.update(pcrs or {})
    if debug:
        values[0] = values[1] = values[2] = bytes(48)
    doc = AttestationDocument(
        module_id="i-0000000000000000-enc00000000simulated",
        digest="SHA384",
        timestamp=int(now.timestamp() * 1000),
        pcrs=values,
        certificate=_der(leaf_cert),
        cabundle=tuple(cabundle),
        public_key=public_key,
        user_data=report_data,
        nonce=nonce,
    )
    payload = doc.to_bytes()
    if "extra_field" in brk:
        payload = cbor2.dumps({**cbor2.loads(payload), "extra": b"x"})
    alg = -7 if "wrong_alg" in brk else COSE_ALG_ES384  # -7 = ES256
    protected = cbor2.dumps({COSE_HEADER_ALG: alg})
    unsigned = NitroDocument(
        protected=protected, payload=payload, signature=bytes(96), document=doc, tagged=tagged
    )
    signature = _sign(leaf_key, unsigned.signed_bytes())
    if "bad_signature" in brk:
        signature = signature[:-1] + bytes([signature[-1] ^ 1])
    if "tamper_payload" in brk:
        tampered = AttestationDocument(**{**_fields(doc), "user_data": report_data + b"!"})
        payload = tampered.to_bytes()
    raw = NitroDocument(
        protected=protected, payload=payload, signature=signature, document=doc, tagged=tagged
    ).to_bytes()
    return FakeEvidence(tee=TEE, evidence=base64.b64encode(raw) if as_base64 else raw)


def _fields(doc: AttestationDocument) -> dict[str, Any]:
    return {name: getattr(doc, name) for name in AttestationDocument.__dataclass_fields__}
