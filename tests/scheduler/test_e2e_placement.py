"""Acceptance: attestation-gated placement on a real multi-node Cluster (issue 6).

Nodes (all on loopback, simulated TEEs, keys only from the embedded development broker):

* A  sev-snp, pool snp-eu, region eu      (joins before ``rc.init``; A or C is killed mid-call last)
* C  sev-snp, pool snp-az, region eu
* B  tdx,     pool tdx-us, region us      (revoked)
* L  labelled sev-snp/snp-eu/eu, executor evidence under an untrusted root (cannot attest)
* S  labelled sev-snp/snp-eu/eu by itself, no executor at all (self-declared)
* M  sev-snp/snp-eu/eu, genuine (trusted root) but another measurement than the domain pins

Domain ``e2e-eu`` allows region eu and pins the default simulated measurements; ``e2e-any`` is the
development policy. Where a call ran is checked inside the call (``rc.context()``) and in the
broker's audit log (grant records name the node), not only through routing.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

import ray_confidential as rc
from enclave_actors.remote import _shim_task, encode_call
from ray_confidential.domains import DomainPolicy
from ray_confidential.errors import KeyReleaseDenied, NoAttestedNodeError
from ray_confidential.kbs import embedded
from ray_confidential.testing import add_tee_node
from ray_confidential.testing.simulated import default_measurement
from ray_confidential.testing.tee_node import stop_executors
from scheduler.labels import POOL_LABEL, REGION_LABEL, TEE_LABEL
from tests.ray_helpers import check_cluster_processes, process_alive, wait_for
from tests.ray_helpers import registered_node_ids as _registered
from tests.scheduler import e2e_funcs as f

pytestmark = pytest.mark.ray
NODE = {"num_cpus": 1, "object_store_memory": 80 << 20}


def _wait_admitted(node_ids: set[str], timeout: float = 60.0) -> None:
    wait_for(lambda: node_ids <= _registered(), f"not admitted: {node_ids}", timeout)


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, Any]]:
    c = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, "num_cpus": 1,
                "_system_config": {"health_check_failure_threshold": 30}})  # fmt: skip
    n: dict[str, Any] = {}
    try:
        n["A"] = add_tee_node(c, tee="sev-snp", pool="snp-eu", region="eu", **NODE)  # before rc.init
        rc.init(address=c.address, dev=True, placement_wait_s=2)
        n["C"] = add_tee_node(c, tee="sev-snp", pool="snp-az", region="eu", **NODE)
        n["B"] = add_tee_node(c, tee="tdx", pool="tdx-us", region="us", **NODE)
        n["L"] = add_tee_node(c, tee="sev-snp", pool="snp-eu", region="eu", trusted=False, **NODE)
        n["S"] = c.add_node(labels={TEE_LABEL: "sev-snp", POOL_LABEL: "snp-eu", REGION_LABEL: "eu"}, **NODE)
        n["M"] = add_tee_node(c, tee="sev-snp", pool="snp-eu", region="eu", measurement=b"\x22" * 48, **NODE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pins = {k: (default_measurement(k).hex(),) for k in ("sev-snp", "tdx")}
            rc.create_domain(f.EU, policy=DomainPolicy(dev=True, regions=("eu",), measurements=pins))
            rc.create_domain(f.ANY)
        ids = {k: v.node_id for k, v in n.items()}
        _wait_admitted({ids[k] for k in "ACBM"})
        check_cluster_processes(c)
        yield {"cluster": c, "id": ids, "nodes": n, "broker": embedded.current()}
    finally:
        rc.shutdown()
        ray.shutdown()
        stop_executors()
        c.shutdown()


def _grants(broker: Any) -> list[dict[str, Any]]:
    return [r for r in broker.audit_records() if r["event"] == "unwrap" and r.get("decision") == "grant"]


def _force(node_id: str, fn: Any, *args: Any) -> Any:
    """A raw shim task pinned to ``node_id`` by hand (bypassing placement)."""
    spec, refs = encode_call(args, {})
    spec.update(domain=fn._domain, timeout_s=None, recipient=None)
    task = ray.remote(_shim_task).options(label_selector={"ray.io/node-id": node_id}, max_retries=0)
    return task.remote(spec, fn.bundle, *refs)


def test_registry_holds_exactly_the_attested_nodes(env: dict[str, Any]) -> None:
    ids = env["id"]
    reg = _registered()
    assert {ids[k] for k in "ACBM"} <= reg
    assert ids["L"] not in reg and ids["S"] not in reg and env["cluster"].head_node.node_id not in reg


def test_status_table(env: dict[str, Any], tmp_path: Any) -> None:
    import json
    import subprocess
    import sys

    from scheduler.status_cli import collect, render

    ids, broker = env["id"], env["broker"]
    doc = collect(broker.statement_verifier)
    state = {n["node_id"]: n for n in doc["nodes"]}
    assert state[ids["A"]]["attestation"] == "attested" and state[ids["A"]]["attested"]["pool"] == "snp-eu"
    assert state[ids["L"]]["attestation"] == "no" and state[ids["S"]]["labels"]["tee"] == "sev-snp"
    assert state[ids["S"]]["attestation"] == "no" and state[ids["A"]]["expires_at"] > time.time()
    assert "verified with statement key" in render(doc) and ids["A"][:12] in render(doc)
    assert "unverified" in render(collect(None))  # no pin: the actor's word is not trusted
    key = tmp_path / "statement.pem"
    key.write_bytes(broker.statement_verifier.public_pem())
    out = subprocess.run([sys.executable, "-m", "ray_confidential.cli", "status", "--address", env["cluster"].address,
                          "--json", "--statement-key", str(key), "--cluster-id", broker.cluster_id],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert {n["node_id"]: n["attestation"] for n in json.loads(out.stdout)["nodes"]}[ids["B"]] == "attested"


def test_100_calls_run_only_where_the_policy_allows(env: dict[str, Any]) -> None:
    ids, broker = env["id"], env["broker"]
    allowed = {ids["A"], ids["C"]}  # region eu, pinned measurement; not B (us), M, L, S
    args = [rc.put(list(range(i + 1)), domain=f.EU) for i in range(10)]
    refs = [f.where_eu.remote(args[i % 10]) for i in range(100)]
    seen = [rc.get(r) for r in refs]
    assert {s["node_id"] for s in seen} <= allowed and len({s["node_id"] for s in seen}) >= 2
    assert all(s["region"] == "eu" and s["tee"] == "sev-snp" for s in seen)
    object_ids = {a.object_id for a in args}
    grants = [g for g in _grants(broker) if g.get("object_id") in object_ids]
    assert grants and {g["node_id"] for g in grants} <= allowed  # the broker's own record
    # Narrowing: pools and tee options, within the policy.
    assert {rc.get(f.where_eu.options(pools="snp-az").remote())["node_id"] for _ in range(5)} == {ids["C"]}
    assert rc.get(f.where_any.options(tee="tdx").remote())["node_id"] == ids["B"]
    assert rc.get(f.where_any.options(regions="us").remote())["pool"] == "tdx-us"


def test_enclave_actor_is_placed_by_policy(env: dict[str, Any]) -> None:
    actor = f.Where.options(pools=["snp-az"]).remote()
    got = rc.get(actor.where.remote())
    assert got["node_id"] == env["id"]["C"] and got["calls"] == 1


def test_liar_self_declared_and_wrong_measurement_never_get_a_key(env: dict[str, Any]) -> None:
    ids, broker = env["id"], env["broker"]
    for bad in ("L", "S", "M"):
        assert ids[bad] not in {rc.get(f.where_eu.remote())["node_id"] for _ in range(20)}
    arg = rc.put([1, 2, 3], domain=f.EU)
    with pytest.raises(KeyReleaseDenied, match="refused a token"):  # cannot attest
        ray.get(_force(ids["L"], f.where_eu, arg))
    with pytest.raises(KeyReleaseDenied, match="refused a token"):  # attests, wrong measurement
        ray.get(_force(ids["M"], f.where_eu, arg))
    with pytest.raises(KeyReleaseDenied, match="no enclave executor"):  # nothing there to ask for a key
        ray.get(_force(ids["S"], f.where_eu, arg))
    bad_nodes = {ids["L"], ids["S"], ids["M"]}
    records = broker.audit_records()
    assert not [r for r in records if r.get("node_id") in bad_nodes and r.get("decision") == "grant"
                and r["event"] != "attest"]  # fmt: skip
    assert not [
        r for r in records if r.get("node_id") in {ids["L"], ids["S"]} and r.get("decision") == "grant"
    ]
    denied_m = [r for r in records if r.get("node_id") == ids["M"] and r["event"] == "attest"
                and r.get("scope") == "release"]  # fmt: skip
    assert denied_m and all(r["decision"] == "deny" for r in denied_m)


def test_narrowing_outside_the_policy_and_refused_options(env: dict[str, Any]) -> None:
    with pytest.raises(
        ValueError, match=r"regions=\('us',\) is outside the domain policy's regions \('eu',\)"
    ):
        f.where_eu.options(regions="us").remote()
    with pytest.raises(ValueError, match="fallback_strategy"):
        f.where_eu.options(fallback_strategy=[{"label_selector": {}}])
    with pytest.raises(ValueError, match="scheduling_strategy='SPREAD' is refused"):
        f.where_eu.options(scheduling_strategy="SPREAD")
    with pytest.raises(ValueError, match="outside the domain policy"):
        f.where_eu.options(label_selector={REGION_LABEL: "in(eu,us)"}).remote()


def test_no_qualifying_node_fails_within_the_wait(env: dict[str, Any]) -> None:
    started = time.monotonic()
    with pytest.raises(NoAttestedNodeError) as info:
        f.where_any.options(tee="nitro").remote()
    took = time.monotonic() - started
    assert 1.5 <= took < 6, took
    msg = str(info.value)
    assert "after 2 s" in msg and "tee=nitro" in msg and "sev-snp/snp-eu/eu" in msg
    assert "labelled as TEEs but holding no routing token: 2 x sev-snp" in msg


def test_y_revocation_removes_the_node_and_stops_its_actors(env: dict[str, Any]) -> None:
    ids, broker = env["id"], env["broker"]
    actor = f.Where.options(tee="tdx").remote()
    pid = rc.get(actor.where.remote())["pid"]
    broker.revoke("node", ids["B"], "test")
    wait_for(lambda: ids["B"] not in _registered() and not process_alive(pid),
             "revoked node still registered or its actor still running", timeout=10)  # fmt: skip
    with pytest.raises(NoAttestedNodeError, match="tee=tdx"):
        f.where_any.options(tee="tdx").remote()
    seen = {rc.get(f.where_any.remote())["node_id"] for _ in range(20)}
    assert seen and ids["B"] not in seen and seen <= {ids["A"], ids["C"], ids["M"]}  # completes elsewhere
