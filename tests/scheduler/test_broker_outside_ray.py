"""Acceptance (issue 6): placement with a key broker outside Ray, expiry, and a node killed mid-call.

The broker here is never attached to Ray: the driver uses it as a configured broker
(``$RAY_CONFIDENTIAL_KBS``, ``rc.init`` row 4) and pins its statement key from its own configuration
(``$RAY_CONFIDENTIAL_STATEMENT_KEY``, ``$RAY_CONFIDENTIAL_CLUSTER_ID``). Statements reach the trust
registry only through the broker's feed, which the registry actor follows (docs/placement.md
section 6). Routing tokens live 6 s here, so expiry is seen within seconds.

Nodes: A and C (sev-snp, eu; one is killed mid-call), D (tdx, eu; revoked), X (sev-snp, eu, reaches
the broker through a proxy the test cuts: expiry), S (labelled sev-snp by itself, no executor). The driver cannot open results (not an executor); the
owner opens exported bytes off-cluster with the domain keys, as ``ray-confidential open`` does.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

import ray_confidential as rc
from ray_confidential.errors import KeyReleaseDenied, NoAttestedNodeError
from ray_confidential.kbs.config import public_pem
from ray_confidential.kbs.directory import KBS_ENV
from ray_confidential.kbs.embedded import EmbeddedBroker
from ray_confidential.keyservice import DevKeyService
from ray_confidential.sealed import open_sealed
from ray_confidential.testing import add_tee_node
from ray_confidential.testing.tee_node import stop_executors
from scheduler.calls import CLUSTER_ID_ENV, STATEMENT_KEY_ENV
from scheduler.labels import POOL_LABEL, REGION_LABEL, TEE_LABEL
from scheduler.registry_actor import REGISTRY_ACTOR_NAME, REGISTRY_NAMESPACE
from tests.ray_helpers import check_cluster_processes, process_alive, wait_for
from tests.ray_helpers import registered_node_ids as _registered
from tests.scheduler import e2e_funcs as f

pytestmark = pytest.mark.ray
NODE = {"num_cpus": 1, "object_store_memory": 80 << 20}
TOKEN_TTL_S = 6


class Proxy:
    """A loopback TCP forwarder to the broker that the test can cut (a node losing the broker)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut:
                client.close()
                continue
            upstream = socket.create_connection(self._target)
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self._cut = True
        for s in self._conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.cut()
        self._listener.close()


class LaunchVia:
    """Launch data of ``broker`` with another target (what ``add_tee_node(broker=...)`` reads)."""

    def __init__(self, broker: EmbeddedBroker, target: str, folder: Path) -> None:
        data = json.loads(broker.launch_path.read_text())
        self.launch_path = folder / "launch-via-proxy.json"
        self.launch_path.write_text(json.dumps({**data, "target": target}))
        os.chmod(self.launch_path, 0o600)


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="rc-outside-"))
    state = folder / "keys"
    owner = DevKeyService(state)  # the data owner's keys, never in the driver
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        owner.create_domain(f.EU, policy=rc.DomainPolicy(dev=True, regions=("eu",)))
        owner.create_domain(f.ANY)
    broker = EmbeddedBroker.start(state, token_ttl=TOKEN_TTL_S)  # never attached to Ray
    proxy = Proxy(broker.target)
    (folder / "release.pem").write_bytes(public_pem(broker.config.release_key))
    (folder / "statement.pem").write_bytes(broker.statement_verifier.public_pem())
    (folder / "kbs-client.yaml").write_text(
        f"target: {broker.target}\nrelease_public_key: {folder / 'release.pem'}\n"
    )
    env_vars = {KBS_ENV: str(folder / "kbs-client.yaml"), STATEMENT_KEY_ENV: str(folder / "statement.pem"),
                CLUSTER_ID_ENV: broker.cluster_id}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:  # restored however the setup below ends
        for k, v in env_vars.items():
            mp.setenv(k, v)
        c: Cluster | None = None
        n: dict[str, Any] = {}
        try:
            c = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, "num_cpus": 1,
                        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 10}})  # fmt: skip
            n["A"] = add_tee_node(c, tee="sev-snp", pool="snp-eu", region="eu", broker=broker, **NODE)
            n["C"] = add_tee_node(c, tee="sev-snp", pool="snp-az", region="eu", broker=broker, **NODE)
            n["D"] = add_tee_node(c, tee="tdx", pool="tdx-eu", region="eu", broker=broker, **NODE)
            n["X"] = add_tee_node(c, tee="sev-snp", pool="snp-x", region="eu", broker=LaunchVia(broker, proxy.address, folder),
                                  executor_args=("--broker-wait", "2", "--poll-interval", "0.5"), **NODE)  # fmt: skip
            n["S"] = c.add_node(
                labels={TEE_LABEL: "sev-snp", POOL_LABEL: "snp-eu", REGION_LABEL: "eu"}, **NODE
            )
            rc.init(address=c.address, placement_wait_s=2)
            ids = {k: v.node_id for k, v in n.items()}
            check_cluster_processes(c)
            yield {"cluster": c, "id": ids, "nodes": n, "broker": broker, "owner": owner, "proxy": proxy}
        finally:
            rc.shutdown()
            ray.shutdown()
            stop_executors()
            if c is not None:
                c.shutdown()
            proxy.close()
            broker.stop()


