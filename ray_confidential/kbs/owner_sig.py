"""Owner statements: a domain owner's own signature over a key version's descriptor and release policy.

    >>> from cryptography.hazmat.primitives.asymmetric import ec
    >>> key = ec.generate_private_key(ec.SECP256R1())
    >>> body = statement_bytes(name="d", owner="CN=a", version=1, suite="x25519", public_key=b"\\x01" * 32,
    ...                        policy_hash="ab" * 32, appraisal_hash="cd" * 32, allow_pickle=False,
    ...                        seal_arguments=False, recipients=())
    >>> body[:40]
    b'{"allow_pickle":false,"appraisal_hash":"'
    >>> verify_statement(key.public_key(), body, sign_statement(key, body))   # raises if it does not verify

The broker generates each domain key version; the owner then signs an **owner statement** naming that
version's public key and the hashes of the release policy and appraisal policy the broker enforces
(docs/kbs.md "Owner signatures"), with the three policy fields that drivers and executors read from
the descriptor itself (so a verifier needs no policy preimage for them). The statement is canonical
JSON (sorted keys, no spaces, as ``DomainRecord.descriptor_bytes``)::

    {"allow_pickle": <bool>, "appraisal_hash": <hex>, "context": "ray-confidential/kbs/owner-statement/v1",
     "format": 1, "name": <domain>, "owner": <RFC 4514 subject>, "policy_hash": <hex>,
     "public_key": <hex>, "recipients": [<suite:hex>, ...], "seal_arguments": <bool>,
     "suite": <HPKE suite>, "version": <key version>}

signed with ECDSA P-256 / SHA-256 (DER) by the private key of the owner's mutual-TLS client
certificate. The same key also signs TLS handshakes; a statement starts with ``{`` and names its
context, so it is never a TLS 1.2 handshake transcript (starts with a handshake type byte) or a
TLS 1.3 CertificateVerify input (starts with 64 spaces).

What it does NOT do: decide who owns a domain (the broker: the verified certificate's subject), fetch
or check revocation of owner certificates (no CRL/OCSP: an owner CA revokes by rotation), or bind the
broker's own descriptor fields (``issuer``, ``retired_versions``, which the release key signs).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from ray_confidential.errors import KeyReleaseDenied

STATEMENT_CONTEXT: Final = "ray-confidential/kbs/owner-statement/v1"
STATEMENT_FORMAT: Final = 1
MAX_SIGNATURE: Final = 72
"""An ECDSA P-256 DER signature is at most 72 bytes."""
MAX_CERTIFICATE: Final = 16 << 10


class OwnerSignatureError(KeyReleaseDenied):
    """An owner signature, statement or certificate does not verify; the message says which check."""


def statement_bytes(
    *, name: str, owner: str, version: int, suite: str, public_key: bytes, policy_hash: str, appraisal_hash: str,
    allow_pickle: bool, seal_arguments: bool, recipients: Sequence[str],
) -> bytes:  # fmt: skip
    """The canonical owner statement of one key version (what the owner signs; docs/kbs.md
    "Owner signatures")."""
    body = {
        "context": STATEMENT_CONTEXT,
        "format": STATEMENT_FORMAT,
        "name": name,
        "owner": owner,
        "version": version,
        "suite": suite,
        "public_key": public_key.hex(),
        "policy_hash": policy_hash,
        "appraisal_hash": appraisal_hash,
        "allow_pickle": allow_pickle,
        "seal_arguments": seal_arguments,
        "recipients": list(recipients),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a JSON boolean, got {value!r}")
    return value


def statement_from_descriptor(descriptor: dict[str, Any]) -> bytes:
    """The owner statement rebuilt from a (verified) descriptor's fields (docs/kbs.md "Descriptors").

    Raises:
        OwnerSignatureError: a field is missing or has the wrong type.
    """
    try:
        return statement_bytes(
            name=str(descriptor["name"]),
            owner=str(descriptor["owner"]),
            version=int(descriptor["version"]),
            suite=str(descriptor["suite"]),
            public_key=bytes.fromhex(str(descriptor["public_key"])),
            policy_hash=str(descriptor["policy_hash"]),
            appraisal_hash=str(descriptor["appraisal_hash"]),
            allow_pickle=_bool(descriptor["allow_pickle"]),
            seal_arguments=_bool(descriptor["seal_arguments"]),
            recipients=[str(r) for r in descriptor["recipients"]],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise OwnerSignatureError(f"descriptor lacks an owner statement field: {exc!r}") from None


def _check_key(key: object, what: str) -> None:
    if not isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) or not isinstance(
        key.curve, ec.SECP256R1
    ):
        kind = type(key).__name__
        if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
            kind = f"ECDSA {key.curve.name}"
        raise OwnerSignatureError(
            f"{what} must be an ECDSA P-256 key (the owner certificates' key type), got {kind}: issue the "
            "owner a P-256 client certificate"
        )


def load_owner_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """The owner's signing key from its mutual-TLS client key (PEM, unencrypted).

    Raises:
        OwnerSignatureError: not a P-256 key.
        ValueError: not a PEM private key.
    """
    key = serialization.load_pem_private_key(pem, password=None)
    _check_key(key, "the owner's client key")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def sign_statement(key: ec.EllipticCurvePrivateKey, statement: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 (DER) over ``statement`` with the owner's key."""
    _check_key(key, "the owner's signing key")
    return key.sign(statement, ec.ECDSA(hashes.SHA256()))


