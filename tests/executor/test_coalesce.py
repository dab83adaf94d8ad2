"""Coalescer: a lone request fetches at once; requests that arrive during a fetch share the next one."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from enclave_actors.coalesce import Coalescer


class Fetcher:
    """Records each fetch's items; the first fetch of a group can be held in flight."""

    def __init__(self, held: int = 1) -> None:
        self.fetches: list[list[str]] = []
        self.hold = threading.Event()
        self.entered = threading.Event()
        self.held = held
        self.fail: set[str] = set()

    def __call__(self, context: str, items: Sequence[str]) -> list[str]:
        self.fetches.append(list(items))
        if len(self.fetches) <= self.held:
            if len(self.fetches) == self.held:
                self.entered.set()
            assert self.hold.wait(10)
        if self.fail & set(items):
            raise LookupError(f"refused {sorted(self.fail & set(items))}")
        return [f"{context}:{item.upper()}" for item in items]


def _queued(c: Coalescer[Any, Any, Any, Any], n: int) -> None:
    deadline = time.monotonic() + 10
    while sum(len(b.items) for b in c._open.values()) < n and time.monotonic() < deadline:
        time.sleep(0.005)


def _start(
    c: Coalescer[Any, Any, Any, Any], jobs: list[tuple[str, dict[str, str]]]
) -> tuple[list[Any], list[threading.Thread]]:
    out: list[Any] = [None] * len(jobs)

    def one(i: int, group: str, items: dict[str, str]) -> None:
        try:
            out[i] = c.run(group, items, "ctx")
        except Exception as exc:  # recorded for the assertions
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i, g, items)) for i, (g, items) in enumerate(jobs)]
    for t in threads:
        t.start()
    return out, threads


def test_a_lone_request_fetches_at_once() -> None:
    f = Fetcher()
    f.hold.set()
    c: Coalescer[str, str, str, str] = Coalescer(f)
    assert c.run("g", {"1": "a", "2": "b"}, "ctx") == {"1": "ctx:A", "2": "ctx:B"}
    assert f.fetches == [["a", "b"]] and c.calls == 1


def test_requests_arriving_during_a_fetch_share_the_next_one_and_get_their_own_results() -> None:
    f = Fetcher()
    c: Coalescer[str, str, str, str] = Coalescer(f, depth=1)
    first, t1 = _start(c, [("g", {"1": "a"})])
    assert f.entered.wait(10)
    rest, t2 = _start(c, [("g", {"2": "b"}), ("g", {"3": "c", "1": "a"}), ("g", {"4": "d"})])
    _queued(c, 4)
    f.hold.set()
    for t in [*t1, *t2]:
        t.join(10)
    assert f.fetches[0] == ["a"] and sorted(f.fetches[1]) == ["a", "b", "c", "d"] and len(f.fetches) == 2
    assert first == [{"1": "ctx:A"}]
    assert rest == [{"2": "ctx:B"}, {"3": "ctx:C", "1": "ctx:A"}, {"4": "ctx:D"}]


def test_a_full_batch_starts_the_next_one_in_order() -> None:
    f = Fetcher()
    c: Coalescer[str, str, str, str] = Coalescer(f, max_items=2, depth=1)
    _, t1 = _start(c, [("g", {"0": "z"})])
    assert f.entered.wait(10)
    _, t2 = _start(c, [("g", {"1": "a"}), ("g", {"2": "b"})])
    _queued(c, 2)
    _, t3 = _start(c, [("g", {"3": "c"})])  # would make three: the batch after
    _queued(c, 1)
    f.hold.set()
    for t in [*t1, *t2, *t3]:
        t.join(10)
    assert [sorted(x) for x in f.fetches] == [["z"], ["a", "b"], ["c"]]


def test_a_failed_fetch_fails_its_batch_only() -> None:
    f = Fetcher()
    f.fail = {"b"}
    c: Coalescer[str, str, str, str] = Coalescer(f, depth=1)
    _, t1 = _start(c, [("g", {"0": "z"})])
    assert f.entered.wait(10)
    out, t2 = _start(c, [("g", {"1": "a"}), ("g", {"2": "b"})])
    _queued(c, 2)
    f.hold.set()
    for t in [*t1, *t2]:
        t.join(10)
    assert all(isinstance(x, LookupError) for x in out)  # a and b shared the failed fetch
    assert c.run("g", {"1": "a"}, "ctx") == {"1": "ctx:A"}  # the next batch is unaffected


def test_up_to_depth_fetches_are_in_flight_at_once() -> None:
    f = Fetcher(held=2)
    c: Coalescer[str, str, str, str] = Coalescer(f, depth=2)
    first, t1 = _start(c, [("g", {"0": "z"}), ("g", {"1": "a"})])  # both fetch at once
    assert f.entered.wait(10)
    third, t2 = _start(c, [("g", {"2": "b"})])  # a third fetch in flight would exceed depth: it waits
    _queued(c, 1)
    assert len(f.fetches) == 2
    f.hold.set()
    for t in [*t1, *t2]:
        t.join(10)
    assert sorted(map(tuple, f.fetches[:2])) == [("a",), ("z",)] and f.fetches[2] == ["b"]
    assert first == [{"0": "ctx:Z"}, {"1": "ctx:A"}] and third == [{"2": "ctx:B"}]


def test_groups_do_not_wait_for_each_other() -> None:
    f = Fetcher()
    c: Coalescer[str, str, str, str] = Coalescer(f)
    _, t1 = _start(c, [("g", {"0": "z"})])
    assert f.entered.wait(10)
    assert c.run("other", {"1": "a"}, "ctx") == {"1": "ctx:A"}  # while g's fetch is still in flight
    f.hold.set()
    for t in t1:
        t.join(10)


def test_request_size_is_checked() -> None:
    c: Coalescer[str, str, str, str] = Coalescer(Fetcher(), max_items=2)
    with pytest.raises(ValueError):
        c.run("g", {}, "ctx")
    with pytest.raises(ValueError):
        c.run("g", {"1": "a", "2": "b", "3": "c"}, "ctx")
    with pytest.raises(ValueError):
        Coalescer(Fetcher(), max_items=0)
    with pytest.raises(ValueError):
        Coalescer(Fetcher(), depth=0)
