"""Revocation: by node, measurement, TCB, token or bundle digest; checked on every unwrap.

Each entry is scoped to the owner who revoked (it then applies to that owner's domains) or global
(``owner=None``, a broker administrator). The epoch increases with every revocation; executors poll
it (``GetRevocationEpoch``) at least every 10 s and drop cached data keys when it changes
(docs/kbs.md "Revocation SLA").

    >>> rl = RevocationList()
    >>> rl.revoke("node", "n1", owner="CN=a")
    1
    >>> rl.check(owner="CN=a", node="n1", measurement="", tcb="", token="", bundle="")
    Traceback (most recent call last):
    ...
    ray_confidential.errors.KeyReleaseDenied: revoked node 'n1'
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any, Final

from ray_confidential.errors import KeyReleaseDenied

KINDS: Final = ("node", "measurement", "tcb", "token", "bundle")


class RevocationList:
    """Thread-safe revocation entries and epoch (restored from / exported to the key store)."""

    def __init__(self, entries: Iterable[tuple[str, str, str | None]] = (), epoch: int = 0) -> None:
        self._lock = threading.Lock()
        self._entries: set[tuple[str, str, str | None]] = set()
        for kind, value, owner in entries:
            self._add(kind, value, owner)
        self.epoch = epoch

    def _add(self, kind: str, value: str, owner: str | None) -> None:
        if kind not in KINDS:
            raise ValueError(f"revocation kind must be one of {KINDS}, got {kind!r}")
        if not value:
            raise ValueError("revocation value must be non-empty")
        self._entries.add((kind, value.lower() if kind in ("measurement", "bundle") else value, owner))

    def revoke(self, kind: str, value: str, *, owner: str | None) -> int:
        """Add an entry; returns the new epoch."""
        with self._lock:
            self._add(kind, value, owner)
            self.epoch += 1
            return self.epoch

    def check(
        self, *, owner: str | None, node: str, measurement: str, tcb: str, token: str, bundle: str
    ) -> None:
        """Raises KeyReleaseDenied if any of the values is revoked globally or by ``owner``."""
        values = {"node": node, "measurement": measurement.lower(), "tcb": tcb, "token": token,
                  "bundle": bundle.lower()}  # fmt: skip
        with self._lock:
            for kind, value in values.items():
                if value and ((kind, value, None) in self._entries or (kind, value, owner) in self._entries):
                    raise KeyReleaseDenied(f"revoked {kind} {value!r}")

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"epoch": self.epoch, "entries": sorted(map(list, self._entries), key=str)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RevocationList:
        return cls(
            [(str(k), str(v), None if o is None else str(o)) for k, v, o in d["entries"]], int(d["epoch"])
        )


__all__ = ["KINDS", "RevocationList"]
