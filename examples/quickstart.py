"""Quickstart: seal a table, run a confidential task and an enclave actor on it, export the result.

Run it locally (starts Ray, a development key broker and a simulated TEE executor):

    python examples/quickstart.py

or as a job on a plain Ray cluster (it then starts clearly labelled development services itself):

    ray start --head --node-ip-address 127.0.0.1
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python examples/quickstart.py

The task and the actor run inside the (simulated) enclave executor on plaintext; Ray only ever
carries ciphertext. Results are sealed to the domain and opened here, by the domain's owner.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa

import ray_confidential as rc


def patient_names(n: int) -> list[str]:
    """Synthetic sensitive values, made at run time (the test looks for them where Ray keeps data)."""
    return [hashlib.sha256(f"quickstart-patient-{i}".encode()).hexdigest()[:24] for i in range(n)]


@rc.remote(domain="quickstart")
def mean_glucose(table: pa.Table) -> dict[str, Any]:
    """Runs inside the enclave executor: it sees the plaintext table."""
    ctx = rc.context()
    values = table.column("glucose").to_pylist()
    return {"mean_glucose": sum(values) / len(values), "node_id": ctx.node_id, "tee": ctx.tee}


@rc.enclave_actor(domain="quickstart")
class RowCounter:
    """An enclave actor: its state lives in its own executor subprocess."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, table: pa.Table) -> dict[str, Any]:
        self.rows += table.num_rows
        ctx = rc.context()
        return {"rows": self.rows, "node_id": ctx.node_id, "tee": ctx.tee}


def main() -> None:
    rc.init(dev=True)
    try:
        rc.create_domain("quickstart")
        table = pa.table(
            {
                "patient": patient_names(1000),
                "glucose": [5.0 + (i % 7) / 10 for i in range(1000)],
            }
        )
        sealed = rc.put(table, domain="quickstart")
        task = rc.get(mean_glucose.remote(sealed))
        print(
            f"confidential task: mean glucose {task['mean_glucose']:.3f}, ran on node {task['node_id'][:12]} ({task['tee']})"
        )
        counter = RowCounter.remote()
        actor = rc.get(counter.add.remote(sealed))
        print(f"enclave actor: {actor['rows']} rows, ran on node {actor['node_id'][:12]} ({actor['tee']})")
        out = Path(os.environ.get("QUICKSTART_EXPORT", tempfile.gettempdir())) / "quickstart-result.sealed"
        out.write_bytes(rc.export(mean_glucose.remote(sealed)))
        print(f"exported the sealed result to {out}; open it off-cluster with: ray-confidential open {out}")
    finally:
        rc.shutdown()


if __name__ == "__main__":
    main()
