"""Dashboard metrics: a short job's figures reach Ray's metrics endpoint after its driver exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

import ray_confidential.metrics as metrics

REPO = Path(__file__).resolve().parents[1]


def test_tag_values_come_from_allow_lists() -> None:
    assert metrics.safe_tag("tee", "tdx") == "tdx"
    assert metrics.safe_tag("tee", "patient-alice") == "other"
    assert metrics.safe_tag("pool", "azure-eu") == "azure-eu"
    assert metrics.safe_tag("pool", "Robert'); DROP") == "other"
    with pytest.raises(ValueError, match="takes tags"):
        metrics.inc("confidential_attestations_total", tee="tdx")
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.inc("confidential_nope")


def test_grafana_dashboard_queries_every_metric() -> None:
    dash = json.loads((REPO / "dashboards" / "ray_confidential_grafana.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in metrics.METRICS:
        assert f"ray_{name}" in exprs, name


DRIVER = """
import ray_confidential as rc
rc.init(address={address!r}, dev=True)
rc.create_domain("dom-7f3a9c")
ref = rc.put(b"m" * 100_000, domain="dom-7f3a9c")
assert rc.get(ref) == b"m" * 100_000
rc.shutdown()
"""


@pytest.mark.ray
def test_short_driver_metrics_reach_the_endpoint(tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    port = 18000 + os.getpid() % 1000
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "metrics_export_port": port},
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(DRIVER.format(address=cluster.address))],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "RAY_CONFIDENTIAL_STATE_DIR": str(tmp_path)},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        found: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(found) < 3:
            time.sleep(2)
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                continue
            for line in body.splitlines():
                if line.startswith("ray_confidential_sealed_bytes_total{") or line.startswith(
                    ("ray_confidential_seal_seconds_count", "ray_confidential_unseal_seconds_count")
                ):
                    found[line.split("{")[0] + ("/out" if 'direction="out"' in line else "")] = float(
                        line.split()[-1]
                    )
        assert found.get("ray_confidential_sealed_bytes_total/out", 0) >= 100_000, found
        assert found.get("ray_confidential_seal_seconds_count", 0) >= 1, found
        assert found.get("ray_confidential_unseal_seconds_count", 0) >= 1, found
        assert "dom-7f3a9c" not in body  # no user-controlled strings (domain names) as label values
    finally:
        ray.shutdown()
        cluster.shutdown()
