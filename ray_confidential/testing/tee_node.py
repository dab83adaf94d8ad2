"""``add_tee_node``: a ``ray.cluster_utils.Cluster`` node with a simulated enclave executor.

    cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False})
    rc.init(address=cluster.address, dev=True)
    node = add_tee_node(cluster, tee="sev-snp", num_cpus=1)      # a ray._private.node.Node

The node carries the label ``ray-confidential.io/tee=<tee>``; its raylet (and so every Ray worker
on it) gets ``RAY_CONFIDENTIAL_EXECUTOR_SOCKET`` pointing at the executor started for it: a
``python -m enclave_actors.cli executor`` subprocess with a simulated attestation device whose
test root comes from this process's :class:`DevRootOfTrust` as launch data, and the DEVELOPMENT
key releaser over this process's key state directory. ``trusted=False`` plays a node that lies
about being a TEE: its device signs under a root nobody trusts, so no key is ever released there.

Development only: launch data holds the simulated root's private keys.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclave_actors.remote import TEE_LABEL
from enclave_actors.shim import SOCKET_ENV
from ray_confidential.keyservice import default_state_dir
from ray_confidential.testing.simulated import DevRootOfTrust

_REPO_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True, slots=True)
class ExecutorProcess:
    """A simulated executor started for a node (tests read ``pid``, ``socket``, ``audit_log``)."""

    node_id: str
    tee: str
    socket: str
    device_socket: str
    audit_log: str
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return int(self.process.pid)


EXECUTORS: dict[str, ExecutorProcess] = {}
"""node id -> executor started by :func:`add_tee_node` in this process."""


def start_executor(
    *,
    node_id: str,
    tee: str,
    socket_path: str,
    trusted: bool = True,
    cluster_id: str = "dev",
    pool: str = "",
    region: str = "",
    state_dir: str | os.PathLike[str] | None = None,
    extra_args: tuple[str, ...] = (),
    wrapper: tuple[str, ...] = (),
    wait_s: float = 30.0,
) -> ExecutorProcess:
    """Start a simulated executor subprocess serving ``socket_path`` and wait until it listens.

    ``wrapper`` prefixes the command (tests: ``setpriv ...`` to run it with the same reduced
    capabilities as an attacker, so that only non-dumpability protects its memory).
    """
    folder = Path(socket_path).parent
    launch = folder / "launch-data"
    fd = os.open(launch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(DevRootOfTrust.for_process().to_launch_data([tee]))
    audit = str(folder / "audit.jsonl")
    cmd = [
        *wrapper, sys.executable, "-m", "enclave_actors.cli", "executor",
        "--socket", socket_path, "--tee", tee, "--node-id", node_id, "--cluster-id", cluster_id,
        "--pool", pool, "--region", region, "--simulated-launch-data", str(launch),
        "--dev-key-state", str(state_dir or default_state_dir()), "--audit-log", audit,
        "--die-with-parent", *(() if trusted else ("--untrusted-device",)), *extra_args,
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    log = open(folder / "executor.log", "ab")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    log.close()
    deadline = time.monotonic() + wait_s
    while not os.path.exists(socket_path):
        if proc.poll() is not None:
            raise RuntimeError(f"executor exited with {proc.returncode}; see {folder / 'executor.log'}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"executor did not start within {wait_s} s")
        time.sleep(0.05)
    started = ExecutorProcess(node_id, tee, socket_path, socket_path + ".device", audit, proc)
    EXECUTORS[node_id] = started
    return started


def add_tee_node(cluster: Any, *, tee: str, trusted: bool = True, **node_args: Any) -> Any:
    """Add a node labelled ``ray-confidential.io/tee=<tee>`` with a simulated executor.

    Args:
        cluster: a ``ray.cluster_utils.Cluster``.
        tee: ``"sev-snp"``, ``"tdx"``, ``"sgx"`` or ``"nitro"``.
        trusted: False plays a node that claims to be a TEE but cannot attest.
        **node_args: passed to ``Cluster.add_node`` (``labels`` and ``env_vars`` are merged).
            ``executor_args`` (a tuple of CLI flags) is passed to the executor instead.

    Returns:
        The ``ray._private.node.Node`` added.
    """
    extra = tuple(node_args.pop("executor_args", ()))
    folder = tempfile.mkdtemp(prefix="rc-executor-")
    socket_path = os.path.join(folder, "executor.sock")
    labels = {**node_args.pop("labels", {}), TEE_LABEL: tee}
    env_vars = {**node_args.pop("env_vars", {}), SOCKET_ENV: socket_path}
    node = cluster.add_node(labels=labels, env_vars=env_vars, **node_args)
    start_executor(node_id=node.node_id, tee=tee, socket_path=socket_path, trusted=trusted,
                   extra_args=extra)  # fmt: skip
    return node


def stop_executors() -> None:
    """Stop every executor this process started."""
    for node_id, ex in list(EXECUTORS.items()):
        if ex.process.poll() is None:
            ex.process.terminate()
            try:
                ex.process.wait(5)
            except subprocess.TimeoutExpired:
                ex.process.kill()
                ex.process.wait()
        EXECUTORS.pop(node_id, None)


atexit.register(stop_executors)

__all__ = ["EXECUTORS", "ExecutorProcess", "add_tee_node", "start_executor", "stop_executors"]
