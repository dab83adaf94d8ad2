"""Run-time test PKIs for the simulated TEEs: certificate issuing and the PEM bundle round trip.

Shared by :mod:`.nitro_fake`, :mod:`.nvidia_fake` and :mod:`.dcap_fake`; each keeps its own names
and extension profile (the shape of the vendor PKI it imitates) and calls :func:`issue`.

    >>> from datetime import datetime, timedelta, timezone
    >>> from cryptography.hazmat.primitives import hashes
    >>> from cryptography.hazmat.primitives.asymmetric import ec
    >>> from cryptography.x509.oid import NameOID
    >>> key = ec.generate_private_key(ec.SECP384R1())
    >>> name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
    >>> now = datetime.now(timezone.utc)
    >>> root = issue(name, key, None, key, not_before=now, not_after=now + timedelta(days=1),
    ...              extensions=[(key_usage(ca=True, digital_signature=False), True)],
    ...              algorithm=hashes.SHA384())
    >>> certs, keys = load_pem_bundle(pem_bundle([root], [key]), count=1, what="demo")
    >>> certs == [root] and keys[0].public_key() == key.public_key()
    True

Test material only: the private keys are generated at run time and never shipped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

_KEY_PEM = re.compile(rb"-----BEGIN PRIVATE KEY-----.+?-----END PRIVATE KEY-----\s*", re.DOTALL)


def key_usage(*, ca: bool, digital_signature: bool, content_commitment: bool = False) -> x509.KeyUsage:
    """keyUsage with keyCertSign and cRLSign exactly when ``ca``; nothing else but the two flags given."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    not_before: datetime,
    not_after: datetime,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
    algorithm: hashes.SHA256 | hashes.SHA384,
) -> x509.Certificate:
    """A certificate for ``key`` signed by ``issuer_key`` (self-signed when ``issuer`` is None), with a
    random serial and ``extensions`` as (value, critical) pairs, in order."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, algorithm)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM of ``key``."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_bundle(certs: Sequence[x509.Certificate], keys: Sequence[ec.EllipticCurvePrivateKey]) -> bytes:
    """The certificates, then their private keys in the same order, in PEM (launch data)."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs) + b"".join(
        key_pem(k) for k in keys
    )


def load_pem_bundle(
    data: bytes, *, count: int, what: str
) -> tuple[list[x509.Certificate], list[ec.EllipticCurvePrivateKey]]:
    """Inverse of :func:`pem_bundle`: ``count`` certificates and the EC keys that match them.

    Raises:
        ValueError: not ``count`` certificates and ``count`` keys, or a key that is not its certificate's.
    """
    certs = x509.load_pem_x509_certificates(data)
    keys = [serialization.load_pem_private_key(m.group(0), password=None) for m in _KEY_PEM.finditer(data)]
    if len(certs) != count or len(keys) != count:
        raise ValueError(f"{what} PEM must hold {count} certificates and {count} private keys (see to_pem)")
    ec_keys: list[ec.EllipticCurvePrivateKey] = []
    for cert, key in zip(certs, keys, strict=True):
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise ValueError(f"{what} PEM: private key does not match its certificate")
        ec_keys.append(key)
    return certs, ec_keys


@dataclass(frozen=True, slots=True, kw_only=True)
class ThreeLevelPKI:
    """Root -> intermediate -> leaf certificates with their EC private keys (never in ``repr``).

    :meth:`to_pem` / :meth:`from_pem` move the whole hierarchy to another process as launch data.
    """

    root_certificate: x509.Certificate
    intermediate_certificate: x509.Certificate
    leaf_certificate: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey = field(repr=False)
    intermediate_key: ec.EllipticCurvePrivateKey = field(repr=False)
    leaf_key: ec.EllipticCurvePrivateKey = field(repr=False)

    def to_pem(self) -> bytes:
        """Certificates (root, intermediate, leaf) then their PKCS#8 private keys, in PEM."""
        certs = (self.root_certificate, self.intermediate_certificate, self.leaf_certificate)
        return pem_bundle(certs, (self.root_key, self.intermediate_key, self.leaf_key))

    @classmethod
    def from_pem(cls, data: bytes) -> Self:
        """Inverse of :meth:`to_pem`.

        Raises:
            ValueError: not three certificates and three matching keys.
        """
        certs, keys = load_pem_bundle(data, count=3, what=cls.__name__)
        return cls(
            root_certificate=certs[0],
            intermediate_certificate=certs[1],
            leaf_certificate=certs[2],
            root_key=keys[0],
            intermediate_key=keys[1],
            leaf_key=keys[2],
        )
