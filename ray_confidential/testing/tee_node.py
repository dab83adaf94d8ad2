"""``add_tee_node``: a ``ray.cluster_utils.Cluster`` node with a simulated enclave executor.

    cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False})
    node = add_tee_node(cluster, tee="sev-snp", num_cpus=1)      # a ray._private.node.Node
    rc.init(address=cluster.address, dev=True)                  # before or after add_tee_node

The node carries the label ``ray-confidential.io/tee=<tee>`` (and ``pool`` / ``region`` labels when
given); its raylet (and so every Ray worker
on it) gets ``RAY_CONFIDENTIAL_EXECUTOR_SOCKET`` pointing at the executor started for it: a
``python -m enclave_actors.cli executor`` subprocess whose only key source is the embedded
development broker of this process (``ray_confidential.kbs.embedded.shared()``, the same one
``rc.init`` uses), reached with the 0600 launch-data file it wrote (broker address, pinned release
key, cluster id, and the simulated roots its attestation device signs under). ``trusted=False``
plays a node that lies about being a TEE: its device signs under a root nobody trusts, so the broker
issues it no token and releases nothing there.

Development only: launch data holds the simulated roots' private keys.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclave_actors.remote import TEE_LABEL
from enclave_actors.shim import SOCKET_ENV

_REPO_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True, slots=True)
class ExecutorProcess:
    """A simulated executor started for a node (tests read ``pid``, ``socket``, ``broker``)."""

    node_id: str
    tee: str
    socket: str
    device_socket: str
    log: str
    process: subprocess.Popen[bytes]
    broker: Any
    shared_broker: bool

    @property
    def pid(self) -> int:
        return int(self.process.pid)


EXECUTORS: dict[str, ExecutorProcess] = {}
"""node id -> executor started in this process (by :func:`add_tee_node` or ``rc.init``)."""
_LOCK = threading.Lock()
_STOPPED: set[subprocess.Popen[bytes]] = set()
"""Executors already stopped (by process object: a pid may be reused by a later executor)."""


def start_executor(
    *,
    node_id: str,
    tee: str,
    socket_path: str,
    trusted: bool = True,
    pool: str = "",
    region: str = "",
    broker: Any = None,
    state_dir: str | os.PathLike[str] | None = None,
    extra_args: tuple[str, ...] = (),
    wrapper: tuple[str, ...] = (),
    wait_s: float = 30.0,
) -> ExecutorProcess:
    """Start a simulated executor subprocess serving ``socket_path``; wait until it listens
    (``wait_s`` = 0: do not wait; shims retry their connection).

    Args:
        broker: an ``EmbeddedBroker``; None takes a reference on the process-wide one (over
            ``state_dir``, default the DevKeyService default), given back by :func:`stop_executor`.
        wrapper: prefixes the command (tests: ``setpriv ...`` to run it with the same reduced
            capabilities as an attacker, so that only non-dumpability protects its memory).
    """
    from ray_confidential.kbs import embedded

    shared = broker is None
    if shared:
        broker = embedded.shared(state_dir)
    try:
        folder = Path(socket_path).parent
        for stale in (socket_path, socket_path + ".device"):  # from an executor that died uncleanly
            if os.path.exists(stale):
                os.unlink(stale)
        cmd = [
            *wrapper, sys.executable, "-m", "enclave_actors.cli", "executor",
            "--socket", socket_path, "--tee", tee, "--node-id", node_id, "--pool", pool, "--region", region,
            "--launch-data", str(broker.launch_path), "--die-with-parent",
            *(() if trusted else ("--untrusted-device",)), *extra_args,
        ]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH", "")) if p)
        log_path = folder / "executor.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    except BaseException:
        if shared:
            embedded.release()
        raise
    started = ExecutorProcess(node_id, tee, socket_path, socket_path + ".device", str(log_path), proc, broker,
                              shared)  # fmt: skip
    with _LOCK:
        EXECUTORS[node_id] = started
    deadline = time.monotonic() + wait_s
    while wait_s and not os.path.exists(socket_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_executor(started)
            raise RuntimeError(f"executor did not start (exit {proc.returncode}); see {log_path}")
        time.sleep(0.05)
    return started


def add_tee_node(
    cluster: Any,
    *,
    tee: str,
    pool: str | None = None,
    region: str | None = None,
    trusted: bool = True,
    debug: bool = False,
    measurement: bytes | None = None,
    broker: Any = None,
    **node_args: Any,
) -> Any:
    """Add a node labelled as a TEE node, with a simulated executor of that kind.

    Labels: ``ray-confidential.io/tee=<tee>`` and, when given, ``ray-confidential.io/pool`` and
    ``ray-confidential.io/region``. The executor declares the same pool and region to the broker
    (bound into its tokens and registry admit) and attests for routing as it starts, so the node
    enters the trust registry within about a second once ``rc.init`` attached it (nodes may join
    before or after ``rc.init(address=cluster.address, dev=True)``).

    Args:
        cluster: a ``ray.cluster_utils.Cluster``.
        tee: ``"sev-snp"``, ``"tdx"``, ``"sgx"`` or ``"nitro"``.
        pool, region: label values (``scheduler.labels.check_label_value``).
        trusted: False plays a node that claims to be a TEE but cannot attest (evidence under a
            root nobody trusts): the broker issues it no token, it never enters the registry.
        debug: the simulated TEE reports debug mode (a policy refusing debug TEEs refuses it).
        measurement: the simulated TEE's measurement (default: the kind's default); a genuine TEE
            running other software.
        broker: the development broker its executor uses (an ``EmbeddedBroker``, or anything with a
            ``launch_path`` to launch data); default: the process-wide one.
        **node_args: passed to ``Cluster.add_node`` (``labels`` and ``env_vars`` are merged).
            ``executor_args`` (a tuple of CLI flags) is passed to the executor instead.

    Returns:
        The ``ray._private.node.Node`` added.
    """
    from scheduler.labels import POOL_LABEL, REGION_LABEL, check_label_value

    extra = tuple(node_args.pop("executor_args", ()))
    if debug:
        extra += ("--debug-tee",)
    if measurement is not None:
        extra += ("--measurement", measurement.hex())
    labels = {**node_args.pop("labels", {}), TEE_LABEL: tee}
    if pool is not None:
        labels[POOL_LABEL] = check_label_value(pool, what="pool")
    if region is not None:
        labels[REGION_LABEL] = check_label_value(region, what="region")
    folder = tempfile.mkdtemp(prefix="rc-executor-")
    socket_path = os.path.join(folder, "executor.sock")
    env_vars = {**node_args.pop("env_vars", {}), SOCKET_ENV: socket_path}
    node = cluster.add_node(labels=labels, env_vars=env_vars, **node_args)
    try:
        start_executor(node_id=node.node_id, tee=tee, socket_path=socket_path, trusted=trusted, pool=pool or "",
                       region=region or "", extra_args=extra, broker=broker)  # fmt: skip
    except BaseException:
        cluster.remove_node(node)
        raise
    return node


def stop_executor(ex: ExecutorProcess) -> None:
    """Stop one executor (its workers and actors end with it) and give back its broker reference."""
    with _LOCK:
        if EXECUTORS.get(ex.node_id) is ex:
            del EXECUTORS[ex.node_id]
        if ex.process in _STOPPED:
            return
        _STOPPED.add(ex.process)
    if ex.process.poll() is None:
        ex.process.terminate()
        try:
            ex.process.wait(5)
        except subprocess.TimeoutExpired:
            ex.process.kill()
            ex.process.wait()
    if ex.shared_broker:
        from ray_confidential.kbs import embedded

        embedded.release()


def stop_executors() -> None:
    """Stop every executor this process started."""
    for ex in list(EXECUTORS.values()):
        stop_executor(ex)


atexit.register(stop_executors)

__all__ = [
    "EXECUTORS",
    "ExecutorProcess",
    "add_tee_node",
    "start_executor",
    "stop_executor",
    "stop_executors",
]
