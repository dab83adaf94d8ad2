"""The embedded default's executors: what ``rc.init`` starts besides the development broker.

    services = start_dev_services("local", state_dir)   # after ray.init; rows 1-3 of the rc.init table
    services.routing_nodes                                # nodes reached by node id (no TEE label)
    services.stop()                                       # rc.shutdown

Rows of the ``rc.init`` table (README): ``local`` (a new local cluster) starts one simulated
executor per local node, labelled ``ray-confidential.io/tee`` through ``ray.init(labels=...)``
(:data:`DEV_TEE`, sev-snp); ``dev-implicit`` (``dev=True`` inside an existing cluster, e.g. ``ray job
submit``) starts one on the driver's node, which Ray cannot label after it started, so confidential
calls reach it by ``ray.io/node-id``; ``dev-explicit`` (tests with ``Cluster``) starts none: they come
from ``testing.add_tee_node``. Every executor gets its keys only from the process's embedded broker
(``ray_confidential.kbs.embedded.shared()``), via a 0600 launch-data file passed by path.

Executor sockets of this module live at ``enclave_actors.shim.node_socket_path(node_id)`` in a
0700 directory of this user, where shims look when ``RAY_CONFIDENTIAL_EXECUTOR_SOCKET`` is unset.

What it does NOT do: start anything in production (executors come from the node image there).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger(__name__)

DEV_TEE: Final = "sev-snp"
"""TEE kind of the simulated executors ``rc.init`` starts."""


@dataclass
class DevServices:
    """The development broker reference and the executors one ``rc.init`` started."""

    broker: Any
    executors: list[Any] = field(default_factory=list)
    routing_nodes: tuple[str, ...] = ()

    def stop(self) -> None:
        """Stop the executors (their workers and actors end with them), release the broker."""
        from ray_confidential.kbs import embedded
        from ray_confidential.testing.tee_node import stop_executor

        for ex in self.executors:
            stop_executor(ex)
        self.executors.clear()
        embedded.release()


def runtime_dir() -> Path:
    """The 0700 directory of :func:`~enclave_actors.shim.node_socket_path`, owned by this user."""
    from enclave_actors.shim import RUNTIME_DIR

    path = Path(RUNTIME_DIR)
    path.mkdir(mode=0o700, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} must be a directory of this user with mode 0700")
    return path


def node_labels(ray_init_kwargs: dict[str, Any]) -> dict[str, str]:
    """``labels`` for ``ray.init`` of a new local cluster (row 1): the caller's plus the TEE label."""
    from enclave_actors.remote import TEE_LABEL

    return {**dict(ray_init_kwargs.get("labels") or {}), TEE_LABEL: DEV_TEE}


def start_dev_services(mode: str, state_dir: str | os.PathLike[str], *, labelled: bool = True) -> DevServices:
    """Start the development broker (shared in this process) and the executors of ``mode``.

    Call after ``ray.init``. ``labelled``: for ``local``, whether this ``rc.init`` started Ray with
    :func:`node_labels` (else the nodes are reached by node id). Raises whatever starting an executor
    raises (nothing is left running).
    """
    import ray

    from enclave_actors.shim import node_socket_path
    from ray_confidential.kbs import embedded
    from ray_confidential.testing.tee_node import start_executor

    services = DevServices(embedded.shared(state_dir))
    try:
        if mode == "local":
            nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
            if not labelled:
                services.routing_nodes = tuple(nodes)
        elif mode == "dev-implicit":
            nodes = [ray.get_runtime_context().get_node_id()]
            services.routing_nodes = tuple(nodes)
        else:
            nodes = []
        if nodes:
            runtime_dir()
        for node_id in nodes:
            ex = start_executor(node_id=node_id, tee=DEV_TEE, socket_path=node_socket_path(node_id),
                                broker=services.broker)  # fmt: skip
            services.executors.append(ex)
            logger.warning("ray_confidential: simulated %s executor (DEVELOPMENT) for node %s on %s",
                           DEV_TEE, node_id[:16], ex.socket)  # fmt: skip
    except BaseException:
        services.stop()
        raise
    return services


__all__ = ["DEV_TEE", "DevServices", "node_labels", "runtime_dir", "start_dev_services"]
