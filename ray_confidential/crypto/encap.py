"""HPKE base-mode sealing with the KEM step done ahead of time (RFC 9180, suite ``x25519`` only).

An HPKE single-shot seal is Encap (a fresh X25519 key pair and one Diffie-Hellman, about three
quarters of its cost), then KeySchedule over the ``info`` and one AEAD seal. Encap needs only the
recipient's public key, so a process that seals results to a known key can run it while idle and
finish a seal later in a few HMACs. The output is exactly :func:`hpke.wrap`'s ``enc || ciphertext``
and opens with :meth:`hpke.PrivateKeyHandle.unwrap` (tests check both against cryptography's HPKE and
the RFC 9180 A.1 vector).

    >>> from ray_confidential.crypto.hpke import generate_private_key
    >>> priv = generate_private_key("x25519")
    >>> ready = encapsulate(priv.public_key())          # ahead of time
    >>> priv.unwrap(ready.seal(b"k" * 32, info=b"header-hash"), info=b"header-hash") == b"k" * 32
    True

An :class:`Encapsulation` holds the KEM shared secret for one future seal (never a key of anything
already sealed) and refuses a second use: reusing it would reuse the AEAD key and nonce.
"""

from __future__ import annotations

import hmac
import struct
from typing import Final, NoReturn

from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ray_confidential.crypto.hpke import SUITES, PublicKey, loaded_public_key

_LABEL: Final = b"HPKE-v1"
_X25519: Final = SUITES["x25519"]
_KEM_SUITE_ID: Final = b"KEM" + struct.pack(">H", _X25519.kem_id)
_HPKE_SUITE_ID: Final = b"HPKE" + _X25519.suite_id
_NK: Final = 32  # AES-256-GCM key
_NN: Final = 12  # its nonce
_MODE_BASE: Final = b"\x00"


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    """RFC 9180 section 4: HKDF-Extract (RFC 5869; an empty salt is HashLen zeros, as HMAC pads)."""
    return hmac.digest(salt, _LABEL + suite_id + label + ikm, "sha256")


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    """RFC 9180 section 4: HKDF-Expand for ``length`` <= 32 (one HMAC-SHA256 block)."""
    if not 0 < length <= 32:
        raise ValueError("one-block expand only")
    labeled = struct.pack(">H", length) + _LABEL + suite_id + label + info
    return hmac.digest(prk, labeled + b"\x01", "sha256")[:length]


def kem_shared_secret(dh: bytes, enc: bytes, recipient: bytes) -> bytes:
    """DHKEM ExtractAndExpand (RFC 9180 section 4.1) for DHKEM(X25519, HKDF-SHA256)."""
    eae_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE_ID, eae_prk, b"shared_secret", enc + recipient, 32)


_PSK_ID_HASH: Final = _labeled_extract(_HPKE_SUITE_ID, b"", b"psk_id_hash", b"")


def key_schedule(
    shared_secret: bytes, info: bytes, *, suite_id: bytes = _HPKE_SUITE_ID, nk: int = _NK
) -> tuple[bytes, bytes]:
    """KeySchedule in mode_base (RFC 9180 section 5.1): the AEAD key and base nonce."""
    psk_id_hash = (
        _PSK_ID_HASH if suite_id == _HPKE_SUITE_ID else _labeled_extract(suite_id, b"", b"psk_id_hash", b"")
    )
    context = _MODE_BASE + psk_id_hash + _labeled_extract(suite_id, b"", b"info_hash", info)
    secret = _labeled_extract(suite_id, shared_secret, b"secret", b"")
    return (
        _labeled_expand(suite_id, secret, b"key", context, nk),
        _labeled_expand(suite_id, secret, b"base_nonce", context, _NN),
    )


class Encapsulation:
    """One Encap to ``public_key``, for exactly one :meth:`seal` (then its secret is zeroed)."""

    __slots__ = ("_shared_secret", "enc", "public_key")

    def __init__(self, public_key: PublicKey, enc: bytes, shared_secret: bytes) -> None:
        self.public_key = public_key
        self.enc = enc
        self._shared_secret: bytearray | None = bytearray(shared_secret)

    def seal(self, plaintext: bytes, *, info: bytes) -> bytes:
        """Single-shot seal (RFC 9180 section 6.1) with this encapsulation: ``enc || ciphertext``.

        Raises:
            RuntimeError: the encapsulation was used already.
        """
        secret, self._shared_secret = self._shared_secret, None
        if secret is None:
            raise RuntimeError("an HPKE encapsulation seals exactly once")
        try:
            key, nonce = key_schedule(bytes(secret), info)
        finally:
            secret[:] = bytes(len(secret))
        return self.enc + AESGCM(key).encrypt(nonce, plaintext, None)

    def __repr__(self) -> str:
        used = "used" if self._shared_secret is None else "ready"
        return f"<Encapsulation x25519 to {self.public_key.fingerprint[:16]} {used}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("an Encapsulation holds a secret; it never leaves its process")


def encapsulate(public_key: PublicKey) -> Encapsulation:
    """Encap (RFC 9180 section 4.1) to ``public_key`` with a fresh ephemeral key, dropped at once.

    Raises:
        ValueError: not an ``x25519`` key, or a low-order point (cryptography refuses the exchange).
    """
    if public_key.suite != "x25519":
        raise ValueError("ahead-of-time encapsulation is implemented for the x25519 suite only")
    ephemeral = x25519.X25519PrivateKey.generate()
    enc = ephemeral.public_key().public_bytes_raw()
    dh = ephemeral.exchange(loaded_public_key(public_key))
    return Encapsulation(public_key, enc, kem_shared_secret(dh, enc, public_key.raw))


__all__ = ["Encapsulation", "encapsulate", "kem_shared_secret", "key_schedule"]
