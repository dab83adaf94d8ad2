"""Chunked AES-256-GCM with STREAM nonces (Hoang, Reyhanitabar, Rogaway, Vizar, CRYPTO 2015).

Chunk ``i`` of ``n`` is sealed under nonce ``prefix(7) || i (u32 BE) || last (u8: 1 for i == n-1)``
with the same associated data for every chunk. Reordering, duplicating, truncating at a chunk
boundary or splicing a chunk from another object therefore fails authentication.

Work is split across a small thread pool: ``cryptography`` releases the GIL for AEAD inputs of
2 KiB and up, so chunks are encrypted in parallel directly between caller-owned buffers (no
intermediate copies; the plaintext may be a list of scattered segments, as Arrow IPC produces).

    >>> key, prefix = bytes(32), bytes(7)
    >>> pt = b"hello world" * 1000
    >>> out = bytearray(sealed_length(len(pt), 4096))
    >>> encrypt_segments(key, prefix, b"aad", [memoryview(pt)], len(pt), 4096, memoryview(out))
    >>> back = bytearray(len(pt))
    >>> decrypt_into(key, prefix, b"aad", memoryview(out), len(pt), 4096, memoryview(back))
    >>> bytes(back) == pt
    True
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ray_confidential.errors import DecryptionError

TAG_SIZE = 16
NONCE_PREFIX_SIZE = 7
_MIN_PARALLEL_BYTES = 1 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="rc-aead")
        return _pool


def chunk_count(plaintext_len: int, chunk_size: int) -> int:
    """Number of chunks: at least one, so that even an empty payload carries a last-chunk tag."""
    return max(1, -(-plaintext_len // chunk_size))


def sealed_length(plaintext_len: int, chunk_size: int) -> int:
    """Bytes of ciphertext (chunks plus one tag each) for ``plaintext_len`` bytes of plaintext."""
    return plaintext_len + TAG_SIZE * chunk_count(plaintext_len, chunk_size)


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if last else 0)


def _run(jobs: int, fn: Callable[[int], None], total_bytes: int) -> None:
    if jobs == 1 or total_bytes < _MIN_PARALLEL_BYTES:
        for i in range(jobs):
            fn(i)
        return
    for future in [_executor().submit(fn, i) for i in range(jobs)]:
        future.result()


def encrypt_segments(
    key: bytes,
    nonce_prefix: bytes,
    aad: bytes,
    segments: Sequence[memoryview],
    plaintext_len: int,
    chunk_size: int,
    out: memoryview,
) -> None:
    """Encrypt the concatenation of ``segments`` (``plaintext_len`` bytes) into ``out``.

    ``out`` must be exactly :func:`sealed_length` bytes. Segments are byte-format memoryviews.
    """
    if len(nonce_prefix) != NONCE_PREFIX_SIZE:
        raise ValueError("nonce prefix must be 7 bytes")
    if sum(len(s) for s in segments) != plaintext_len or len(out) != sealed_length(plaintext_len, chunk_size):
        raise ValueError("segment lengths or output size do not match plaintext_len")
    n = chunk_count(plaintext_len, chunk_size)
    starts: list[int] = []
    pos = 0
    for seg in segments:
        starts.append(pos)
        pos += len(seg)
    aead = AESGCM(key)

    def pieces(lo: int, hi: int) -> list[memoryview]:
        found = []
        for seg, start in zip(segments, starts, strict=True):
            end = start + len(seg)
            if end <= lo or start >= hi:
                continue
            found.append(seg[max(lo, start) - start : min(hi, end) - start])
        return found

    def one(i: int) -> None:
        lo, hi = i * chunk_size, min((i + 1) * chunk_size, plaintext_len)
        nonce = _nonce(nonce_prefix, i, i == n - 1)
        dst = out[i * (chunk_size + TAG_SIZE) : i * (chunk_size + TAG_SIZE) + (hi - lo) + TAG_SIZE]
        parts = pieces(lo, hi)
        if len(parts) <= 1:
            aead.encrypt_into(nonce, parts[0] if parts else b"", aad, dst)
            return
        # A chunk spanning several segments: incremental GCM avoids gathering it into a copy.
        enc = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        written = 0
        for part in parts:
            written += enc.update_into(part, dst[written:])
        enc.finalize()
        dst[hi - lo :] = enc.tag

    _run(n, one, plaintext_len)


def decrypt_into(
    key: bytes,
    nonce_prefix: bytes,
    aad: bytes,
    ciphertext: memoryview,
    plaintext_len: int,
    chunk_size: int,
    out: memoryview,
) -> None:
    """Decrypt and authenticate every chunk of ``ciphertext`` into ``out`` (``plaintext_len`` bytes).

    Raises:
        DecryptionError: wrong length, or any chunk fails authentication. ``out`` may then hold
            partial plaintext of authenticated chunks; callers discard it.
    """
    if len(ciphertext) != sealed_length(plaintext_len, chunk_size) or len(out) != plaintext_len:
        raise DecryptionError()
    n = chunk_count(plaintext_len, chunk_size)
    aead = AESGCM(key)

    def one(i: int) -> None:
        lo, hi = i * chunk_size, min((i + 1) * chunk_size, plaintext_len)
        src = ciphertext[i * (chunk_size + TAG_SIZE) : i * (chunk_size + TAG_SIZE) + (hi - lo) + TAG_SIZE]
        try:
            aead.decrypt_into(_nonce(nonce_prefix, i, i == n - 1), src, aad, out[lo:hi])
        except (InvalidTag, ValueError) as exc:
            raise DecryptionError() from exc

    _run(n, one, plaintext_len)
