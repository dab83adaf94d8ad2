"""Placement and the registry actor on a real 4-node Cluster (head + three labelled nodes).

Node A (sev-snp, pool snp-eu) and B (tdx, pool tdx-us) are admitted by broker-signed statements;
node C labels itself ``ray-confidential.io/tee=sev-snp`` but holds no routing token (it cannot
attest), so no computed selector may ever reach it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from cryptography.hazmat.primitives.asymmetric import ec
from ray.cluster_utils import Cluster

from ray_confidential.domains import DomainPolicy
from ray_confidential.errors import NoAttestedNodeError
from scheduler.labels import POOL_LABEL, REGION_LABEL, TEE_LABEL
from scheduler.registry import StatementRejected, StatementSigner
from scheduler.registry_actor import RegistryClient, get_or_create_registry, submit

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
DEV = DomainPolicy(dev=True)


def _labels(tee: str, pool: str, region: str) -> dict[str, str]:
    return {TEE_LABEL: tee, POOL_LABEL: pool, REGION_LABEL: region}


@ray.remote(num_cpus=0.01, max_retries=0)
def where() -> str:
    return str(ray.get_runtime_context().get_node_id())


class Env:
    def __init__(self, cluster: Cluster, nodes: dict[str, Any], signer: StatementSigner, path: Path) -> None:
        self.cluster, self.nodes, self.signer, self.path = cluster, nodes, signer, path
        self.id = {k: n.node_id for k, n in nodes.items()}

    def admit(self, name: str, tee: str, pool: str, region: str, ttl: int = 120) -> None:
        st = self.signer.admit(
            node_id=self.id[name], tee=tee, pool=pool, region=region, measurement="11" * 48,
            claims={"env": "dev"}, expires_at=time.time() + ttl,
        )  # fmt: skip
        submit(self.registry, st)

    @property
    def registry(self) -> Any:
        return get_or_create_registry(self.signer.verifier(), path=str(self.path))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = {
        "A": cluster.add_node(num_cpus=1, labels=_labels("sev-snp", "snp-eu", "eu")),
        "B": cluster.add_node(num_cpus=1, labels=_labels("tdx", "tdx-us", "us")),
        "C": cluster.add_node(num_cpus=1, labels=_labels("sev-snp", "snp-eu", "eu")),
    }
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="scheduler-tests")
    signer = StatementSigner(ec.generate_private_key(ec.SECP256R1()), registry_id="test-cluster")
    e = Env(cluster, nodes, signer, tmp_path_factory.mktemp("registry") / "registry.json")
    e.admit("A", "sev-snp", "snp-eu", "eu")
    e.admit("B", "tdx", "tdx-us", "us")
    yield e
    ray.shutdown()
    cluster.shutdown()  # type: ignore[no-untyped-call]


def _run(opts: dict[str, Any], n: int) -> set[str]:
    return set(ray.get([where.options(**opts).remote() for _ in range(n)]))


def test_tasks_land_only_on_attested_nodes(env: Env) -> None:
    placer = RegistryClient(env.signer.verifier()).placer(wait_s=1)
    opts = placer.options(DEV)
    landed = _run(opts, 60)
    assert landed <= {env.id["A"], env.id["B"]}
    assert env.id["C"] not in landed  # labelled sev-snp, never attested
    assert _run(placer.options(DEV, pools="tdx-us"), 20) == {env.id["B"]}
    assert _run(placer.options(DEV, tee="sev-snp"), 20) == {env.id["A"]}


def test_the_registry_records_attested_nodes_per_pool(env: Env) -> None:
    """The long-lived registry records what it admits for the dashboard: no shim or job needed."""
    from ray_confidential.metrics import SINK_NAME, SINK_NAMESPACE

    deadline = time.monotonic() + 30
    while True:
        try:
            sink = ray.get_actor(SINK_NAME, namespace=SINK_NAMESPACE)
            counts = ray.get(sink.refresh_attested.remote(time.time()))
            if counts.get("snp-eu") == 1 and counts.get("tdx-us") == 1:  # A and B; C (snp-eu) never admitted
                break
        except ValueError:  # the sink does not exist before the registry's first flush
            counts = {}
        assert time.monotonic() < deadline, counts
        time.sleep(0.2)


def test_no_qualifying_node_fails_within_the_wait(env: Env) -> None:
    placer = RegistryClient(env.signer.verifier()).placer(wait_s=1, poll_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(NoAttestedNodeError) as ei:
        placer.options(DEV, tee="nitro")
    assert time.monotonic() - t0 < 5
    msg = str(ei.value)
    assert "required tee=nitro" in msg and "1 x sev-snp/snp-eu/eu" in msg
    assert "labelled as TEEs but holding no routing token: 1 x sev-snp" in msg  # node C


def test_unsigned_mutation_from_another_job_is_refused(env: Env) -> None:
    script = textwrap.dedent(
        f"""
        import ray, time
        from cryptography.hazmat.primitives.asymmetric import ec
        from scheduler.registry import StatementSigner
        ray.init(address={env.cluster.address!r})
        h = ray.get_actor("ray-confidential-trust-registry", namespace="ray-confidential")
        mine = StatementSigner(ec.generate_private_key(ec.SECP256R1()), registry_id="test-cluster")
        forged = mine.admit(node_id={env.id["C"]!r}, tee="sev-snp", pool="snp-eu", region="eu",
                            measurement="", claims={{}}, expires_at=time.time() + 60)
        for name, arg in (("garbage", b"admit node C"), ("own-key", forged.to_bytes()), ("object", {{"node": 1}})):
            try:
                ray.get(h.submit.remote(arg))
                print(name, "ACCEPTED")
            except Exception as exc:
                print(name, "refused", "registry statement refused" in str(exc))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ACCEPTED" not in out.stdout
    assert out.stdout.split() == [
        "garbage",
        "refused",
        "True",
        "own-key",
        "refused",
        "True",
        "object",
        "refused",
        "True",
    ]
    assert env.id["C"] not in {e.node_id for e in RegistryClient(env.signer.verifier()).entries()}


