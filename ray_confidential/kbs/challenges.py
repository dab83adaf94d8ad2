"""Challenge nonces: 32 bytes, single use, short-lived, bound to a session (design.md section 5, step 2).

    >>> store = ChallengeStore(ttl=1.0, clock=lambda: 100.0)
    >>> c = store.issue()
    >>> store.consume(c.nonce, c.session_id)  # first use: fine
    >>> store.consume(c.nonce, c.session_id)
    Traceback (most recent call last):
    ...
    ray_confidential.errors.KeyReleaseDenied: challenge: unknown or already used nonce

A nonce is removed on its first presentation, whatever the outcome, so a failed attempt cannot be
retried with the same nonce. The store is bounded (``max_outstanding``); issuing beyond it evicts the
oldest challenge.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ray_confidential.errors import KeyReleaseDenied

NONCE_SIZE: Final = 32
SESSION_SIZE: Final = 16


@dataclass(frozen=True, slots=True)
class IssuedChallenge:
    nonce: bytes
    session_id: bytes
    expires_at: float


class ChallengeStore:
    """Outstanding challenges, thread-safe.

    Args:
        ttl: seconds a challenge stays valid.
        clock: returns the current time in seconds (no hidden clock).
        max_outstanding: bound on stored challenges (oldest evicted first).
    """

    def __init__(self, *, ttl: float, clock: Callable[[], float], max_outstanding: int = 100_000) -> None:
        if ttl <= 0:
            raise ValueError("challenge ttl must be > 0 seconds")
        self.ttl, self._clock, self._max = ttl, clock, max_outstanding
        self._lock = threading.Lock()
        self._pending: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def issue(self) -> IssuedChallenge:
        nonce, session = os.urandom(NONCE_SIZE), os.urandom(SESSION_SIZE)
        now = self._clock()
        with self._lock:
            self._expire(now)
            while len(self._pending) >= self._max:
                self._pending.popitem(last=False)
            self._pending[nonce] = (session, now + self.ttl)
        return IssuedChallenge(nonce, session, now + self.ttl)

    def consume(self, nonce: bytes, session_id: bytes) -> None:
        """Use up ``nonce``. Raises KeyReleaseDenied if unknown, used, expired or of another session."""
        now = self._clock()
        with self._lock:
            entry = self._pending.pop(bytes(nonce), None)
        if entry is None:
            raise KeyReleaseDenied("challenge: unknown or already used nonce")
        session, expires = entry
        if now >= expires:
            raise KeyReleaseDenied("challenge: nonce expired")
        if not hmac.compare_digest(session, bytes(session_id)):
            raise KeyReleaseDenied("challenge: nonce belongs to another session")

    def _expire(self, now: float) -> None:
        # Entries are in issue order and share one ttl, so expired ones are at the front.
        while self._pending:
            _, (_, expires) = next(iter(self._pending.items()))
            if expires > now:
                break
            self._pending.popitem(last=False)


__all__ = ["NONCE_SIZE", "ChallengeStore", "IssuedChallenge"]
