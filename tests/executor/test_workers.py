"""WorkerPools: parallel workers per (domains, bundle) pair, bounds, eviction, waiting, reaping, clearing.

Workers here are stand-ins (no subprocess), so every case is about the pool's bookkeeping; the daemon
tests run real workers in parallel (tests/executor/test_daemon.py)."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest

from enclave_actors.workers import Key, WorkerLoadError, WorkerPools

A: Key = (("a",), b"\x01" * 32)
B: Key = (("b",), b"\x02" * 32)
_pids = itertools.count(1000)


class FakeWorker:
    def __init__(self, bundle: Any, memory_limit: int) -> None:
        self.pid, self.busy, self.last_used, self.stopped = next(_pids), False, 0.0, False
        self.stopped_for: str | None = None

    def alive(self) -> bool:
        return not self.stopped

    def stop(self, reason: str | None = None) -> None:
        self.stopped, self.stopped_for = True, self.stopped_for or reason


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pools(per_key: int = 2, max_workers: int = 3, start: Any = FakeWorker) -> tuple[WorkerPools, Clock]:
    clock = Clock()
    return WorkerPools(
        per_key=per_key, max_workers=max_workers, memory_limit=0, start=start, clock=clock
    ), clock


def test_an_idle_worker_is_reused_and_a_busy_pair_gets_another_up_to_per_key() -> None:
    p, _ = pools()
    with p.lease(A, None, timeout=1) as w1:  # type: ignore[arg-type]
        with p.lease(A, None, timeout=1) as w2:  # type: ignore[arg-type]
            assert w1 is not w2 and w1.busy and w2.busy
            with pytest.raises(TimeoutError):  # per_key = 2: a third call of A waits, then gives up
                with p.lease(A, None, timeout=0):  # type: ignore[arg-type]
                    pass
    with p.lease(A, None, timeout=1) as again:  # type: ignore[arg-type]
        assert again in (w1, w2) and not again.stopped
    assert p.started == 2 and len(p.pids()) == 2


def test_pairs_never_share_a_worker_and_the_total_is_bounded_by_evicting_the_oldest_idle() -> None:
    p, clock = pools(per_key=2, max_workers=2)
    with p.lease(A, None, timeout=1) as a1:  # type: ignore[arg-type]
        pass
    clock.now += 1
    with p.lease(B, None, timeout=1) as b1:  # type: ignore[arg-type]
        assert b1 is not a1
    clock.now += 1
    with p.lease(A, None, timeout=1) as a_again:  # type: ignore[arg-type]
        assert a_again is a1
        with p.lease(B, None, timeout=1) as b_again:  # type: ignore[arg-type]
            assert b_again is b1
            # Both workers busy and the total at its bound: a new pair waits rather than evicting one.
            with pytest.raises(TimeoutError):
                with p.lease((("c",), b"\x03" * 32), None, timeout=0):  # type: ignore[arg-type]
                    pass
    assert not a1.stopped and not b1.stopped
    clock.now += 1
    # Both idle now: a new pair stops the least recently used idle worker (A's, released first).
    with p.lease((("c",), b"\x03" * 32), None, timeout=1):  # type: ignore[arg-type]
        assert a1.stopped and not b1.stopped
    assert sorted(k.split("|")[0] for k in p.pids()) == ["b", "c"]


def test_a_waiting_call_gets_the_worker_that_comes_free() -> None:
    p, _ = pools(per_key=1, max_workers=1)
    got: list[Any] = []
    leased, release = threading.Event(), threading.Event()

    def first() -> None:
        with p.lease(A, None, timeout=5) as w:  # type: ignore[arg-type]
            got.append(w)
            leased.set()
            release.wait(5)

    t = threading.Thread(target=first)
    t.start()
    assert leased.wait(5)
    second = threading.Thread(target=lambda: got.append(p.lease(A, None, timeout=5).__enter__()))  # type: ignore[arg-type]
    second.start()
    release.set()
    t.join(5)
    second.join(5)
    assert len(got) == 2 and got[0] is got[1] and p.started == 1


def test_a_dead_idle_worker_is_replaced_and_a_discarded_one_stopped() -> None:
    p, _ = pools()
    with p.lease(A, None, timeout=1) as w:  # type: ignore[arg-type]
        pass
    w.stopped = True  # died while idle
    with p.lease(A, None, timeout=1) as fresh:  # type: ignore[arg-type]
        assert fresh is not w
        p.discard(A, fresh)  # timed out or crashed mid-call
        assert fresh.stopped
    assert p.pids() == {}


def test_a_bundle_that_does_not_load_frees_its_slot() -> None:
    def failing(bundle: Any, memory_limit: int) -> FakeWorker:
        raise WorkerLoadError("the code bundle failed to load in the executor")

    p, _ = pools(per_key=1, max_workers=1, start=failing)
    for _ in range(3):  # the slot is given back each time (else the second try would time out)
        with pytest.raises(WorkerLoadError):
            with p.lease(A, None, timeout=0):  # type: ignore[arg-type]
                pass
    assert p.started == 0 and p.pids() == {}


def test_reap_stops_only_extra_workers_idle_long_enough() -> None:
    p, clock = pools(per_key=3, max_workers=3)
    with (
        p.lease(A, None, timeout=1) as w1,
        p.lease(A, None, timeout=1) as w2,
        p.lease(A, None, timeout=1) as w3,
    ):  # type: ignore[arg-type]
        pass
    clock.now += 10
    with p.lease(A, None, timeout=1) as recent:  # type: ignore[arg-type]
        pass
    assert p.reap(idle_s=60) == 0
    clock.now += 55  # two have been idle 65 s, the recent one 55 s
    assert p.reap(idle_s=60) == 2
    assert not recent.stopped and sum(w.stopped for w in (w1, w2, w3)) == 2
    clock.now += 100
    assert p.reap(idle_s=60) == 0  # the last worker of a pair stays
    assert len(p.pids()) == 1


def test_clear_stops_busy_workers_and_one_started_meanwhile_is_not_kept() -> None:
    started, go = threading.Event(), threading.Event()

    def slow(bundle: Any, memory_limit: int) -> FakeWorker:
        started.set()
        go.wait(5)
        return FakeWorker(bundle, memory_limit)

    p, _ = pools(start=slow)
    out: list[FakeWorker] = []

    def call() -> None:
        with p.lease(A, None, timeout=5) as w:  # type: ignore[arg-type]
            out.append(w)

    t = threading.Thread(target=call)
    t.start()
    assert started.wait(5)
    assert p.clear() == 0  # revocation while the worker is starting
    go.set()
    t.join(5)
    assert out and out[0].stopped and p.pids() == {}  # it served its call, then was stopped, not pooled


def test_clear_tells_a_busy_workers_call_why_it_was_stopped() -> None:
    p, _ = pools()
    with p.lease(A, None, timeout=5) as busy:  # type: ignore[arg-type]
        with p.lease(B, None, timeout=5) as other:  # type: ignore[arg-type]
            pass
        assert p.clear("revocation epoch 1 -> 2") == 2
        assert busy.stopped and busy.stopped_for == "revocation epoch 1 -> 2"
    assert other.stopped_for == "revocation epoch 1 -> 2" and p.pids() == {}
    with p.lease(A, None, timeout=5) as fresh:  # type: ignore[arg-type]
        p.discard(A, fresh)  # a crash: stopped without a reason, so its call reports a crash
    assert fresh.stopped and fresh.stopped_for is None


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="per_key"):
        WorkerPools(per_key=0, max_workers=4, memory_limit=0)
    with pytest.raises(ValueError, match="per_key"):
        WorkerPools(per_key=5, max_workers=4, memory_limit=0)
