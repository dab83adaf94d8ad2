"""The confidential function ``benchmarks/scheduler.py`` runs on a node that just joined (its bundle)."""

from __future__ import annotations

import ray_confidential as rc

DOMAIN = "bench-join"


@rc.remote(domain=DOMAIN, num_cpus=0.1)
def where() -> str:
    """The node the call ran on, as the executor reports it."""
    return str(rc.context().node_id)
