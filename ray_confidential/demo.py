"""``ray-confidential demo``: seal a table into Ray and show that Ray only ever holds ciphertext.

Runs on the embedded default (local Ray, development key service in this process). Steps:
seal an Arrow table holding a plaintext marker; scan the plasma store for the marker (and a plain
``ray.put`` control, to show the scan can see); force spilling and scan the spill files; open the
result as the owner and export the sealed bytes for ``ray-confidential open``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

MARKER = "PATIENT-PLAINTEXT-7f3a"
STEPS = 7


def _table(rows: int):  # type: ignore[no-untyped-def]
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(7)
    return pa.table(
        {
            "patient": [f"{MARKER}-{i:07d}" for i in range(rows)],
            "age": rng.integers(18, 95, rows),
            "glucose": rng.normal(5.5, 1.2, rows),
        }
    )


def run(out: TextIO = sys.stdout, *, rows: int = 200_000) -> int:
    """Run the demo; returns a process exit code (0 when every check held)."""
    import ray

    import ray_confidential as rc
    from ray_confidential.keyservice import default_state_dir
    from ray_confidential.sealed.format import SealedHeader
    from ray_confidential.testing import scan

    def step(n: int, text: str) -> None:
        print(f"[{n}/{STEPS}] {text}", file=out, flush=True)

    marker = MARKER.encode()
    ok = True
    spill_dir = Path(tempfile.mkdtemp(prefix="rc-demo-spill-"))
    step(1, f"Starting local Ray (100 MiB object store, spilling to {spill_dir}) + development key service")
    rc.init(
        address="local",  # always a fresh local cluster, even when another one runs on this host
        object_store_memory=100 << 20,
        include_dashboard=False,
        _system_config={
            "object_spilling_config": json.dumps(
                {"type": "filesystem", "params": {"directory_path": str(spill_dir)}}
            ),
            "min_spilling_size": 0,
        },
    )
    try:
        step(2, "Creating domain 'demo-hospital' (development policy: no attestation, this process owns it)")
        rc.create_domain("demo-hospital")
        table = _table(rows)
        t0 = time.perf_counter()
        ref = rc.put(table, domain="demo-hospital")
        step(
            3,
            f"Sealed {table.num_rows:,} patient rows ({table.nbytes / 2**20:.1f} MiB) in "
            f"{(time.perf_counter() - t0) * 1e3:.0f} ms -> {ref!r}",
        )
        sealed_found = scan.plasma_contains(marker)
        control = ray.put(table)
        control_found = scan.plasma_contains(marker)
        del control
        step(
            4,
            f"Object store (plasma) scanned for {MARKER!r}: sealed object {'FOUND (!)' if sealed_found else 'not found'}; "
            f"plain ray.put control {'found' if control_found else 'NOT FOUND (scan blind?)'}",
        )
        ok &= not sealed_found and control_found
        header = SealedHeader.parse(rc.export(ref)[:16384])
        fillers = [rc.put(bytes(30 << 20), domain="demo-hospital") for _ in range(6)]
        ray.get([f.object_ref for f in fillers])
        spilled = scan.files_containing(spill_dir, header.header_bytes[:48])
        leaked = scan.files_containing(spill_dir, marker)
        step(
            5,
            f"Forced spilling: {sum(1 for _ in spill_dir.rglob('*') if _.is_file())} spill files; the sealed table "
            f"{'was spilled' if spilled else 'was not spilled'}; marker in spill files: {'FOUND (!)' if leaked else 'not found'}",
        )
        ok &= bool(spilled) and not leaked
        del fillers
        opened = rc.get(ref)
        same = opened.equals(table)
        step(
            6,
            f"Opened as the owner: {opened.num_rows:,} rows, identical to the input: {same}; first: {opened.slice(0, 1).to_pylist()[0]}",
        )
        ok &= same
        export_dir = default_state_dir() / "demo"
        export_dir.mkdir(parents=True, exist_ok=True)
        export_path = export_dir / "patients.sealed"
        export_path.write_bytes(rc.export(ref))
        step(
            7,
            f"Exported the sealed bytes to {export_path}\n      open them off-cluster: ray-confidential open {export_path}",
        )
    finally:
        rc.shutdown()
    print("demo: " + ("OK, Ray held only ciphertext" if ok else "FAILED: see the lines marked (!)"), file=out)
    return 0 if ok else 1
