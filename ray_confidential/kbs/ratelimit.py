"""Per-client token-bucket rate limits.

>>> t = [0.0]
>>> rl = RateLimiter(rate=1.0, burst=2, clock=lambda: t[0])
>>> [rl.allow("c") for _ in range(3)]
[True, True, False]
>>> t[0] = 1.0
>>> rl.allow("c")
True
>>> t[0] = 3.0
>>> rl.allow("c", cost=2), rl.allow("c")
(True, False)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    """``rate`` requests per second per client, bursts up to ``burst``; at most ``max_clients`` tracked."""

    def __init__(
        self, *, rate: float, burst: int, clock: Callable[[], float], max_clients: int = 100_000
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate limit needs rate > 0 and burst >= 1")
        self.rate, self.burst, self._clock, self._max = rate, burst, clock, max_clients
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, client: str, cost: int = 1) -> bool:
        """Take ``cost`` tokens (one per unit of work: an UnwrapMany costs one per object) from
        ``client``'s bucket; False, taking nothing, when it holds fewer. A request that costs more
        than ``burst`` is allowed only from a full bucket, which it leaves in debt (negative), so
        over time every unit is still paid at ``rate``.

        Raises:
            ValueError: ``cost`` < 1.
        """
        if cost < 1:
            raise ValueError(f"rate limit cost must be >= 1, got {cost}")
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            allowed = tokens >= min(float(cost), float(self.burst))
            if allowed:
                tokens -= cost
            self._buckets[client] = (tokens, now)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
            return allowed


__all__ = ["RateLimiter"]
