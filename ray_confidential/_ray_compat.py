"""Every use of a Ray API outside ``ray``'s stable public surface, in one place.

``tests/test_ray_contract.py`` fails when Ray changes any of these.
"""

from __future__ import annotations

import re
from typing import Final

NODE_PORT_FILE: Final = re.compile(r"[a-z_]+_port_([0-9a-f]{56})")
"""Per-node files Ray 2.60 writes in its session directory (``metrics_agent_port_<node id>``, ...):
how an executor started before ``ray start`` learns its node's id (``enclave_actors/local_node.py``).
Importing this module does not import Ray."""


def running_cluster_address() -> str | None:
    """The cluster ``ray.init()`` with no address would connect to (RAY_ADDRESS, or the last
    ``ray start`` cluster on this host), or None when it would start a new local one."""
    import ray._private.services as services

    address: str | None = services.canonicalize_bootstrap_address(None)  # type: ignore[arg-type]
    return address


def ensure_auth_token() -> None:
    """Where ``RAY_AUTH_MODE`` turns token auth on and no token exists yet (a fresh HOME), create
    one as ``ray.init`` does for a new local cluster (``ray.cluster_utils.Cluster`` does not)."""
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled

    ensure_token_if_auth_enabled(None, create_token_if_missing=True)
