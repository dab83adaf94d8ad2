"""Sealed objects: the public recipes ``seal`` / ``open_sealed``; format details in ``format``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_confidential.errors import DecryptionError
from ray_confidential.sealed.format import DomainPublicKey, SealedHeader, open_with_dek, seal

if TYPE_CHECKING:
    from ray_confidential.crypto.hpke import PrivateKeyHandle
    from ray_confidential.keyservice import KeyService

__all__ = ["DomainPublicKey", "SealedHeader", "open_as_recipient", "open_sealed", "seal"]


def open_sealed(data: Any, key_service: KeyService) -> Any:
    """Open sealed bytes through ``key_service`` (which decides whether the caller may).

    Raises:
        KeyReleaseDenied: the key service will not unwrap for this caller.
        DecryptionError: the object was tampered with, or its key version is retired or unknown.
    """
    header = SealedHeader.parse(data)  # parsed once: open_with_dek reuses it
    dek = key_service.unwrap(header.wrapped_dek, header.header_hash, header.header_bytes)
    try:
        allow_pickle = key_service.descriptor(header.domain, header.key_version).allow_pickle
    except ValueError as exc:
        raise DecryptionError() from exc
    return open_with_dek(data, dek, allow_pickle=allow_pickle, header=header)


def open_as_recipient(data: Any, private_key: PrivateKeyHandle) -> Any:
    """Open a result an executor sealed to a policy-listed recipient key (``recipients=``; key
    version 0, docs/executor.md) with that key's private half, held by the recipient. No pickle.

    Raises:
        DecryptionError: not sealed to this key, or tampered with.
    """
    header = SealedHeader.parse(data)
    if header.key_version != 0 or header.suite != private_key.suite:
        raise DecryptionError()
    dek = private_key.unwrap(header.wrapped_dek, info=header.header_hash)
    return open_with_dek(data, dek, allow_pickle=False, header=header)
