"""The signed release record: what a broker's key response commits to (docs/kbs.md "Signed record").

Every Unwrap/Release response carries ``record`` (these bytes), an ECDSA P-256/SHA-256 signature over
them by the broker's release key, and the key HPKE-sealed to the token's ``cnf`` key with
``info = record``. The executor checks the signature against the release key it pinned, then that the
record names its own request nonce, domain, key version, token and key (design.md section 5, step 5).

Encoding (version 1; ``u32``/``u64`` big-endian; each length checked against a maximum)::

    0x01 || len(ctx) || ctx || len(domain) || domain || key_version (u32)
         || len(token_id) || token_id || len(key_hash) || key_hash
         || len(header_hash) || header_hash || len(request_nonce) || request_nonce || iat (u64)

with ``ctx = b"ray-confidential/kbs/release-record/v1"``; lengths are ``u32``.

    >>> r = ReleaseRecord(domain="d", key_version=1, token_id="t", key_hash=bytes(32),
    ...                   header_hash=bytes(32), request_nonce=bytes(32), iat=0)
    >>> ReleaseRecord.decode(r.encode()) == r
    True
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ray_confidential.crypto import hpke
from ray_confidential.errors import KeyReleaseDenied

VERSION: Final = 1
CONTEXT: Final = b"ray-confidential/kbs/release-record/v1"
SECRET_CONTEXT: Final = b"ray-confidential/kbs/secret/v1\x00"
NONCE_SIZE: Final = 32
MAX_NAME: Final = 256
MAX_TOKEN_ID: Final = 128
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_PREFIX: Final = bytes([VERSION]) + _U32.pack(len(CONTEXT)) + CONTEXT
_PREFIX_LEN: Final = len(_PREFIX)
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())  # stateless: one instance for every signature


def key_hash(public_key: hpke.PublicKey) -> bytes:
    """SHA-256 over the suite id and raw key: the ``cnf.jkt`` of tokens and the record's key hash."""
    return hashlib.sha256(hpke.SUITES[public_key.suite].suite_id + public_key.raw).digest()


def secret_subject(name: str) -> bytes:
    """What a Release record puts in ``header_hash`` for the named secret ``name``."""
    return hashlib.sha256(SECRET_CONTEXT + name.encode()).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseRecord:
    """One key release, as signed by the broker.

    Attributes:
        domain: the domain whose key was released (UTF-8, 1..256 bytes).
        key_version: the domain key version (u32; 0 for a named secret).
        token_id: the ``jti`` of the token the request presented (1..128 bytes).
        key_hash: SHA-256 of the recipient HPKE key (:func:`key_hash`), 32 bytes.
        header_hash: the sealed object's header hash (format v1), or :func:`secret_subject`.
        request_nonce: the 32 bytes the executor chose for this request.
        iat: broker time of the release, Unix seconds.
    """

    domain: str
    key_version: int
    token_id: str
    key_hash: bytes
    header_hash: bytes
    request_nonce: bytes
    iat: int

    def __post_init__(self) -> None:
        if not 1 <= len(self.domain.encode()) <= MAX_NAME:
            raise ValueError(f"ReleaseRecord.domain must be 1..{MAX_NAME} bytes")
        if not 0 <= self.key_version < 1 << 32:
            raise ValueError("ReleaseRecord.key_version must be a u32")
        if not 1 <= len(self.token_id.encode()) <= MAX_TOKEN_ID:
            raise ValueError(f"ReleaseRecord.token_id must be 1..{MAX_TOKEN_ID} bytes")
        for name in ("key_hash", "header_hash", "request_nonce"):
            if len(getattr(self, name)) != 32:
                raise ValueError(f"ReleaseRecord.{name} must be 32 bytes")
        if not 0 <= self.iat < 1 << 63:
            raise ValueError("ReleaseRecord.iat must be a non-negative u63")

    def encode(self) -> bytes:
        """Canonical bytes (module docstring): what is signed and what is the HPKE ``info``."""

        def lp(b: bytes) -> bytes:
            return _U32.pack(len(b)) + b

        return b"".join(
            [
                bytes([VERSION]),
                lp(CONTEXT),
                lp(self.domain.encode()),
                _U32.pack(self.key_version),
                lp(self.token_id.encode()),
                lp(self.key_hash),
                lp(self.header_hash),
                lp(self.request_nonce),
                _U64.pack(self.iat),
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> ReleaseRecord:
        """Parse :meth:`encode` output. Raises KeyReleaseDenied for anything malformed.

        Every Unwrap response is decoded by the executor, so this reads fields in place with
        ``unpack_from`` instead of slicing the input step by step; the checks are the same: each
        length against its maximum, no truncation, no trailing bytes."""
        data = bytes(data)
        end = len(data)
        try:
            if data[:_PREFIX_LEN] != _PREFIX:
                raise KeyReleaseDenied("release record: wrong version or context")
            pos = _PREFIX_LEN
            fields: list[bytes] = []
            for maximum in (MAX_NAME, -1, MAX_TOKEN_ID, 32, 32, 32):
                if maximum < 0:  # key_version, a u32 between domain and token id
                    (version,) = _U32.unpack_from(data, pos)
                    pos += 4
                    continue
                (size,) = _U32.unpack_from(data, pos)
                if size > maximum:
                    raise KeyReleaseDenied("release record: field over its maximum length")
                pos += 4
                if pos + size > end:
                    raise KeyReleaseDenied("release record: truncated")
                fields.append(data[pos : pos + size])
                pos += size
            (iat,) = _U64.unpack_from(data, pos)
            pos += 8
        except struct.error:
            raise KeyReleaseDenied("release record: truncated") from None
        if pos != end:
            raise KeyReleaseDenied("release record: trailing bytes")
        domain, token_id, kh, hh, nonce = fields
        try:
            return cls(
                domain=domain.decode(),
                key_version=version,
                token_id=token_id.decode(),
                key_hash=kh,
                header_hash=hh,
                request_nonce=nonce,
                iat=iat,
            )
        except (UnicodeDecodeError, ValueError) as exc:
            raise KeyReleaseDenied(f"release record: {exc}") from None


def sign(private_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 (DER signature) by the broker's release key."""
    return private_key.sign(data, _ECDSA_SHA256)


def verify(public_key: ec.EllipticCurvePublicKey, data: bytes, signature: bytes) -> None:
    """Raises KeyReleaseDenied unless ``signature`` is the pinned release key's over ``data``."""
    try:
        public_key.verify(signature, data, _ECDSA_SHA256)
    except InvalidSignature:
        raise KeyReleaseDenied("broker response is not signed by the pinned release key") from None


__all__ = ["CONTEXT", "VERSION", "ReleaseRecord", "key_hash", "secret_subject", "sign", "verify"]
