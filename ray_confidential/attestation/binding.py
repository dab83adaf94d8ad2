"""The binding: what an executor's evidence commits to (design.md section 5, step 3).

The executor asks its TEE for evidence whose caller-chosen bytes commit to the broker's challenge
nonce, the executor's ephemeral HPKE public key (and its suite), the cluster identity and the digest
of the code bundle it runs. The commitment is SHA-512 over a canonical, length-prefixed encoding
that starts with a version byte and a fixed context string, so that no other protocol's 64 bytes
can be mistaken for a binding and no two different bindings encode alike.

    >>> b = Binding(nonce=bytes(32), executor_public_key=bytes(32), hpke_suite="X25519-HKDF-SHA256-AES-256-GCM",
    ...             cluster_id="cluster-a", bundle_digest=bytes(32))
    >>> len(b.report_data()), len(b.gpu_nonce())
    (64, 32)
    >>> Binding.decode(b.encode()) == b
    True

Encoding (version 1; all lengths are u32 big-endian, each checked against a maximum)::

    0x01 || len(ctx) || ctx || len(suite) || suite || len(nonce) || nonce || len(pk) || pk
         || len(cluster) || cluster || len(digest) || digest

with ``ctx = b"ray-confidential/binding/v1"``, ``suite`` and ``cluster`` as UTF-8. Test vectors:
``docs/attestation-binding.md``.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Final

from ray_confidential.errors import EvidenceFormatError

VERSION: Final = 1
"""First byte of every encoding; a new layout gets a new version byte and a new context string."""

CONTEXT: Final = b"ray-confidential/binding/v1"
"""Fixed context string (domain separation from any other use of REPORT_DATA)."""

GPU_NONCE_CONTEXT: Final = b"ray-confidential/gpu-nonce/v1"
"""Prefix of the SHA-256 input that derives the NVIDIA SPDM requester nonce from the CPU binding."""

NONCE_SIZE: Final = 32
"""Broker challenge nonce: exactly 32 bytes."""

MAX_PUBLIC_KEY_SIZE: Final = 4096
"""Largest executor public key (X25519: 32 bytes; ML-KEM-768+X25519: 1,216 bytes)."""

MAX_SUITE_SIZE: Final = 128
MAX_CLUSTER_ID_SIZE: Final = 256
DIGEST_SIZES: Final = (32, 48, 64)
"""Accepted bundle digest sizes: SHA-256, SHA-384, SHA-512."""

_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding:
    """What the caller expects the evidence to commit to (the ``expected_binding`` of ``attest``).

    Attributes:
        nonce: the broker's single-use challenge, 32 bytes.
        executor_public_key: the executor's ephemeral HPKE public key, 1..4096 bytes (encoded form of
            the suite's KEM).
        hpke_suite: identifier of the HPKE suite of that key, printable ASCII, 1..128 bytes.
        cluster_id: identity of the Ray cluster the executor joins, UTF-8, 1..256 bytes.
        bundle_digest: digest of the approved code bundle, 32, 48 or 64 bytes.

    Raises:
        ValueError: a field is outside its size range (the message names it).
        TypeError: a field has the wrong type.
    """

    nonce: bytes
    executor_public_key: bytes
    hpke_suite: str
    cluster_id: str
    bundle_digest: bytes

    def __post_init__(self) -> None:
        for name in ("nonce", "executor_public_key", "bundle_digest"):
            if not isinstance(getattr(self, name), bytes):
                raise TypeError(f"Binding.{name} must be bytes, got {type(getattr(self, name)).__name__}")
        for name in ("hpke_suite", "cluster_id"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"Binding.{name} must be str, got {type(getattr(self, name)).__name__}")
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"Binding.nonce must be {NONCE_SIZE} bytes, got {len(self.nonce)}")
        if not 1 <= len(self.executor_public_key) <= MAX_PUBLIC_KEY_SIZE:
            raise ValueError(
                f"Binding.executor_public_key must be 1..{MAX_PUBLIC_KEY_SIZE} bytes, "
                f"got {len(self.executor_public_key)}"
            )
        if not (
            1 <= len(self.hpke_suite) <= MAX_SUITE_SIZE
            and self.hpke_suite.isascii()
            and self.hpke_suite.isprintable()
        ):
            raise ValueError(f"Binding.hpke_suite must be 1..{MAX_SUITE_SIZE} printable ASCII characters")
        if not 1 <= len(self.cluster_id.encode("utf-8")) <= MAX_CLUSTER_ID_SIZE:
            raise ValueError(f"Binding.cluster_id must be 1..{MAX_CLUSTER_ID_SIZE} bytes of UTF-8")
        if len(self.bundle_digest) not in DIGEST_SIZES:
            raise ValueError(
                f"Binding.bundle_digest must be one of {DIGEST_SIZES} bytes, got {len(self.bundle_digest)}"
            )

    def encode(self) -> bytes:
        """Canonical encoding (see the module docstring); injective over valid bindings."""
        parts = (
            CONTEXT,
            self.hpke_suite.encode("ascii"),
            self.nonce,
            self.executor_public_key,
            self.cluster_id.encode("utf-8"),
            self.bundle_digest,
        )
        return bytes([VERSION]) + b"".join(_U32.pack(len(p)) + p for p in parts)

    @classmethod
    def decode(cls, data: bytes) -> Binding:
        """Parse :meth:`encode` output.

        Raises:
            EvidenceFormatError: wrong version or context, a length over its maximum, truncated or
                trailing bytes, or a field outside its range.
        """
        maxima = (len(CONTEXT), MAX_SUITE_SIZE, NONCE_SIZE, MAX_PUBLIC_KEY_SIZE, MAX_CLUSTER_ID_SIZE, 64)
        if not data or data[0] != VERSION:
            raise EvidenceFormatError("binding: unsupported version byte")
        pos, parts = 1, []
        for maximum in maxima:
            if pos + 4 > len(data):
                raise EvidenceFormatError("binding: truncated length prefix")
            (size,) = _U32.unpack_from(data, pos)
            pos += 4
            if size > maximum:
                raise EvidenceFormatError(f"binding: length {size} over its maximum {maximum}")
            if pos + size > len(data):
                raise EvidenceFormatError("binding: truncated field")
            parts.append(bytes(data[pos : pos + size]))
            pos += size
        if pos != len(data):
            raise EvidenceFormatError("binding: trailing bytes")
        context, suite, nonce, key, cluster, digest = parts
        if context != CONTEXT:
            raise EvidenceFormatError("binding: wrong context string")
        try:
            return cls(
                nonce=nonce,
                executor_public_key=key,
                hpke_suite=suite.decode("ascii"),
                cluster_id=cluster.decode("utf-8"),
                bundle_digest=digest,
            )
        except (UnicodeDecodeError, ValueError) as exc:
            raise EvidenceFormatError(f"binding: {exc}") from None

    def report_data(self) -> bytes:
        """SHA-512 of the encoding: the 64 bytes of SNP REPORT_DATA, TDX/SGX REPORTDATA, Nitro user_data."""
        return hashlib.sha512(self.encode()).digest()

    def gpu_nonce(self) -> bytes:
        """SHA-256(GPU_NONCE_CONTEXT || encoding): the 32-byte SPDM nonce for GPUs of this CPU session."""
        return hashlib.sha256(GPU_NONCE_CONTEXT + self.encode()).digest()


__all__ = ["CONTEXT", "GPU_NONCE_CONTEXT", "VERSION", "Binding"]
