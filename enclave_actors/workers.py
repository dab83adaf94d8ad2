"""The executor's worker subprocesses, pooled per (domains, bundle) pair (docs/executor.md "Calls", step 6).

    pools = WorkerPools(per_key=4, max_workers=16, memory_limit=0)
    with pools.lease((("hospital",), digest), bundle, timeout=30.0) as worker:
        ...                                       # one call at a time on ``worker``

A call takes an idle worker of its pair, or starts another while the pair has fewer than
``per_key``; beyond that it waits, within its time limit, for one to come free. So concurrent calls
of one function run in parallel (Ray schedules as many as the node has CPUs for), and a worker
still serves one (domains, bundle) pair only, never another. All pairs together hold at most
``max_workers``: a new worker first stops the least recently used idle worker of any pair, and waits
if every worker is busy. Workers beyond the first of a pair that stay idle for ``idle_s`` are stopped
(:meth:`WorkerPools.reap`, run by the daemon's poller).

What it does NOT do: decide what a worker may receive (the daemon does, per call), or reuse a worker
across pairs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

from enclave_actors import protocol
from ray_confidential.bundle import Bundle

Key = tuple[tuple[str, ...], bytes]
"""(sorted domains, bundle digest)."""

WORKER_ENV: Final = {"MIMALLOC_PURGE_DELAY": "1000", **os.environ}
"""Workers keep freed pages of Arrow's allocator (mimalloc) for 1 s instead of 10 ms: a large input
decrypts into pages the previous call freed instead of faulting in fresh zeroed ones (about 2 ms per
64 MiB when calls are more than 10 ms apart; benchmarks/executor.py). The pages stay inside the
worker, which serves one (domains, bundle) pair only."""

IDLE_S: Final = 60.0
"""Extra workers of a pair (beyond its first) idle this long are stopped."""


class WorkerLoadError(Exception):
    """The bundle failed to load in a new worker (its source does not import or lacks the entry)."""


class Worker:
    """One worker subprocess and its socket (owned by the daemon)."""

    def __init__(self, bundle: Bundle, memory_limit: int) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lock = threading.Lock()
        self.busy = False
        self.last_used = time.monotonic()
        self.stopped_for: str | None = None
        """Why the daemon stopped this worker on purpose (a key drop), so that a call it ends mid-way
        is told so instead of "the worker died"; None until then."""
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "enclave_actors.worker", str(child.fileno()), str(memory_limit)],
                pass_fds=(child.fileno(),),
                env=WORKER_ENV,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
            )
        finally:
            child.close()
        self.sock = parent
        self.sock.settimeout(120)
        try:
            protocol.send(self.sock, bundle.to_wire(), [d for _, d in bundle.files])
            reply = protocol.recv(self.sock)
        except (OSError, protocol.ProtocolError):
            reply = None
        if reply is None or reply.header.get("status") != "ok":
            self.stop()
            raise WorkerLoadError("the code bundle failed to load in the executor")

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, reason: str | None = None) -> None:
        """Kill the subprocess; ``reason`` (first one wins) marks a deliberate stop."""
        if reason is not None and self.stopped_for is None:
            self.stopped_for = reason
        try:
            self.sock.close()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()


class WorkerPools:
    """Idle and busy workers of every (domains, bundle) pair (module docstring).

    Args:
        per_key: most workers of one pair (calls of one function in parallel).
        max_workers: most workers of all pairs together.
        memory_limit: RLIMIT_AS of each worker, bytes (0: none).
        start: how a worker is started (tests may count or fail starts).
    """

    def __init__(
        self,
        *,
        per_key: int,
        max_workers: int,
        memory_limit: int,
        start: Callable[[Bundle, int], Worker] = Worker,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= per_key <= max_workers:
            raise ValueError(f"need 1 <= per_key ({per_key}) <= max_workers ({max_workers})")
        self.per_key, self.max_workers, self.memory_limit = per_key, max_workers, memory_limit
        self._start, self._clock = start, clock
        self._cond = threading.Condition()
        self._pools: dict[Key, list[Worker]] = {}
        self._starting: dict[Key, int] = {}
        self._generation = 0
        self.started = 0

    def _total(self) -> int:
        return sum(map(len, self._pools.values())) + sum(self._starting.values())

    def _evict_idle(self) -> Worker | None:
        """Take the least recently used idle worker of any pair out of its pool (cond held)."""
        idle = [(w.last_used, key, w) for key, pool in self._pools.items() for w in pool if not w.busy]
        if not idle:
            return None
        _, key, worker = min(idle, key=lambda t: t[0])
        self._remove(key, worker)
        return worker

    def _remove(self, key: Key, worker: Worker | None) -> None:
        """Take ``worker`` (if given) out of ``key``'s pool; forget the pool once it is empty (cond held)."""
        pool = self._pools.get(key, [])
        if worker is not None and worker in pool:
            pool.remove(worker)
        if not pool and not self._starting.get(key):
            self._pools.pop(key, None)

    def _acquire(self, key: Key, deadline: float, stopped: list[Worker]) -> Worker | None:
        """An idle worker of ``key`` marked busy, or None with a start slot reserved for the caller;
        waits until ``deadline`` (cond held). Workers to stop (dead or evicted) go to ``stopped``."""
        while True:
            pool = self._pools.setdefault(key, [])
            for dead in [w for w in pool if not w.busy and not w.alive()]:
                pool.remove(dead)
                stopped.append(dead)
            worker = next((w for w in pool if not w.busy), None)
            if worker is not None:
                worker.busy = True
                return worker
            if len(pool) + self._starting.get(key, 0) < self.per_key:
                if self._total() >= self.max_workers and (evicted := self._evict_idle()) is not None:
                    stopped.append(evicted)
                if self._total() < self.max_workers:
                    self._starting[key] = self._starting.get(key, 0) + 1
                    return None
            left = deadline - self._clock()
            if left <= 0:
                self._remove(key, None)
                raise TimeoutError("no worker came free in time")
            self._cond.wait(left)

    @contextlib.contextmanager
    def lease(self, key: Key, bundle: Bundle, *, timeout: float) -> Iterator[Worker]:
        """A worker of ``key`` for one call, returned to the pool afterwards. A worker that left the
        pool meanwhile (discarded, or every worker stopped by :meth:`clear`) is stopped instead.

        Raises:
            TimeoutError: no worker came free within ``timeout`` seconds.
            WorkerLoadError: a new worker could not load ``bundle``.
        """
        stopped: list[Worker] = []
        try:
            with self._cond:
                generation = self._generation
                worker = self._acquire(key, self._clock() + timeout, stopped)
        finally:
            for w in stopped:
                w.stop()
        if worker is None:
            worker = self._new(key, bundle, generation)
        try:
            yield worker
        finally:
            with self._cond:
                worker.busy = False
                worker.last_used = self._clock()
                pooled = worker in self._pools.get(key, ())
                self._cond.notify_all()
            if not pooled:
                worker.stop()

    def _new(self, key: Key, bundle: Bundle, generation: int) -> Worker:
        """Start a worker in the slot :meth:`_acquire` reserved (outside the lock: it takes a while);
        it joins the pool unless :meth:`clear` ran meanwhile."""
        try:
            worker = self._start(bundle, self.memory_limit)
        except BaseException:
            self._end_start(key, None, generation)
            raise
        worker.busy = True
        self._end_start(key, worker, generation)
        return worker

    def _end_start(self, key: Key, worker: Worker | None, generation: int) -> None:
        with self._cond:
            self._starting[key] -= 1
            if not self._starting[key]:
                del self._starting[key]
            if worker is not None and generation == self._generation:
                self._pools.setdefault(key, []).append(worker)
                self.started += 1
            self._remove(key, None)
            self._cond.notify_all()

    def discard(self, key: Key, worker: Worker) -> None:
        """Stop ``worker`` (timed out, crashed, or answered badly); its pair starts another when needed."""
        with self._cond:
            self._remove(key, worker)
            self._cond.notify_all()
        worker.stop()

    def clear(self, reason: str = "the executor dropped its keys") -> int:
        """Stop every worker, busy or not (revocation, failing closed, exit); how many there were.
        A call a busy worker was running learns ``reason`` (:attr:`Worker.stopped_for`)."""
        with self._cond:
            workers = [w for pool in self._pools.values() for w in pool]
            self._pools = {}
            self._generation += 1
            self._cond.notify_all()
        for w in workers:
            w.stop(reason)
        return len(workers)

    def reap(self, idle_s: float = IDLE_S) -> int:
        """Stop workers beyond the first of their pair that were idle for ``idle_s``; how many."""
        now = self._clock()
        with self._cond:
            old = []
            for key, pool in list(self._pools.items()):
                extra = sorted((w for w in pool if not w.busy and now - w.last_used >= idle_s),
                               key=lambda w: w.last_used)[: max(0, len(pool) - 1)]  # fmt: skip
                for w in extra:
                    self._remove(key, w)
                old += extra
        for w in old:
            w.stop()
        return len(old)

    def pids(self) -> dict[str, int]:
        """Worker process ids by ``"domain,domain|digest hex#n"`` (n: the worker's place in its pool)."""
        with self._cond:
            return {f"{','.join(k[0])}|{k[1].hex()}#{i}": w.pid for k, pool in self._pools.items()
                    for i, w in enumerate(pool)}  # fmt: skip


__all__ = ["IDLE_S", "WORKER_ENV", "Key", "Worker", "WorkerLoadError", "WorkerPools"]
