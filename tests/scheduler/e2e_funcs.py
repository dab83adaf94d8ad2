"""Confidential functions and an enclave actor for the placement acceptance tests (module = bundle)."""

from __future__ import annotations

import os
import time
from typing import Any

import ray_confidential as rc

EU = "e2e-eu"
"""Domain: regions eu only, measurements pinned to the simulated defaults."""
ANY = "e2e-any"
"""Domain: development policy (any TEE kind, pool, region, measurement)."""


def _where(x: Any = None) -> dict[str, Any]:
    ctx = rc.context()
    return {"node_id": ctx.node_id, "tee": ctx.tee, "pool": ctx.pool, "region": ctx.region,
            "n": None if x is None else len(x)}  # fmt: skip


@rc.remote(domain=EU, num_cpus=0.1)
def where_eu(x: Any = None) -> dict[str, Any]:
    return _where(x)


@rc.remote(domain=ANY, num_cpus=0.1)
def where_any(x: Any = None) -> dict[str, Any]:
    return _where(x)


@rc.remote(domain=EU, num_cpus=0.1, max_retries=1)
def mark_and_sleep(folder: str, seconds: float) -> str:
    """Marks where it runs (a file named after the node), then sleeps: the test kills that node."""
    node = rc.context().node_id
    with open(os.path.join(folder, f"{node}.{os.getpid()}"), "w") as f:
        f.write("started")
    time.sleep(seconds)
    return node


@rc.enclave_actor(domain=ANY, num_cpus=0.1)
class Where:
    def __init__(self) -> None:
        self.calls = 0

    def where(self) -> dict[str, Any]:
        self.calls += 1
        return {**_where(), "pid": os.getpid(), "calls": self.calls}


@rc.remote(domain=EU, num_cpus=0.1, max_retries=1)
def mark_and_wait(folder: str, seconds: float) -> str:
    """Marks where it runs, then waits until ``folder/go`` exists (or ``seconds``): the test kills
    the node in between, and lets the retry finish at once."""
    node = rc.context().node_id
    with open(os.path.join(folder, f"{node}.{os.getpid()}"), "w") as f:
        f.write("started")
    deadline = time.monotonic() + seconds
    while not os.path.exists(os.path.join(folder, "go")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return node