def test_actor_restart_reloads_from_its_file(env: Env) -> None:
    before = {e.node_id for e in RegistryClient(env.signer.verifier()).entries()}
    ray.kill(env.registry, no_restart=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            after = {e.node_id for e in RegistryClient(env.signer.verifier()).entries()}
            break
        except ray.exceptions.RayActorError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert after == before == {env.id["A"], env.id["B"]}


def test_revocation_and_node_death(env: Env) -> None:
    client = RegistryClient(env.signer.verifier())
    placer = client.placer(wait_s=1, poll_s=0.2)
    submit(env.registry, env.signer.revoke(node_id=env.id["A"], reason="tcb revoked"))
    assert {e.node_id for e in client.entries()} == {env.id["B"]}
    assert _run(placer.options(DEV), 20) == {env.id["B"]}
    with pytest.raises(NoAttestedNodeError):
        placer.options(DEV, tee="sev-snp")  # A revoked, C never attested
    env.cluster.remove_node(env.nodes["B"])
    deadline = time.monotonic() + 30
    while env.id["B"] in {e.node_id for e in client.entries()}:
        assert time.monotonic() < deadline, "dead node still in the registry"
        time.sleep(0.2)
    with pytest.raises(NoAttestedNodeError, match="holds no attested node"):
        placer.options(DEV)


def test_a_squatted_registry_is_not_believed(env: Env) -> None:
    """Another job replaces the actor with one pinned to its own key and admits node C."""
    script = textwrap.dedent(
        f"""
        import ray, time
        from cryptography.hazmat.primitives.asymmetric import ec
        from scheduler.registry import StatementSigner
        from scheduler.registry_actor import get_or_create_registry, submit
        ray.init(address={env.cluster.address!r})
        ray.kill(ray.get_actor("ray-confidential-trust-registry", namespace="ray-confidential"))
        time.sleep(0.5)
        mine = StatementSigner(ec.generate_private_key(ec.SECP256R1()), registry_id="test-cluster")
        h = get_or_create_registry(mine.verifier())
        submit(h, mine.admit(node_id={env.id["C"]!r}, tee="sev-snp", pool="snp-eu", region="eu",
                             measurement="", claims={{}}, expires_at=time.time() + 60))
        print("squatted")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert "squatted" in out.stdout, out.stderr[-2000:]
    with pytest.raises(StatementRejected, match="pinned to"):
        get_or_create_registry(env.signer.verifier())
    client = RegistryClient(env.signer.verifier())
    assert client.entries() == []  # the squatter's statements do not verify under our pin
    with pytest.raises(NoAttestedNodeError):
        client.placer(wait_s=0.5).options(DEV)
