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
from tests.ray_helpers import free_port

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

    port = free_port()
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


def _scrape_all(ports: list[int]) -> str:
    bodies = []
    for port in ports:
        try:
            bodies.append(
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            )
        except OSError:
            continue
    return "\n".join(bodies)


def _samples(body: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric family in a Prometheus text body (summed over nodes)."""
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith(name + "{"):
            labels = line[len(name) + 1 : line.rindex("}")]
            keep = ",".join(sorted(p for p in labels.split(",") if p.split("=")[0] in ("tee", "result", "pool",
                                                                                         "direction")))  # fmt: skip
            out[keep] = out.get(keep, 0.0) + float(line.split()[-1])
    return out


def test_shim_records_the_executor_report_and_flushes_it_soon() -> None:
    """Without Ray the report is buffered (a later flush sends it); labels pass the allow-lists."""
    from enclave_actors.shim import _record_metrics

    metrics._buffer.take()
    _record_metrics({"tee": "sev-snp", "pool": "Evil Pool!", "node_id": "ab" * 28, "attest": {"ok": 1},
                     "unwrap": {"granted": 2, "<x>": 1}, "attested_until": 1e12}, 10, 20)  # fmt: skip
    batch = metrics._buffer.take()
    counters = {(name, tags): v for (name, tags), v in batch["counters"]}
    assert counters[("confidential_attestations_total", (("tee", "sev-snp"), ("result", "ok")))] == 1
    assert counters[("confidential_key_releases_total", (("result", "granted"),))] == 2
    assert counters[("confidential_key_releases_total", (("result", "other"),))] == 1
    assert counters[("confidential_sealed_bytes_total", (("direction", "in"),))] == 10
    assert batch["attested"] == [("ab" * 28, ("other", 1e12))]  # a pool name that is no DNS label
    _record_metrics("not a report", 0, 0)  # malformed reports never fail the call


@pytest.mark.ray
def test_confidential_calls_reach_the_endpoint_from_the_shim(tmp_path: Path) -> None:
    """Attestations (ok on the TEE node, denied on a node that lies), key releases and attested nodes
    per pool appear on the cluster's metrics endpoints, recorded by the shims (executors are no Ray
    processes), while this driver has not flushed anything."""
    import warnings

    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    import ray_confidential as rc
    from ray_confidential.demo import call_by_hand
    from ray_confidential.testing import add_tee_node
    from ray_confidential.testing.tee_node import stop_executors
    from tests.executor import conf_funcs

    port = free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "metrics_export_port": port,
                        "_system_config": {"metrics_report_interval_ms": 1000}},
    )  # fmt: skip
    try:
        add_tee_node(cluster, tee="sev-snp", pool="metrics-eu", num_cpus=1)
        liar = add_tee_node(cluster, tee="tdx", trusted=False, num_cpus=1)
        rc.init(address=cluster.address, dev=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc.create_domain("exec-a")
        arg = rc.put(np.arange(4.0), domain="exec-a")
        ref = conf_funcs.total.options(tee="sev-snp").remote(arg)
        ray.wait([ref.object_ref], timeout=60)  # the result stays sealed: this driver opens nothing
        # Placement never picks the liar (not in the trust registry): play its shim by hand.
        by_hand = ray.remote(call_by_hand).options(label_selector={"ray.io/node-id": liar.node_id})
        denied = ray.get(by_hand.remote(conf_funcs.total.bundle, "exec-a", arg.object_ref), timeout=120)
        assert denied.startswith("KeyReleaseDenied"), denied
        metrics._buffer.take()  # the driver's own figures (rc.put) are dropped: only shims report
        ports = [int(n["MetricsExportPort"]) for n in ray.nodes() if n["Alive"]]
        want = {
            "ray_confidential_attestations_total": 'result="ok",tee="sev-snp"',
            "ray_confidential_key_releases_total": 'result="granted"',
        }
        deadline = time.monotonic() + 60
        body = ""
        while time.monotonic() < deadline:
            body = _scrape_all(ports)
            att = _samples(body, "ray_confidential_attestations_total")
            rel = _samples(body, "ray_confidential_key_releases_total")
            nodes = _samples(body, "ray_confidential_attested_nodes")
            if (att.get(want["ray_confidential_attestations_total"], 0) >= 1
                    and att.get('result="denied",tee="tdx"', 0) >= 1
                    and rel.get(want["ray_confidential_key_releases_total"], 0) >= 1
                    and nodes.get('pool="metrics-eu"', 0) == 1):  # fmt: skip
                break
            time.sleep(1)
        else:
            pytest.fail(f"metrics did not arrive: {att} {rel} {nodes}")
        assert "exec-a" not in body  # domain names are user strings: never label values
    finally:
        rc.shutdown()
        ray.shutdown()
        stop_executors()
        cluster.shutdown()