def certificate_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    """The owner certificate's public key. Raises :class:`OwnerSignatureError` unless it is P-256."""
    key = cert.public_key()
    _check_key(key, "the owner certificate's key")
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def verify_statement(key: ec.EllipticCurvePublicKey, statement: bytes, signature: bytes) -> None:
    """Raises :class:`OwnerSignatureError` unless ``signature`` is ``key``'s over ``statement``."""
    _check_key(key, "the owner's public key")
    if not 0 < len(signature) <= MAX_SIGNATURE:
        raise OwnerSignatureError(f"owner signature must be 1..{MAX_SIGNATURE} bytes (DER ECDSA P-256)")
    try:
        key.verify(signature, statement, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise OwnerSignatureError(
            "owner signature does not verify over this statement (another key, version or policy)"
        ) from None


def _client_auth(policy: Any, cert: x509.Certificate, ext: x509.ExtendedKeyUsage | None) -> None:
    if ext is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in ext:
        raise ValueError("owner certificate's extended key usage excludes client authentication")


def _end_entity(policy: Any, cert: x509.Certificate, ext: x509.BasicConstraints | None) -> None:
    if ext is not None and ext.ca:
        raise ValueError("owner certificate is a CA certificate")


def verify_owner_certificate(
    cert_der: bytes,
    *,
    owner_ca: bytes,
    owner: str,
    intermediates: Sequence[x509.Certificate] = (),
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """The owner certificate, once it chains to ``owner_ca`` and names ``owner``.

    Checks: DER parses; the chain verifies to the pinned CA (signatures, validity at ``now``, issuers
    are CAs); the leaf is no CA and, if it has an extended key usage, allows client authentication;
    its RFC 4514 subject equals ``owner``; its key is P-256. Extension rules are those of gRPC's
    owner listener (OpenSSL), not the Web PKI's (owner CAs need no AKI or key usage extensions).

    Args:
        cert_der: the certificate the broker stored with the signature.
        owner_ca: PEM of the owner CA(s) the verifier pins (the broker's ``tls.client_ca``).
        owner: the descriptor's ``owner``.
        now: verification time (default: the current time).

    Raises:
        OwnerSignatureError: any check fails.
    """
    if not 0 < len(cert_der) <= MAX_CERTIFICATE:
        raise OwnerSignatureError("owner certificate missing or too large")
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        roots = x509.load_pem_x509_certificates(owner_ca)
    except ValueError as exc:
        raise OwnerSignatureError(f"owner certificate or CA does not parse: {exc}") from None
    ca_policy = ExtensionPolicy.permit_all().require_present(
        x509.BasicConstraints, Criticality.AGNOSTIC, None
    )
    ee_policy = (
        ExtensionPolicy.permit_all()
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _client_auth)
        .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _end_entity)
    )
    verifier = (
        PolicyBuilder()
        .store(Store(roots))
        .time(now or datetime.datetime.now(datetime.timezone.utc))
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(cert, list(intermediates))
    except VerificationError as exc:
        raise OwnerSignatureError(f"owner certificate does not chain to the pinned owner CA: {exc}") from None
    if len(verified.chain) < 2:
        raise OwnerSignatureError("owner certificate is the owner CA itself, not an owner's certificate")
    subject = cert.subject.rfc4514_string()
    if subject != owner:
        raise OwnerSignatureError(f"owner certificate names {subject!r}, the descriptor's owner is {owner!r}")
    certificate_key(cert)
    return cert


__all__ = [
    "STATEMENT_CONTEXT",
    "OwnerSignatureError",
    "certificate_key",
    "load_owner_key",
    "sign_statement",
    "statement_bytes",
    "statement_from_descriptor",
    "verify_owner_certificate",
    "verify_statement",
]
