"""``rc.init`` behaves exactly as the README's table says, row by row, on real clusters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

import ray_confidential as rc
from ray_confidential.api import _session_or_die
from ray_confidential.errors import KeyReleaseDenied

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    yield c
    c.shutdown()


def _driver(code: str, env: dict[str, str], timeout: int = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


ROUND_TRIP = """
import os, numpy as np, ray
import ray_confidential as rc
from ray_confidential.api import _session_or_die
from ray_confidential.kbs import embedded
from tests.executor import conf_funcs
rc.init({kwargs})
session = _session_or_die()
print("MODE", session.mode)
rc.create_domain("t")
print("OPEN", rc.get(rc.put(b"row", domain="t")) == b"row")
rc.create_domain("exec-a")
pids = [ex.pid for ex in session.services.executors]
print("EXECUTORS", len(pids), [ex.node_id for ex in session.services.executors] == [ray.get_runtime_context().get_node_id()])
print("LABELS", sorted(n["Labels"].get("ray-confidential.io/tee", "-") for n in ray.nodes()))
arg = rc.put(np.arange(4.0), domain="exec-a")
print("CALL", rc.get(conf_funcs.total.remote(arg)))
broker = embedded.current()
print("BROKER", broker.target.startswith("127.0.0.1:"), oct(broker.launch_path.stat().st_mode & 0o777))
print("GRANT", any(r["event"] == "unwrap" and r.get("object_id") == arg.object_id for r in broker.audit_records()))
rc.shutdown()
alive = []
for pid in pids:
    try:
        os.kill(pid, 0); alive.append(pid)
    except ProcessLookupError:
        pass
print("STOPPED", alive == [] and embedded.current() is None)
"""


def test_row1_no_address_starts_local_cluster_and_dev_service(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    short = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # AF_UNIX paths must stay under 108 bytes
    env["RAY_TMPDIR"] = short  # no `ray start` cluster is discoverable from here
    try:
        proc = _driver(ROUND_TRIP.format(kwargs="include_dashboard=False"), env)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MODE local" in proc.stdout and "OPEN True" in proc.stdout
    assert "DEVELOPMENT key service" in proc.stderr
    # One simulated executor per local node, labelled; keys from the embedded gRPC broker.
    assert "EXECUTORS 1 True" in proc.stdout and "LABELS ['sev-snp']" in proc.stdout
    assert "CALL {'sum': 6.0}" in proc.stdout and "BROKER True 0o600" in proc.stdout
    assert "GRANT True" in proc.stdout and "STOPPED True" in proc.stdout


def test_row2_dev_with_implicit_address_connects(cluster: Cluster) -> None:
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    proc = _driver(ROUND_TRIP.format(kwargs="dev=True"), env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MODE dev-implicit" in proc.stdout and "OPEN True" in proc.stdout
    # One executor on the driver's node (reached by node id: Ray cannot label a running node).
    assert "EXECUTORS 1 True" in proc.stdout and "LABELS ['-']" in proc.stdout
    assert (
        "CALL {'sum': 6.0}" in proc.stdout and "GRANT True" in proc.stdout and "STOPPED True" in proc.stdout
    )


def test_row4_implicit_address_without_dev_needs_a_broker(cluster: Cluster, tmp_path: Path) -> None:
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    proc = _driver("import ray_confidential as rc; rc.init()", env)
    assert proc.returncode != 0
    assert "RAY_CONFIDENTIAL_DOMAINS" in proc.stderr and "dev=True" in proc.stderr
    assert "DEVELOPMENT key broker" not in proc.stderr


def test_row3_dev_with_explicit_address_connects(cluster: Cluster) -> None:
    from ray_confidential.kbs import embedded

    rc.init(address=cluster.address, dev=True)
    try:
        assert _session_or_die().mode == "dev-explicit" and _session_or_die().owner
        rc.create_domain("row3")
        assert rc.get(rc.put([1, 2], domain="row3")) == [1, 2]
        # The broker runs (for add_tee_node, before or after this init); no executor is started here.
        services = _session_or_die().services
        assert services.executors == [] and embedded.current() is services.broker
        assert services.broker.registry.get("row3") is not None  # a domain created after it started
    finally:
        rc.shutdown()
        ray.shutdown()
    assert embedded.current() is None


def test_row4_explicit_address_without_dev(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match=r"no key broker is configured.*dev=True"):
        rc.init(address=cluster.address)
    # With published descriptors only: it connects, seals, and may not open.
    from ray_confidential.keyservice import DevKeyService

    owner = DevKeyService(tmp_path / "owner")
    with pytest.warns(UserWarning):
        desc = owner.create_domain("published")
    descriptors = tmp_path / "descriptors.json"
    descriptors.write_text(json.dumps({"domains": [desc.to_dict()]}))
    monkeypatch.setenv("RAY_CONFIDENTIAL_DOMAINS", str(descriptors))
    rc.init(address=cluster.address)
    try:
        from ray_confidential.kbs import embedded

        assert _session_or_die().services is None and embedded.current() is None  # no broker started
        assert _session_or_die().mode == "connect" and not _session_or_die().owner
        ref = rc.put(b"result", domain="published")
        with pytest.raises(KeyReleaseDenied, match="ray-confidential open"):
            rc.get(ref)
        with pytest.raises(KeyReleaseDenied, match="created by their owner"):
            rc.create_domain("mine")
        from ray_confidential.sealed import open_sealed

        assert open_sealed(rc.export(ref), owner) == b"result"  # the owner opens it off-cluster
    finally:
        rc.shutdown()
        ray.shutdown()


def test_row4_uses_the_configured_broker(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row 4 with $RAY_CONFIDENTIAL_KBS: broker-signed descriptors to seal; the driver may not open."""
    from ray_confidential.kbs.embedded import EmbeddedBroker
    from ray_confidential.keyservice import DevKeyService
    from ray_confidential.sealed import open_sealed

    owner_state = tmp_path / "owner"
    with pytest.warns(UserWarning):
        DevKeyService(owner_state).create_domain("brokered")
    broker = EmbeddedBroker.start(owner_state)
    try:
        release = tmp_path / "release.pem"
        release.write_bytes(broker.launch_data()["release_public_key"].encode())
        config = tmp_path / "kbs-client.yaml"
        config.write_text(f"target: {broker.target}\nrelease_public_key: {release}\n")
        monkeypatch.setenv("RAY_CONFIDENTIAL_KBS", str(config))
        rc.init(address=cluster.address)
        try:
            assert _session_or_die().mode == "connect" and not _session_or_die().owner
            ref = rc.put({"result": 42}, domain="brokered")
            with pytest.raises(KeyReleaseDenied, match="not an attested executor"):
                rc.get(ref)
            with pytest.raises(ValueError, match="unknown domain 'nope' at the key broker"):
                rc.put(b"x", domain="nope")
            assert open_sealed(rc.export(ref), DevKeyService(owner_state)) == {"result": 42}
        finally:
            rc.shutdown()
            ray.shutdown()
    finally:
        broker.stop()
