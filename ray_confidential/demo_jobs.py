"""The confidential code of ``ray-confidential demo``: this module's source is its code bundle.

(``remote`` / ``enclave_actor`` / ``context`` are ``ray_confidential.remote`` etc., imported from
their modules so that type checkers see them.)

Both run inside an enclave executor on plaintext; Ray only carries their sealed inputs and results.
Kept apart from ``demo.py`` so that the bundle (what a domain policy approves) is small.
"""

from __future__ import annotations

from typing import Any

from enclave_actors.actor import enclave_actor
from enclave_actors.context import context
from enclave_actors.remote import remote

DOMAIN = "demo-hospital"


@remote(domain=DOMAIN)
def glucose_summary(table: Any) -> dict[str, Any]:
    """A confidential task: summary statistics of the patient table, and where it ran."""
    ctx = context()
    glucose = table.column("glucose").to_numpy()
    return {"rows": table.num_rows, "mean_glucose": float(glucose.mean()), "node_id": ctx.node_id,
            "tee": ctx.tee, "pool": ctx.pool}  # fmt: skip


@enclave_actor(domain=DOMAIN)
class CohortCounter:
    """An enclave actor: counts patients over 65 across the tables it is given; its state never
    leaves its executor subprocess."""

    def __init__(self) -> None:
        self.seen = 0
        self.over_65 = 0

    def add(self, table: Any) -> dict[str, Any]:
        ctx = context()
        self.seen += table.num_rows
        self.over_65 += int((table.column("age").to_numpy() > 65).sum())
        return {"seen": self.seen, "over_65": self.over_65, "node_id": ctx.node_id, "tee": ctx.tee,
                "pool": ctx.pool}  # fmt: skip
