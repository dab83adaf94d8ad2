"""The broker's statement feed (``GetStatements``): how registry statements leave a broker outside Ray.

Unit tests of :class:`StatementFeed`, then a real TLS gRPC server: routing attestations become admits
a follower fetches into a :class:`TrustRegistry`, revocations become revokes, other clusters see
nothing, and statements the follower did not get from the broker's key are refused by the registry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ray_confidential.kbs.config import ConfigError
from ray_confidential.kbs.server import KBSServer
from ray_confidential.kbs.statement_feed import ClusterStatementIssuer, StatementFeed, StatementFollower
from scheduler.registry import StatementSigner, TrustRegistry
from tests.kbs.broker_env import CLUSTER, PKI, Executor, Harness, pinned_policy, write_production_config

NODE_A, NODE_B = "a" * 56, "b" * 56


def _signer(registry: str = CLUSTER) -> StatementSigner:
    return StatementSigner(ec.generate_private_key(ec.SECP256R1()), registry_id=registry)


def _admit(signer: StatementSigner, node: str, exp_in: int = 60) -> Any:
    return signer.admit(node_id=node, tee="sev-snp", pool="p", region="eu", measurement="00" * 48, claims={},
                        expires_at=int(time.time()) + exp_in)  # fmt: skip


def test_feed_keeps_the_newest_statement_per_node_with_cursors() -> None:
    feed, signer = StatementFeed(), _signer()
    first = feed.since(CLUSTER, feed_id="", after=0)
    assert first.statements == () and first.feed_id == feed.feed_id
    a1 = _admit(signer, NODE_A)
    feed.publish(a1)
    feed.publish(_admit(signer, NODE_B))
    page = feed.since(CLUSTER, feed_id=feed.feed_id, after=first.cursor)
    assert len(page.statements) == 2 and page.statements[0] == a1.to_bytes()
    revoke = signer.revoke(node_id=NODE_A, reason="test")
    feed.publish(revoke)  # supersedes A's admit
    later = feed.since(CLUSTER, feed_id=feed.feed_id, after=page.cursor)
    assert later.statements == (revoke.to_bytes(),) and later.cursor > page.cursor
    whole = feed.since(CLUSTER, feed_id="another-feed", after=later.cursor)  # broker restarted: all again
    assert set(whole.statements) == {revoke.to_bytes(), page.statements[1]} and len(feed) == 2
    assert feed.since("other-cluster", feed_id="", after=0).statements == ()
    with pytest.raises(ValueError):
        feed.since(CLUSTER, feed_id="", after=0, wait_s=31)


def test_feed_long_poll_wakes_on_publish_and_expires_old_statements() -> None:
    now = [time.time()]
    feed, signer = StatementFeed(max_age=300, clock=lambda: now[0]), _signer()
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(feed.since(CLUSTER, feed_id=feed.feed_id, after=0,
                                                                   wait_s=10)))  # fmt: skip
    started = time.monotonic()
    reader.start()
    time.sleep(0.1)
    feed.publish(_admit(signer, NODE_A))
    reader.join(5)
    assert got and len(got[0].statements) == 1 and time.monotonic() - started < 5
    now[0] += 301  # older than the registry's replay window: gone
    assert feed.since(CLUSTER, feed_id="", after=0).statements == ()


@pytest.fixture
def served(pki: PKI) -> Iterator[tuple[Harness, StatementFeed, KBSServer, ec.EllipticCurvePrivateKey]]:
    h = Harness(pki=pki, admins=frozenset({"admin"}))
    key = ec.generate_private_key(ec.SECP256R1())
    feed = StatementFeed()
    h.broker.statement_listener = ClusterStatementIssuer(key, {CLUSTER}, feed.publish)
    server = KBSServer(h.broker, address="127.0.0.1:0", tls=pki.server, feed=feed)
    server.start()
    yield h, feed, server, key
    server.stop(grace=0)
    h.close()


def _follower(
    server: KBSServer, pki: PKI, registry: TrustRegistry, cluster: str = CLUSTER
) -> StatementFollower:
    return StatementFollower(f"127.0.0.1:{server.port}", ca_cert=pki.ca_pem, registry_id=cluster,
                             submit=registry.submit, wait_s=0.5)  # fmt: skip


def test_routing_attestations_and_revocations_reach_a_following_registry(served: Any, pki: PKI) -> None:
    h, _, server, key = served
    verifier = StatementSigner(key, registry_id=CLUSTER).verifier()
    registry = TrustRegistry(verifier)
    follower = _follower(server, pki, registry)
    assert follower.poll_once(0) == 0
    client = h.client()
    Executor.create("sev-snp").attest(client, scope="routing", node_id=NODE_A)
    h.client("owner-a").create_domain("hospital", pinned_policy("sev-snp"))
    Executor.create("sev-snp").attest(
        client, scope="release", node_id=NODE_B, domains=("hospital",)
    )  # no admit
    assert follower.poll_once() == 1
    (entry,) = registry.entries(now=time.time())
    assert entry.node_id == NODE_A and entry.pool == "pool-1" and entry.region == "eu"
    h.broker.revoke("admin", "node", NODE_A, "compromised")
    assert follower.poll_once() == 1 and list(registry.entries(now=time.time())) == []
    # A fresh follower (a restarted registry actor) gets the current set: A's revoke, so no entry.
    again = TrustRegistry(verifier)
    _follower(server, pki, again).poll_once(0)
    assert list(again.entries(now=time.time())) == []
    # Another cluster's registry sees nothing; a registry pinned to another key applies nothing.
    other = TrustRegistry(
        StatementSigner(ec.generate_private_key(ec.SECP256R1()), registry_id=CLUSTER).verifier()
    )
    Executor.create("tdx").attest(client, scope="routing", node_id=NODE_B)
    assert _follower(server, pki, other).poll_once(0) == 0 and list(other.entries(now=time.time())) == []
    assert (
        _follower(server, pki, TrustRegistry(_signer("cluster-b").verifier()), "cluster-b").poll_once(0) == 0
    )


def test_follower_thread_applies_statements_as_they_are_issued(served: Any, pki: PKI) -> None:
    h, _, server, key = served
    registry = TrustRegistry(StatementSigner(key, registry_id=CLUSTER).verifier())
    follower = _follower(server, pki, registry)
    follower.start()
    try:
        Executor.create("sev-snp").attest(h.client(), scope="routing", node_id=NODE_A)
        deadline = time.monotonic() + 10
        while not registry.entries(now=time.time()):
            assert time.monotonic() < deadline, follower.last_error
            time.sleep(0.05)
    finally:
        follower.stop()


def test_a_broker_without_statement_key_answers_unimplemented(pki: PKI) -> None:
    h = Harness(pki=pki)
    try:
        follower = StatementFollower(h.target, ca_cert=pki.ca_pem, registry_id=CLUSTER, submit=lambda b: None)
        with pytest.raises(grpc.RpcError) as info:
            follower.poll_once(0)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        h.close()
    with pytest.raises(ValueError, match="plaintext"):
        StatementFollower("kbs.example:443", ca_cert=None, registry_id=CLUSTER, submit=lambda b: None)


def test_production_config_statement_key_needs_cluster_ids(tmp_path: Any, pki: PKI) -> None:
    from ray_confidential.kbs.config import BrokerConfig, build, private_pem

    (tmp_path / "statement.pem").write_bytes(private_pem(ec.generate_private_key(ec.SECP256R1())))
    path = write_production_config(tmp_path, pki)
    import yaml

    doc = yaml.safe_load(path.read_text())
    doc["keys"]["statement_key"] = "statement.pem"
    doc.pop("cluster_ids", None)
    with pytest.raises(ConfigError, match="cluster_ids"):
        BrokerConfig.from_dict(doc, base=tmp_path)
    doc["cluster_ids"] = [CLUSTER]
    config = BrokerConfig.from_dict(doc, base=tmp_path)
    server, broker = build(config)
    try:
        assert server.feed is not None and isinstance(broker.statement_listener, ClusterStatementIssuer)
    finally:
        broker.close()
