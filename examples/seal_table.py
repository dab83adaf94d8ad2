"""Seal an Arrow table into Ray, pass it through an ordinary task, open it as the owner.

python examples/seal_table.py
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import ray

import ray_confidential as rc


@ray.remote
def ciphertext_digest(ref: rc.SealedRef) -> str:
    """An ordinary Ray task: it sees the sealed bytes, never the plaintext."""
    return hashlib.sha256(rc.export(ref)).hexdigest()


def main() -> None:
    rc.init(include_dashboard=False)
    try:
        rc.create_domain("example")
        ref = rc.put(pa.table({"patient": ["alice", "bob"], "glucose": [5.1, 6.3]}), domain="example")
        print("task saw ciphertext with sha256", ray.get(ciphertext_digest.remote(ref))[:16], "...")
        print("owner opens:", rc.get(ref).to_pylist())
    finally:
        rc.shutdown()


if __name__ == "__main__":
    main()
