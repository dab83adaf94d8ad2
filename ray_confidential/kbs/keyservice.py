"""``KeyService`` for an attested executor: descriptors and unwraps through the key broker.

    svc = AttestedKeyService(client, executor_key=key, obtain_token=lambda: attest_again())  # doctest: +SKIP
    value = open_sealed(blob, svc)

The token comes from ``obtain_token`` (the executor's own challenge -> evidence -> Attest round trip)
and is renewed ``refresh_margin`` seconds before it expires. Unwrapped DEKs are cached per header hash
for at most the token's lifetime, and dropped, with the token, whenever the broker's revocation epoch
changes; the epoch is polled at most every ``epoch_interval`` seconds (10 s by default: the SLA of
docs/kbs.md "Revocation").
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from typing import Final, NoReturn

from ray_confidential.crypto import hpke
from ray_confidential.domains import DomainDescriptor
from ray_confidential.errors import DecryptionError
from ray_confidential.kbs.client import KBSClient, Token
from ray_confidential.sealed.format import SealedHeader

EPOCH_INTERVAL: Final = 10.0


class AttestedKeyService:
    """Implements :class:`ray_confidential.keyservice.KeyService` for one executor key.

    Args:
        client: a :class:`KBSClient` with the broker's CA and release key pinned.
        executor_key: the executor's ephemeral HPKE key (the tokens' ``cnf``).
        obtain_token: performs a fresh attestation and returns a release-scope token.
        clock: Unix time in seconds (compared with token ``exp``).
        epoch_interval: seconds between revocation-epoch polls (<= 10).
        refresh_margin: renew the token this many seconds before it expires.
    """

    def __init__(
        self,
        client: KBSClient,
        *,
        executor_key: hpke.PrivateKeyHandle,
        obtain_token: Callable[[], Token],
        clock: Callable[[], float] = time.time,
        epoch_interval: float = EPOCH_INTERVAL,
        refresh_margin: float = 15.0,
    ) -> None:
        if not 0 < epoch_interval <= EPOCH_INTERVAL:
            raise ValueError(f"epoch_interval must be in (0, {EPOCH_INTERVAL}] seconds (revocation SLA)")
        self._client, self._key, self._obtain = client, executor_key, obtain_token
        self._clock, self._interval, self._margin = clock, epoch_interval, refresh_margin
        self._lock = threading.Lock()
        self._token: Token | None = None
        self._deks: dict[bytes, tuple[bytes, float]] = {}
        self._descriptors: dict[tuple[str, int | None], DomainDescriptor] = {}
        self._epoch: int | None = None
        self._polled = float("-inf")

    def __reduce__(self) -> NoReturn:
        raise TypeError("AttestedKeyService holds data keys and an executor key; it never crosses processes")

    def drop(self) -> None:
        """Forget the token and every cached DEK."""
        with self._lock:
            self._token = None
            self._deks.clear()

    def _poll_epoch(self, now: float) -> None:
        if now - self._polled < self._interval:
            return
        epoch = self._client.revocation_epoch()
        self._polled = now
        if self._epoch is not None and epoch != self._epoch:
            self.drop()
        self._epoch = epoch

    def _current_token(self, now: float) -> Token:
        token = self._token
        if token is None or token.expires_at - self._margin <= now:
            token = self._obtain()
            self._token = token
        return token

    def descriptor(self, domain: str, version: int | None = None) -> DomainDescriptor:
        cached = self._descriptors.get((domain, version))
        if cached is None:
            cached = self._client.descriptor(domain, version)
            self._descriptors[(domain, version)] = cached
        return cached

    def unwrap(self, wrapped_dek: bytes, header_hash: bytes, header: bytes) -> bytes:
        """The DEK of the object whose header is ``header`` (cached for the token's lifetime).

        Raises:
            DecryptionError: ``header`` does not match ``wrapped_dek`` / ``header_hash``.
            KeyReleaseDenied: the broker refused, is unreachable, or answered falsely.
        """
        parsed = SealedHeader.parse(header)
        if not hmac.compare_digest(parsed.header_hash, header_hash) or parsed.wrapped_dek != wrapped_dek:
            raise DecryptionError()
        now = self._clock()
        self._poll_epoch(now)
        with self._lock:
            hit = self._deks.get(parsed.header_hash)
            if hit is not None and hit[1] > now:
                return hit[0]
        token = self._current_token(now)
        dek = self._client.unwrap(token, parsed.header_bytes, self._key)
        with self._lock:
            if self._token is token:
                self._deks[parsed.header_hash] = (dek, float(token.expires_at))
        return dek


__all__ = ["EPOCH_INTERVAL", "AttestedKeyService"]
