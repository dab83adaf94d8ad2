"""This host's Ray node id, for an executor started before (or beside) ``ray start`` (``--node-id auto``).

    node_id = wait_for_local_node_id(Path("/tmp/ray/session_latest"), wait_s=600)

A node image starts the executor first and Ray second, so the executor cannot be told the node id
that ``ray start`` will choose. It waits instead for this host's Ray session directory to name one:
Ray 2.60 writes per-node port files there whose names end in the node id (``metrics_agent_port_<id>``,
``runtime_env_agent_port_<id>``, ...; ``ray_confidential._ray_compat.NODE_PORT_FILE``, checked by the
Ray contract test). A host runs one Ray node; several ids in one session directory (a test cluster
on one machine) are refused: pass ``--node-id`` there.

The id is routing metadata (the trust registry admits the executor's node under it, docs/placement.md);
the session directory is written by Ray, which is untrusted, so a wrong id can only misroute calls:
keys stay bound to the attested executor key.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

from ray_confidential._ray_compat import NODE_PORT_FILE

DEFAULT_SESSION_DIR: Final = Path("/tmp/ray/session_latest")  # noqa: S108 - Ray's own default location


def local_node_ids(session_dir: Path) -> set[str]:
    """Node ids (56 hex digits) named by the per-node port files in ``session_dir`` (none if absent)."""
    try:
        names = [p.name for p in session_dir.iterdir()]
    except (FileNotFoundError, NotADirectoryError):
        return set()
    return {m.group(1) for name in names if (m := NODE_PORT_FILE.fullmatch(name))}


def wait_for_local_node_id(session_dir: Path = DEFAULT_SESSION_DIR, *, wait_s: float = 600.0,
                           poll_s: float = 0.5) -> str:  # fmt: skip
    """The id of the one Ray node whose session is ``session_dir``, once Ray has started there.

    Raises:
        TimeoutError: no node id appeared within ``wait_s`` seconds.
        ValueError: the session directory names several nodes.
    """
    deadline = time.monotonic() + wait_s
    while True:
        ids = local_node_ids(session_dir)
        if len(ids) == 1:
            return ids.pop()
        if len(ids) > 1:
            raise ValueError(f"{session_dir} names {len(ids)} Ray nodes (several raylets on this host): pass "
                             "--node-id explicitly")  # fmt: skip
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no Ray node started in {session_dir} within {wait_s:.0f} s")
        time.sleep(poll_s)


__all__ = ["DEFAULT_SESSION_DIR", "local_node_ids", "wait_for_local_node_id"]
