"""Concurrent requests of one group share one call at a time, like an audit log's group commit.

    together = Coalescer(fetch)                  # fetch(context, items) -> one result per item
    results = together.run(group, {item_id: item, ...}, context)

A request that finds fewer than ``depth`` fetches in flight for its group fetches its items at once.
Otherwise it joins the group's next batch; the first to join leads it, waits until a fetch in flight
has returned and earlier batches have left, then fetches every item that joined meanwhile in one
call (at most ``max_items``; a request that would overflow the batch starts the one after it). So one request alone costs no extra
wait, and under load N requests cost about ``depth`` calls per fetch time instead of N calls. The
executor keeps the default depth of one: on a busy node larger batches cost the broker and the
executor less CPU per key than a second fetch in flight saves in waiting (benchmarks/kbs.py,
docs/kbs.md "Fourth pass"). The executor groups the data
keys of concurrent calls by token (one ``UnwrapMany`` for the objects of several calls).

What it does NOT do: retry, or split a failed batch: when a fetch raises, every request of the batch
gets the exception (the executor then asks for its own objects alone, so that a refusal names them).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Generic, TypeVar

G = TypeVar("G", bound=Hashable)
C = TypeVar("C")
T = TypeVar("T")
R = TypeVar("R")


class _Batch(Generic[T, R]):
    def __init__(self) -> None:
        self.items: dict[Hashable, T] = {}
        self.done = threading.Event()
        self.results: dict[Hashable, R] = {}
        self.error: BaseException | None = None


class Coalescer(Generic[G, C, T, R]):
    """Group commit for fetches (module docstring).

    Args:
        fetch: ``fetch(context, items)`` returns one result per item, in order; it runs on the leader's
            thread with the leader's ``context`` (requests of one group must be able to share it).
        max_items: most items one fetch carries.
        depth: most fetches in flight per group.
    """

    def __init__(
        self, fetch: Callable[[C, Sequence[T]], Sequence[R]], *, max_items: int = 64, depth: int = 1
    ) -> None:
        if max_items < 1 or depth < 1:
            raise ValueError("max_items and depth must be at least 1")
        self._fetch, self._max, self._depth = fetch, max_items, depth
        self._cond = threading.Condition()
        self._open: dict[G, _Batch[T, R]] = {}
        self._in_flight: dict[G, int] = {}
        self._queue: dict[G, deque[_Batch[T, R]]] = {}  # batches waiting to be fetched, oldest first
        self.calls = 0

    def run(self, group: G, items: Mapping[Hashable, T], context: C) -> dict[Hashable, R]:
        """The results for ``items`` (by their ids), fetched alone or together with concurrent requests
        of ``group``.

        Raises:
            whatever the fetch of this request's batch raised.
        """
        if not 0 < len(items) <= self._max:
            raise ValueError(f"1 to {self._max} items per request, got {len(items)}")
        with self._cond:
            batch = self._open.get(group)
            lead = batch is None or len(batch.items.keys() | items.keys()) > self._max
            if lead:
                batch = self._open[group] = _Batch()
                self._queue.setdefault(group, deque()).append(batch)
            assert batch is not None
            batch.items.update(items)
        if lead:
            self._lead(group, batch, context)
        else:
            batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return {k: batch.results[k] for k in items}

    def _lead(self, group: G, batch: _Batch[T, R], context: C) -> None:
        with self._cond:
            queue = self._queue[group]
            while self._in_flight.get(group, 0) >= self._depth or queue[0] is not batch:
                self._cond.wait()  # later requests keep joining this batch meanwhile
            queue.popleft()
            if not queue:
                del self._queue[group]
            if self._open.get(group) is batch:
                del self._open[group]  # closed: later requests start the next batch
            self._in_flight[group] = self._in_flight.get(group, 0) + 1
            ids, values = list(batch.items), list(batch.items.values())
            self.calls += 1
        try:
            out = self._fetch(context, values)
            if len(out) != len(values):
                raise RuntimeError("fetch returned another number of results than items")
            batch.results = dict(zip(ids, out, strict=True))
        except BaseException as exc:
            batch.error = exc
        finally:
            with self._cond:
                self._in_flight[group] -= 1
                if not self._in_flight[group]:
                    del self._in_flight[group]
                self._cond.notify_all()
            batch.done.set()


__all__ = ["Coalescer"]
