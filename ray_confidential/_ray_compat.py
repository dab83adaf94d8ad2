"""Every use of a Ray API outside ``ray``'s stable public surface, in one place.

``tests/test_ray_contract.py`` fails when Ray changes any of these.
"""

from __future__ import annotations

import ray._private.services as _services


def running_cluster_address() -> str | None:
    """The cluster ``ray.init()`` with no address would connect to (RAY_ADDRESS, or the last
    ``ray start`` cluster on this host), or None when it would start a new local one."""
    address: str | None = _services.canonicalize_bootstrap_address(None)  # type: ignore[arg-type]
    return address


def ensure_auth_token() -> None:
    """Where ``RAY_AUTH_MODE`` turns token auth on and no token exists yet (a fresh HOME), create
    one as ``ray.init`` does for a new local cluster (``ray.cluster_utils.Cluster`` does not)."""
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled

    ensure_token_if_auth_enabled(None, create_token_if_missing=True)
