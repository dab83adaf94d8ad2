"""Confidential functions used by the executor tests (their module source is the code bundle)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

import ray_confidential as rc


@rc.remote(domain="exec-a")
def total(x: Any, scale: float = 1.0) -> dict[str, Any]:
    return {"sum": float(np.sum(x)) * scale}


@rc.remote(domain="exec-a")
def where() -> dict[str, Any]:
    ctx = rc.context()
    return {"node_id": ctx.node_id, "tee": ctx.tee, "bundle": ctx.bundle_digest, "domains": list(ctx.domains),
            "pid": os.getpid()}  # fmt: skip


@rc.remote(domain="exec-a")
def leak(x: Any) -> None:
    """Prints its plaintext and raises with it: neither may leave the executor unsealed."""
    text = bytes(x).decode()
    print("PRINTED", text)
    sys.stderr.write("STDERR " + text + "\n")
    raise RuntimeError("raised " + text)


@rc.remote(domain="exec-a")
def crash() -> None:
    os._exit(3)


@rc.remote(domain="exec-a")
def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@rc.remote(domain="exec-a")
def rendezvous(folder: str, n: int, wait_s: float) -> dict[str, Any]:
    """Marks its arrival in ``folder``, then waits up to ``wait_s`` until ``n`` calls have arrived:
    calls that run at the same time see each other; calls run one after another do not."""
    import uuid

    open(os.path.join(folder, uuid.uuid4().hex), "w").close()
    deadline = time.monotonic() + wait_s
    while len(os.listdir(folder)) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"pid": os.getpid(), "seen": len(os.listdir(folder))}


@rc.remote(domain="exec-a")
def pid_and_keys() -> dict[str, Any]:
    """What a bundle can see of earlier calls' keys in its own process (nothing)."""
    import gc

    from ray_confidential.crypto.encap import Encapsulation
    from ray_confidential.crypto.hpke import PrivateKeyHandle

    objects = gc.get_objects()
    handles = [o for o in objects if isinstance(o, PrivateKeyHandle)]
    encaps = [repr(o).rsplit(" ", 1)[-1].rstrip(">") for o in objects if isinstance(o, Encapsulation)]
    return {"pid": os.getpid(), "key_handles": len(handles), "encapsulations": encaps}


@rc.remote(domain="exec-a")
def echo_len(table: Any) -> int:
    return int(table.num_rows)


@rc.enclave_actor(domain="exec-a")
class Accumulator:
    """An enclave actor: its running total lives only in its executor subprocess."""

    def __init__(self, start: float) -> None:
        self.total = float(np.sum(start))

    def add(self, x: Any) -> float:
        self.total += float(np.sum(x))
        return self.total

    def hold(self, folder: str, wait_s: float) -> float:
        """Marks its arrival in ``folder``, then waits up to ``wait_s`` for a second file there (a
        call the test can catch in flight)."""
        open(os.path.join(folder, "arrived"), "w").close()
        deadline = time.monotonic() + wait_s
        while len(os.listdir(folder)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.total

    def where(self) -> dict[str, Any]:
        ctx = rc.context()
        return {"pid": os.getpid(), "node_id": ctx.node_id, "tee": ctx.tee, "domains": list(ctx.domains)}


if __name__ == "__main__":
    raise SystemExit("this block must never run inside the executor")