def _opened(env: dict[str, Any], ref: Any) -> Any:
    """The owner, off-cluster: exported sealed bytes opened with the domain keys."""
    return open_sealed(rc.export(ref), env["owner"])


def test_the_registry_follows_the_broker_and_calls_land_on_attested_nodes(env: dict[str, Any]) -> None:
    ids = env["id"]
    # The first placement creates the registry actor, told to follow the broker's feed.
    first = f.where_eu.remote()
    wait_for(lambda: {ids[k] for k in "ACDX"} <= _registered(), "nodes not admitted through the feed")
    actor = ray.get_actor(REGISTRY_ACTOR_NAME, namespace=REGISTRY_NAMESPACE)
    following = ray.get(actor.following.remote())
    assert following["target"] == env["broker"].target and following["applied"] >= 4
    from scheduler.status_cli import collect, render

    doc = collect(env["broker"].statement_verifier)
    assert doc["registry_follows"]["target"] == env["broker"].target
    assert f"registry follows the statement feed of {env['broker'].target}" in render(doc)
    assert ids["S"] not in _registered()
    with pytest.raises(KeyReleaseDenied, match="not an attested executor"):  # the driver cannot open
        rc.get(first)
    refs = [f.where_eu.remote() for _ in range(15)]  # Ray picks among the qualifying nodes
    assert {_opened(env, r)["node_id"] for r in refs} <= {ids[k] for k in "ACDX"}
    for node, pool in (
        ("A", "snp-eu"),
        ("C", "snp-az"),
        ("D", "tdx-eu"),
        ("X", "snp-x"),
    ):  # each one schedulable
        assert _opened(env, f.where_eu.options(pools=pool).remote())["node_id"] == ids[node]
    grants = [
        r for r in env["broker"].audit_records() if r["event"] == "unwrap" and r.get("decision") == "grant"
    ]
    assert all(r["node_id"] != ids["S"] for r in grants)


def test_a_node_killed_mid_call_the_retry_lands_on_the_other_qualifying_node(
    env: dict[str, Any], tmp_path: Path
) -> None:
    ids, c = env["id"], env["cluster"]
    marks = tmp_path / "marks"
    marks.mkdir()
    os.chmod(marks, 0o777)
    qualifying = {ids["A"], ids["C"]}
    # Both must be routable when the call is placed, or its label selector names one node only and
    # the retry has nowhere to go (seen on a doubly loaded machine, where C attested late).
    wait_for(lambda: qualifying <= _registered(), "A and C are not both admitted")
    ref = f.mark_and_wait.options(pools=["snp-eu", "snp-az"], max_retries=1).remote(str(marks), 60.0)
    wait_for(lambda: any(p.name[:56] in qualifying for p in marks.iterdir()), "the call never started")
    (first,) = {p.name[:56] for p in marks.iterdir()}
    killed = next(k for k in "AC" if ids[k] == first)
    c.remove_node(env["nodes"][killed])
    env["killed"] = killed
    (marks / "go").write_text("")
    ran_on = _opened(env, ref)
    assert ran_on in qualifying and ran_on != first  # the retry (at-least-once) on the other one
    assert {p.name[:56] for p in marks.iterdir() if p.name != "go"} == {first, ran_on}


def test_revocation_reaches_the_registry_through_the_feed(env: dict[str, Any]) -> None:
    ids = env["id"]
    wait_for(lambda: ids["D"] in _registered(), "D not admitted")
    assert _opened(env, f.where_eu.options(tee="tdx").remote())["node_id"] == ids["D"]
    env["broker"].revoke("node", ids["D"], "test")
    wait_for(lambda: ids["D"] not in _registered(), "revoked node still registered", timeout=15)
    with pytest.raises(NoAttestedNodeError, match="tee=tdx"):
        f.where_eu.options(tee="tdx").remote()


def test_expiry_a_node_cut_off_from_the_broker_leaves_and_its_actors_stop(env: dict[str, Any]) -> None:
    ids = env["id"]
    wait_for(lambda: ids["X"] in _registered(), "X not admitted")
    actor = f.Where.options(pools="snp-x").remote()
    where = _opened(env, actor.where.remote())
    assert where["node_id"] == ids["X"]
    env["proxy"].cut()  # X can no longer renew its routing token, nor poll revocations
    wait_for(lambda: ids["X"] not in _registered(), "X still registered after its token expired",
          timeout=TOKEN_TTL_S + 15)  # fmt: skip
    wait_for(
        lambda: not process_alive(where["pid"]),
        "X's enclave actor still runs after X failed closed",
        timeout=20,
    )
    with pytest.raises(NoAttestedNodeError):
        f.where_eu.options(pools="snp-x").remote()
    survivor = ids["C" if env.get("killed") == "A" else "A"]
    assert _opened(env, f.where_eu.remote())["node_id"] == survivor  # new calls complete elsewhere
