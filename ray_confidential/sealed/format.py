"""Sealed object format v1 (docs/sealed-format.md): header, key commitment, STREAM chunks.

Byte layout::

    version        u8     0x01
    header_len     u32    big-endian, <= MAX_HEADER
    header         header_len bytes (fields below, in this order)
    body           chunks: AES-256-GCM(payload_key, nonce_i, aad=header_hash) of chunk_size bytes each

    header fields: suite_id (6) | domain (u8 len + UTF-8) | key_version (u32) | object_id (16) |
                   producer_id (u8 len + UTF-8) | content_type (u8) | chunk_size (u32) |
                   plaintext_len (u64) | key_commitment (32) | wrapped_dek (u16 len + bytes)

``header_hash = SHA-256(HASH_CONTEXT || version || header without the wrapped_dek field)``. It is the
HPKE ``info`` of the DEK wrap and the AEAD associated data of every chunk. From the 32-byte DEK,
HKDF-SHA256 (salt = object_id, info = KEY_SCHEDULE_INFO) derives 71 bytes: key commitment (32),
payload key (32), nonce prefix (7). The commitment is compared before anything is decrypted.

    >>> from ray_confidential.crypto.hpke import generate_private_key
    >>> priv = generate_private_key()
    >>> key = DomainPublicKey(domain="demo", version=1, public_key=priv.public_key())
    >>> blob = seal(b"secret", key)
    >>> header = SealedHeader.parse(blob)
    >>> (header.domain, header.key_version, header.plaintext_len)
    ('demo', 1, 6)
    >>> dek = priv.unwrap(header.wrapped_dek, info=header.header_hash)
    >>> open_with_dek(blob, dek, allow_pickle=False)
    b'secret'
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ray_confidential.crypto import hpke, stream
from ray_confidential.errors import DecryptionError
from ray_confidential.sealed.content import ContentType, decode, encode

if TYPE_CHECKING:
    from ray_confidential.crypto.encap import Encapsulation

VERSION: Final = 0x01
MAX_HEADER: Final = 8192
MAX_NAME: Final = 128
MAX_WRAPPED_DEK: Final = 4096
MIN_CHUNK: Final = 4 << 10
MAX_CHUNK: Final = 64 << 20
DEFAULT_CHUNK: Final = 4 << 20
MAX_PLAINTEXT: Final = 1 << 40
DEK_SIZE: Final = 32
HASH_CONTEXT: Final = b"ray-confidential/sealed/v1/header-hash\x00"
KEY_SCHEDULE_INFO: Final = b"ray-confidential/sealed/v1/key-schedule"
_PREFIX = struct.Struct(">BI")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainPublicKey:
    """What sealing needs: the domain name, the key version and its HPKE public key."""

    domain: str
    version: int
    public_key: hpke.PublicKey


@dataclass(frozen=True, slots=True, kw_only=True)
class SealedHeader:
    """The authenticated header of a sealed object (parsed; no secret in it)."""

    suite: str
    domain: str
    key_version: int
    object_id: bytes
    producer_id: str
    content_type: ContentType
    chunk_size: int
    plaintext_len: int
    key_commitment: bytes
    wrapped_dek: bytes
    header_bytes: bytes
    """The exact header bytes as found (version byte and length prefix included)."""
    header_hash: bytes

    @property
    def body_offset(self) -> int:
        return len(self.header_bytes)

    @classmethod
    def parse(cls, data: Any) -> SealedHeader:
        """Parse and bounds-check the header. Raises DecryptionError for anything malformed.

        Parsed headers are remembered by their exact bytes (parsing is a pure function of them, and
        executors see the same inputs call after call); the result is immutable.
        """
        view = memoryview(data).cast("B")
        try:
            header_len = _PREFIX.unpack_from(view, 0)[1]
            raw = bytes(view[: _PREFIX.size + header_len]) if header_len <= MAX_HEADER else None
            header = _PARSED.get(raw) if raw is not None else None
            if header is None:
                header = _parse_header(view)
                if len(_PARSED) >= _PARSED_ENTRIES:
                    _PARSED.clear()
                _PARSED[header.header_bytes] = header
            return header
        except (struct.error, ValueError, UnicodeDecodeError, IndexError) as exc:
            raise DecryptionError() from exc


_PARSED: dict[bytes, SealedHeader] = {}
_PARSED_ENTRIES: Final = 1024


def _name(value: str, what: str, *, allow_empty: bool = False) -> bytes:
    raw = value.encode()
    if len(raw) > MAX_NAME or (not raw and not allow_empty) or (raw and not _NAME_RE.match(value)):
        raise ValueError(
            f"invalid {what} {value!r}: 1-{MAX_NAME} bytes of letters, digits and . _ : @ / -, "
            "starting with a letter or digit"
        )
    return bytes([len(raw)]) + raw


def _auth_fields(
    *,
    suite: str,
    domain: str,
    key_version: int,
    object_id: bytes,
    producer_id: str,
    content_type: ContentType,
    chunk_size: int,
    plaintext_len: int,
    key_commitment: bytes,
) -> bytes:
    return b"".join(
        [
            hpke.SUITES[suite].suite_id,
            _name(domain, "domain"),
            struct.pack(">I", key_version),
            object_id,
            _name(producer_id, "producer id", allow_empty=True),
            struct.pack(">BIQ", int(content_type), chunk_size, plaintext_len),
            key_commitment,
        ]
    )


def header_hash_of(auth_fields: bytes) -> bytes:
    """The header hash: defined once, here (docs/sealed-format.md, "Header hash")."""
    return hashlib.sha256(HASH_CONTEXT + bytes([VERSION]) + auth_fields).digest()


def _parse_header(view: memoryview) -> SealedHeader:
    version, header_len = _PREFIX.unpack_from(view, 0)
    if version != VERSION or not 0 < header_len <= MAX_HEADER or len(view) < _PREFIX.size + header_len:
        raise ValueError("bad version or header length")
    h = bytes(view[_PREFIX.size : _PREFIX.size + header_len])
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(h):
            raise ValueError("truncated header")
        out = h[pos : pos + n]
        pos += n
        return out

    suite = hpke.suite_by_id(take(6)).name
    domain = take(take(1)[0]).decode()
    (key_version,) = struct.unpack(">I", take(4))
    object_id = take(16)
    producer_id = take(take(1)[0]).decode()
    ctype, chunk_size, plaintext_len = struct.unpack(">BIQ", take(13))
    key_commitment = take(32)
    auth_end = pos
    (wrapped_len,) = struct.unpack(">H", take(2))
    wrapped = take(wrapped_len)
    if pos != len(h) or not domain or wrapped_len > MAX_WRAPPED_DEK:
        raise ValueError("trailing or missing header bytes")
    if (
        not (MIN_CHUNK <= chunk_size <= MAX_CHUNK)
        or chunk_size & (chunk_size - 1)
        or plaintext_len > MAX_PLAINTEXT
    ):
        raise ValueError("chunk size or length out of range")
    return SealedHeader(
        suite=suite,
        domain=domain,
        key_version=key_version,
        object_id=object_id,
        producer_id=producer_id,
        content_type=ContentType(ctype),
        chunk_size=chunk_size,
        plaintext_len=plaintext_len,
        key_commitment=key_commitment,
        wrapped_dek=wrapped,
        header_bytes=bytes(view[: _PREFIX.size + header_len]),
        header_hash=header_hash_of(h[:auth_end]),
    )


def _key_schedule(dek: bytes, object_id: bytes) -> tuple[bytes, bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=71, salt=object_id, info=KEY_SCHEDULE_INFO).derive(dek)
    return okm[:32], okm[32:64], okm[64:71]


def sealed_size(plaintext_len: int, header_len: int, chunk_size: int) -> int:
    return header_len + stream.sealed_length(plaintext_len, chunk_size)


def seal_with_id(
    value: Any,
    key: DomainPublicKey,
    *,
    producer_id: str = "",
    allow_pickle: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    allocate: Callable[[int], memoryview] | None = None,
    encapsulation: Encapsulation | None = None,
    _dek: bytes | None = None,
    _object_id: bytes | None = None,
) -> tuple[memoryview, bytes]:
    """Seal ``value`` to a domain's public key. Needs no secret; anyone may seal.

    Args:
        value: an Arrow Table/RecordBatch, NumPy array, torch tensor or state dict, bytes, or a
            JSON-able value (pickle only with ``allow_pickle``).
        key: the domain's public key and version.
        producer_id: who sealed it (a token id or node id), recorded in the header.
        allow_pickle: the domain's policy opts into pickle.
        chunk_size: plaintext bytes per AEAD chunk (power of two, 4 KiB..64 MiB).
        allocate: returns a writable buffer of the requested size (lets callers reuse a staging
            buffer); default allocates a new bytearray.
        encapsulation: an unused HPKE encapsulation to ``key``'s public key made ahead of time
            (``ray_confidential.crypto.encap``): the DEK wrap then skips its key-pair generation and
            Diffie-Hellman. The sealed bytes have the same form either way.

    Returns:
        A memoryview of the sealed bytes, and the object id written into its header.

    Raises:
        ValueError: ``encapsulation`` was made for another public key.
    """
    if not (MIN_CHUNK <= chunk_size <= MAX_CHUNK) or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two in [{MIN_CHUNK}, {MAX_CHUNK}]")
    encoded = encode(value, allow_pickle=allow_pickle)
    length = encoded.length
    if length > MAX_PLAINTEXT:
        raise ValueError("value too large to seal (limit 1 TiB)")
    dek = _dek if _dek is not None else os.urandom(DEK_SIZE)
    object_id = _object_id if _object_id is not None else os.urandom(16)
    commitment, payload_key, prefix = _key_schedule(dek, object_id)
    auth = _auth_fields(
        suite=key.public_key.suite,
        domain=key.domain,
        key_version=key.version,
        object_id=object_id,
        producer_id=producer_id,
        content_type=encoded.content_type,
        chunk_size=chunk_size,
        plaintext_len=length,
        key_commitment=commitment,
    )
    hh = header_hash_of(auth)
    if encapsulation is None:
        wrapped = hpke.wrap(key.public_key, dek, info=hh)
    elif encapsulation.public_key != key.public_key:
        raise ValueError("the encapsulation was made for another public key")
    else:
        wrapped = encapsulation.seal(dek, info=hh)
    header = auth + struct.pack(">H", len(wrapped)) + wrapped
    prefix_bytes = _PREFIX.pack(VERSION, len(header)) + header
    total = len(prefix_bytes) + stream.sealed_length(length, chunk_size)
    out = allocate(total) if allocate is not None else memoryview(bytearray(total))
    if len(out) != total:
        raise ValueError("allocate() returned a buffer of the wrong size")
    out[: len(prefix_bytes)] = prefix_bytes
    stream.encrypt_segments(
        payload_key, prefix, hh, encoded.segments, length, chunk_size, out[len(prefix_bytes) :]
    )
    return out, object_id


def seal(
    value: Any,
    key: DomainPublicKey,
    *,
    producer_id: str = "",
    allow_pickle: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    allocate: Callable[[int], memoryview] | None = None,
    encapsulation: Encapsulation | None = None,
    _dek: bytes | None = None,
    _object_id: bytes | None = None,
) -> memoryview:
    """:func:`seal_with_id` without the object id: a memoryview of the sealed bytes."""
    return seal_with_id(
        value,
        key,
        producer_id=producer_id,
        allow_pickle=allow_pickle,
        chunk_size=chunk_size,
        allocate=allocate,
        encapsulation=encapsulation,
        _dek=_dek,
        _object_id=_object_id,
    )[0]


def open_with_dek(data: Any, dek: bytes, *, allow_pickle: bool, header: SealedHeader | None = None) -> Any:
    """Open a sealed object with its (already unwrapped) data key.

    The key commitment is checked before any decryption; the plaintext goes into a buffer from
    Arrow's memory pool (recycled between calls) and decoders read it without copying.

    Raises:
        DecryptionError: any tampering, wrong key, or malformed payload (no detail given).
    """
    view = memoryview(data).cast("B")
    header = header or SealedHeader.parse(view)
    commitment, payload_key, prefix = _key_schedule(bytes(dek), header.object_id)
    if not hmac.compare_digest(commitment, header.key_commitment):
        raise DecryptionError()
    out = pa.allocate_buffer(header.plaintext_len, resizable=False)
    try:
        stream.decrypt_into(
            payload_key,
            prefix,
            header.header_hash,
            view[header.body_offset :],
            header.plaintext_len,
            header.chunk_size,
            memoryview(out).cast("B"),
        )
        return decode(header.content_type, out, allow_pickle=allow_pickle)
    except DecryptionError:
        raise
    except (ValueError, TypeError) as exc:
        raise DecryptionError() from exc
