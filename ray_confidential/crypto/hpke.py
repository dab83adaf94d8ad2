"""HPKE (RFC 9180) domain key pairs: anyone with the public key can wrap, only the key holder unwraps.

Two suites, named by their RFC 9180 identifiers (KEM, KDF, AEAD):

- ``x25519`` (default): DHKEM(X25519, HKDF-SHA256) 0x0020, HKDF-SHA256 0x0001, AES-256-GCM 0x0002.
- ``mlkem768-x25519``: hybrid post-quantum KEM ML-KEM-768 + X25519 0x647a, HKDF-SHA256, AES-256-GCM.

Private keys live only in :class:`PrivateKeyHandle`, which refuses pickling and prints redacted.

    >>> priv = generate_private_key("x25519")
    >>> pub = priv.public_key()
    >>> wrapped = wrap(pub, b"k" * 32, info=b"header-hash")
    >>> priv.unwrap(wrapped, info=b"header-hash") == b"k" * 32
    True
    >>> repr(priv)
    '<PrivateKeyHandle x25519 [redacted]>'
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from ray_confidential.errors import DecryptionError


@dataclass(frozen=True, slots=True)
class SuiteInfo:
    name: str
    kem_id: int
    kdf_id: int
    aead_id: int
    public_key_size: int

    @property
    def suite_id(self) -> bytes:
        """6 bytes: KEM id, KDF id, AEAD id (big-endian u16 each), as RFC 9180 section 5.1 orders them."""
        return struct.pack(">HHH", self.kem_id, self.kdf_id, self.aead_id)


_MLKEM768_PUBLIC_SIZE: Final = 1184
SUITES: Final[dict[str, SuiteInfo]] = {
    "x25519": SuiteInfo("x25519", 0x0020, 0x0001, 0x0002, 32),
    "mlkem768-x25519": SuiteInfo("mlkem768-x25519", 0x647A, 0x0001, 0x0002, _MLKEM768_PUBLIC_SIZE + 32),
}
DEFAULT_SUITE: Final = "x25519"


def suite_by_id(suite_id: bytes) -> SuiteInfo:
    """Look a suite up by its 6-byte identifier. Raises ValueError for unknown suites."""
    for info in SUITES.values():
        if info.suite_id == suite_id:
            return info
    raise ValueError(f"unsupported HPKE suite id {suite_id.hex()}")


def _suite_info(name: str) -> SuiteInfo:
    try:
        return SUITES[name]
    except KeyError:
        raise ValueError(f"unknown HPKE suite {name!r}; choose one of {sorted(SUITES)}") from None


_RUST_SUITES: Final = {
    "x25519": hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    "mlkem768-x25519": hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}


def _rust_suite(name: str) -> hpke.Suite:
    return _RUST_SUITES[name]


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An HPKE public key: suite name and raw encoding (X25519: 32 bytes; hybrid: ML-KEM || X25519)."""

    suite: str
    raw: bytes

    def __post_init__(self) -> None:
        info = _suite_info(self.suite)
        if len(self.raw) != info.public_key_size:
            raise ValueError(
                f"{self.suite} public key must be {info.public_key_size} bytes, got {len(self.raw)}"
            )

    @property
    def fingerprint(self) -> str:
        """SHA-256 over suite id and key bytes, hex (what descriptors and `cnf.jkt`-style pins name)."""
        return hashlib.sha256(_suite_info(self.suite).suite_id + self.raw).hexdigest()

    def _to_crypto(self) -> Any:
        if self.suite == "x25519":
            return x25519.X25519PublicKey.from_public_bytes(self.raw)
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(self.raw[:_MLKEM768_PUBLIC_SIZE]),
            x25519.X25519PublicKey.from_public_bytes(self.raw[_MLKEM768_PUBLIC_SIZE:]),
        )


_LOADED_PUBLIC: dict[PublicKey, Any] = {}
"""Recently used public keys, loaded (public data; a process wraps to a handful of domain keys)."""


def loaded_public_key(public_key: PublicKey) -> Any:
    """``public_key`` as a cryptography key object, reused while it stays in use."""
    loaded = _LOADED_PUBLIC.get(public_key)
    if loaded is None:
        if len(_LOADED_PUBLIC) >= 64:
            _LOADED_PUBLIC.clear()
        loaded = _LOADED_PUBLIC[public_key] = public_key._to_crypto()
    return loaded


def wrap(public_key: PublicKey, plaintext: bytes, *, info: bytes) -> bytes:
    """HPKE base-mode single-shot seal (RFC 9180 section 6.1): ``enc || ciphertext``."""
    return _rust_suite(public_key.suite).encrypt(plaintext, loaded_public_key(public_key), info=info)


class PrivateKeyHandle:
    """Holds an HPKE private key. Cannot be pickled, copied to another process by accident, or printed.

    Moving a key elsewhere is an explicit HPKE wrap to the destination's public key.
    """

    __slots__ = ("_key", "_public", "_raw", "_suite")

    def __init__(self, suite: str, raw_private: bytes) -> None:
        _suite_info(suite)
        self._suite = suite
        self._raw = bytearray(raw_private)
        self._key, self._public = _load_private(suite, bytes(raw_private))

    @property
    def suite(self) -> str:
        return self._suite

    def public_key(self) -> PublicKey:
        return self._public

    def unwrap(self, wrapped: bytes, *, info: bytes) -> bytes:
        """HPKE single-shot open. Raises DecryptionError (opaque) on any failure."""
        try:
            return _rust_suite(self._suite).decrypt(wrapped, self._key, info=info)
        except (InvalidTag, ValueError) as exc:
            raise DecryptionError() from exc

    def export_private_bytes(self) -> bytes:
        """Raw private key bytes, for the development key store only (never crosses Ray)."""
        return bytes(self._raw)

    def destroy(self) -> None:
        """Overwrite the raw copy we hold (the library's own copy is freed with the object)."""
        for i in range(len(self._raw)):
            self._raw[i] = 0
        self._key = None

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "PrivateKeyHandle cannot be pickled: key material never crosses a Ray or process boundary; "
            "wrap the key to the destination's HPKE public key instead"
        )

    def __copy__(self) -> NoReturn:
        raise TypeError("PrivateKeyHandle cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("PrivateKeyHandle cannot be copied")

    def __repr__(self) -> str:
        return f"<PrivateKeyHandle {self._suite} [redacted]>"

    __str__ = __repr__


def _load_private(suite: str, raw: bytes) -> tuple[Any, PublicKey]:
    if suite == "x25519":
        key = x25519.X25519PrivateKey.from_private_bytes(raw)
        return key, PublicKey(suite, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    mk = mlkem.MLKEM768PrivateKey.from_seed_bytes(raw[:64])
    xk = x25519.X25519PrivateKey.from_private_bytes(raw[64:])
    pub = mk.public_key().public_bytes_raw() + xk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hpke.MLKEM768X25519PrivateKey(mk, xk), PublicKey(suite, pub)


def generate_private_key(suite: str = DEFAULT_SUITE) -> PrivateKeyHandle:
    """A fresh HPKE key pair for ``suite`` ("x25519" or "mlkem768-x25519")."""
    _suite_info(suite)
    xraw = x25519.X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    if suite == "x25519":
        return PrivateKeyHandle(suite, xraw)
    seed = mlkem.MLKEM768PrivateKey.generate().private_bytes_raw()
    return PrivateKeyHandle(suite, seed + xraw)
