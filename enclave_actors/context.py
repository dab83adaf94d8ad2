"""``ray_confidential.context()``: facts about the confidential call running in this process.

    @rc.remote(domain="hospital")
    def where() -> dict:
        ctx = rc.context()
        return {"node": ctx.node_id, "tee": ctx.tee, "bundle": ctx.bundle_digest}

Inside an executor call it returns a frozen :class:`CallContext`; anywhere else it raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class CallContext:
    """Where a confidential call runs (issue 5, scope 5).

    Attributes:
        node_id: hex Ray node id of the executor's node.
        tee: TEE kind of the node (``sev-snp``, ``tdx``, ``sgx``, ``nitro``).
        pool, region: the node's pool and region ("" when not configured).
        bundle_digest: hex digest of the code bundle being run.
        domains: the domains of this call (inputs and output), sorted.
    """

    node_id: str
    tee: str
    pool: str
    region: str
    bundle_digest: str
    domains: tuple[str, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallContext:
        return cls(
            node_id=str(data["node_id"]),
            tee=str(data["tee"]),
            pool=str(data.get("pool", "")),
            region=str(data.get("region", "")),
            bundle_digest=str(data["bundle_digest"]),
            domains=tuple(str(d) for d in data["domains"]),
        )


_current: CallContext | None = None


def _set(ctx: CallContext | None) -> None:
    global _current
    _current = ctx


def context() -> CallContext:
    """The running call's :class:`CallContext`.

    Raises:
        RuntimeError: not inside a confidential call (only bundle code run by an executor has one).
    """
    if _current is None:
        raise RuntimeError(
            "ray_confidential.context() is only available inside a confidential call "
            "(a function decorated with @ray_confidential.remote, running in an enclave executor)"
        )
    return _current


__all__ = ["CallContext", "context"]
