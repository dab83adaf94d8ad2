"""Batched unwraps (docs/kbs.md "Batched unwraps"): one UnwrapMany carries many objects under one
token, every Unwrap check runs per object, all or nothing; the client verifies each key response as
it verifies an Unwrap's; the rate limit is charged per object. Real server on 127.0.0.1 (TLS)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from ray_confidential.errors import KeyReleaseDenied
from ray_confidential.kbs.broker import MAX_UNWRAP_ITEMS
from ray_confidential.kbs.client import BrokerRefusedError, KBSClient, Token
from ray_confidential.kbs.proto import kbs_pb2
from ray_confidential.kbs.ratelimit import RateLimiter
from ray_confidential.sealed.format import DomainPublicKey, SealedHeader, open_with_dek, seal
from tests.kbs.broker_env import BUNDLE, CLUSTER, PKI, PROFILE, Executor, Harness, pinned_policy
from tests.kbs.test_broker import _with_version


def _domains(harness: Harness) -> Harness:
    harness.client("owner-a").create_domain("hospital", pinned_policy("tdx"))
    harness.client("owner-b").create_domain("bank", pinned_policy("tdx"))
    return harness


@pytest.fixture
def h(pki: PKI) -> Iterator[Harness]:
    harness = _domains(Harness(pki=pki))
    yield harness
    harness.close()


def _blob(h: Harness, domain: str = "hospital", value: bytes = b"x-ray", version: int | None = None) -> bytes:
    owner = h.client("owner-a" if domain == "hospital" else "owner-b")  # not the executors' rate bucket
    d = owner.descriptor(domain, version)
    return bytes(seal(value, DomainPublicKey(domain=domain, version=d.version, public_key=d.public_key)))


def _token(h: Harness, domains: tuple[str, ...] = ("hospital", "bank")) -> tuple[KBSClient, Executor, Token]:
    client, ex = h.client(), Executor.create("tdx")
    return client, ex, ex.attest(client, domains=domains)


def _raw(token: Token, ex: Executor, items: list[tuple[bytes, bytes]]) -> kbs_pb2.UnwrapManyRequest:
    pub = ex.key.public_key()
    return kbs_pb2.UnwrapManyRequest(
        token=token.raw, hpke_suite=pub.suite, executor_public_key=pub.raw,
        items=[kbs_pb2.UnwrapItem(header=hd, request_nonce=n) for hd, n in items],
    )  # fmt: skip


def test_keys_of_two_domains_open_their_objects_with_one_audit_wait(h: Harness) -> None:
    client, ex, token = _token(h)
    values = [b"scan-1", b"ledger-1", b"scan-2", b"ledger-2", b"scan-3"]
    blobs = [_blob(h, "hospital" if i % 2 == 0 else "bank", v) for i, v in enumerate(values)]
    batches, before = h.audit.batches, len(h.audit.records)
    deks = client.unwrap_many(token, blobs, ex.key)
    assert [open_with_dek(b, k, allow_pickle=False) for b, k in zip(blobs, deks, strict=True)] == values
    grants = h.audit.records[before:]
    assert h.audit.batches == batches + 1, "all grants appended together (one durability wait)"
    assert [(r["event"], r["decision"], r["item"], r["items"]) for r in grants] == [
        ("unwrap", "grant", i, 5) for i in range(5)
    ]
    assert [r["object_id"] for r in grants] == [SealedHeader.parse(b).object_id.hex() for b in blobs]
    assert {r["token_id"] for r in grants} == {token.jti}
    assert client.unwrap_many(token, [], ex.key) == []


def test_client_chunks_into_requests_of_at_most_the_maximum(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, ex, token = _token(h)
    blobs = [_blob(h, value=bytes([i])) for i in range(3)] * 23  # 69 objects; repeats are fine
    real, sizes = client._call, []

    def counting(method: str, request: Any) -> Any:
        sizes.append((method, len(request.items)))
        return real(method, request)

    monkeypatch.setattr(client, "_call", counting)
    deks = client.unwrap_many(token, blobs, ex.key)
    assert sizes == [("UnwrapMany", MAX_UNWRAP_ITEMS), ("UnwrapMany", 69 - MAX_UNWRAP_ITEMS)]
    assert [open_with_dek(b, k, allow_pickle=False) for b, k in zip(blobs, deks, strict=True)] == [
        bytes([i % 3]) for i in range(69)
    ]


def _refused_whole(
    h: Harness, client: KBSClient, ex: Executor, token: Token, blobs: list[bytes], *, code: str, reason: str,
    item: int,
) -> None:  # fmt: skip
    """The whole request refused with ``code``: no key on the wire (the coarse error only), no grant
    audited, one ``unwrap`` denial naming item ``item`` and its object, with ``reason``."""
    before = len(h.audit.records)
    nonces = [os.urandom(32) for _ in blobs]
    with pytest.raises(grpc.RpcError) as raw:  # the wire: an error status and no response message
        client._stub.UnwrapMany(_raw(token, ex, list(zip(blobs, nonces, strict=True))), timeout=5)
    assert raw.value.code().name == code and raw.value.details() == "permission denied"
    with pytest.raises(BrokerRefusedError, match=code):
        client.unwrap_many(token, blobs, ex.key)
    new = h.audit.records[before:]
    assert not [r for r in new if r.get("decision") == "grant"], "a refused batch grants nothing"
    denials = [r for r in new if r["event"] == "unwrap"]
    assert len(denials) == 2 and all(r["decision"] == "deny" and r["code"] == code for r in denials)
    assert reason in denials[0]["reason"] and denials[0]["item"] == item, denials[0]
    assert denials[0]["object_id"] == SealedHeader.parse(blobs[item]).object_id.hex()


def test_an_object_of_a_domain_the_token_does_not_name_refuses_the_batch(h: Harness) -> None:
    client, ex, token = _token(h, domains=("hospital",))
    blobs = [_blob(h), _blob(h), _blob(h, "bank"), _blob(h)]
    _refused_whole(
        h, client, ex, token, blobs, code="PERMISSION_DENIED", reason="does not name domain", item=2
    )


def test_a_tampered_header_refuses_the_batch(h: Harness) -> None:
    h.client("owner-a").rotate("hospital")
    client, ex, token = _token(h)
    blobs = [_blob(h, "bank"), _blob(h), _with_version(_blob(h), 1)]  # rewritten to name version 1
    _refused_whole(h, client, ex, token, blobs, code="PERMISSION_DENIED", reason="does not open", item=2)


def test_a_retired_version_refuses_the_batch(h: Harness) -> None:
    client, ex, token = _token(h)
    old = _blob(h)
    h.client("owner-a").rotate("hospital")
    h.client("owner-a").retire("hospital", 1)
    blobs = [_blob(h), old, _blob(h, "bank")]
    _refused_whole(h, client, ex, token, blobs, code="PERMISSION_DENIED", reason="retired", item=1)


def test_a_revoked_bundle_refuses_the_batch(h: Harness) -> None:
    client, ex, token = _token(h)
    blobs = [_blob(h, "bank"), _blob(h, "bank"), _blob(h)]
    assert len(client.unwrap_many(token, blobs, ex.key)) == 3
    h.client("owner-a").revoke("bundle", BUNDLE.hex())  # owner-a's domain (hospital) only
    _refused_whole(h, client, ex, token, blobs, code="PERMISSION_DENIED", reason="revoked bundle", item=2)
    assert len(client.unwrap_many(token, blobs[:2], ex.key)) == 2  # bank is owner-b's


def test_a_bad_token_refuses_before_any_object(h: Harness) -> None:
    client, _, token = _token(h)
    other = Executor.create("tdx")  # the token is not bound to this key
    before = len(h.audit.records)
    with pytest.raises(BrokerRefusedError, match="PERMISSION_DENIED"):
        client.unwrap_many(token, [_blob(h), _blob(h)], other.key)
    (denial,) = h.audit.records[before:]
    assert denial["event"] == "unwrap" and "cnf key" in denial["reason"] and "item" not in denial


def test_too_many_or_no_objects_refused(h: Harness) -> None:
    client, ex, token = _token(h)
    blob = _blob(h)
    too_many = _raw(token, ex, [(blob, os.urandom(32)) for _ in range(MAX_UNWRAP_ITEMS + 1)])
    for request, count in ((too_many, MAX_UNWRAP_ITEMS + 1), (_raw(token, ex, []), 0)):
        with pytest.raises(BrokerRefusedError, match="INVALID_ARGUMENT"):
            client._call("UnwrapMany", request)
        denial = h.audit.last("unwrap")
        assert denial["decision"] == "deny" and denial["items"] == count and "per request" in denial["reason"]


def test_a_request_nonce_repeated_within_a_batch_refused(h: Harness) -> None:
    """Each item's record must be its own: a nonce used twice in one request is refused (a client
    with a broken random source), so no two records of one request are interchangeable."""
    client, ex, token = _token(h)
    nonce = os.urandom(32)
    blobs = [_blob(h), _blob(h, "bank")]
    with pytest.raises(BrokerRefusedError, match="INVALID_ARGUMENT"):
        client._call("UnwrapMany", _raw(token, ex, [(blobs[0], nonce), (blobs[1], nonce)]))
    denial = h.audit.last("unwrap")
    assert denial["decision"] == "deny" and "repeats" in denial["reason"] and denial["item"] == 1
    assert not any(r.get("decision") == "grant" and r["event"] == "unwrap" for r in h.audit.records)


def _tampered(client: KBSClient, monkeypatch: pytest.MonkeyPatch, change: Any) -> None:
    real = client._call

    def call(method: str, request: Any) -> Any:
        resp = real(method, request)
        if method == "UnwrapMany":
            keys = list(resp.keys)
            del resp.keys[:]
            resp.keys.extend(change(keys))
        return resp

    monkeypatch.setattr(client, "_call", call)


def test_client_refuses_key_responses_swapped_between_items(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each response is checked against its own item's nonce and header: a record replayed from
    another item of the same request (same token, key and domain) is refused."""
    client, ex, token = _token(h)
    _tampered(client, monkeypatch, lambda keys: [keys[1], keys[0], *keys[2:]])
    with pytest.raises(KeyReleaseDenied, match="replayed or misdirected"):
        client.unwrap_many(token, [_blob(h, value=b"a"), _blob(h, value=b"b"), _blob(h)], ex.key)


@pytest.mark.parametrize("change", [lambda keys: keys[:-1], lambda keys: [*keys, keys[0]]])
def test_client_refuses_another_number_of_keys(
    h: Harness, monkeypatch: pytest.MonkeyPatch, change: Any
) -> None:
    client, ex, token = _token(h)
    _tampered(client, monkeypatch, change)
    with pytest.raises(KeyReleaseDenied, match="another number of objects"):
        client.unwrap_many(token, [_blob(h), _blob(h)], ex.key)


def test_rate_limit_is_charged_per_object(pki: PKI) -> None:
    harness = _domains(Harness(pki=pki, rate_limit=(0.001, 12)))  # ~no refill during the test
    try:
        blobs = [_blob(harness, value=bytes([i])) for i in range(8)]  # owners' buckets, not the executor's
        client, ex, token = _token(harness)  # GetChallenge + Attest: 2 of 12
        assert len(client.unwrap_many(token, blobs, ex.key)) == 8  # 8 more: 2 left
        with pytest.raises(BrokerRefusedError, match="RESOURCE_EXHAUSTED"):
            client.unwrap_many(token, blobs[:3], ex.key)  # 3 objects cost 3
        assert "UnwrapMany: rate limit exceeded" in harness.audit.last("rate_limit")["reason"]
        assert len(client.unwrap(token, blobs[0], ex.key)) == 32  # 1 object costs 1
    finally:
        harness.close()


def test_attest_with_unwrap_is_charged_per_object_too(pki: PKI) -> None:
    harness = _domains(Harness(pki=pki, rate_limit=(0.001, 6)))  # ~no refill during the test
    try:
        blobs = [_blob(harness, value=bytes([i])) for i in range(3)]
        client, ex = harness.client(), Executor.create("tdx")

        def attest_with(objects: list[bytes]) -> Any:
            ch = client.challenge()
            evidence = ex.tee.evidence(ch.binding(ex.key, cluster_id=CLUSTER, bundle_digest=BUNDLE))
            return client.attest_and_unwrap(ch, evidence, objects, profile=PROFILE[ex.kind], executor_key=ex.key,
                                            cluster_id=CLUSTER, bundle_digest=BUNDLE, node_id="node-1",
                                            pool="pool-1", region="eu", domains=("hospital",))  # fmt: skip

        attest_with(blobs)  # GetChallenge 1 + Attest 1 + 3 objects: 5 of 6
        with pytest.raises(BrokerRefusedError, match="RESOURCE_EXHAUSTED"):
            attest_with(blobs[:1])  # GetChallenge takes the last unit; Attest + 1 object would cost 2
        assert "Attest: rate limit exceeded" in harness.audit.last("rate_limit")["reason"]
    finally:
        harness.close()


def test_rate_limiter_cost() -> None:
    t = [0.0]
    rl = RateLimiter(rate=1.0, burst=4, clock=lambda: t[0])
    assert rl.allow("c", 3) and not rl.allow("c", 2) and rl.allow("c", 1) and not rl.allow("c")
    t[0] = 4.0  # full again
    assert rl.allow("c", 6), "a request costing more than the burst passes from a full bucket"
    t[0] = 5.0  # ... and leaves it in debt: 4 - 6 + 1 = -1
    assert not rl.allow("c")
    t[0] = 7.0
    assert rl.allow("c") and rl.allow("other", 5)
    with pytest.raises(ValueError, match="cost"):
        rl.allow("c", 0)


def test_attest_with_unwrap_takes_the_batched_path(h: Harness) -> None:
    """Attest with unwrap grants its objects through the same batch: checked first, audited together."""
    client, ex = h.client(), Executor.create("tdx")
    blobs = [_blob(h, value=b"first"), _blob(h, "bank", b"second")]
    ch = client.challenge()
    evidence = ex.tee.evidence(ch.binding(ex.key, cluster_id=CLUSTER, bundle_digest=BUNDLE))
    batches = h.audit.batches
    _, deks = client.attest_and_unwrap(ch, evidence, blobs, profile=PROFILE[ex.kind], executor_key=ex.key,
                                       cluster_id=CLUSTER, bundle_digest=BUNDLE, node_id="node-1",
                                       pool="pool-1", region="eu", domains=("hospital", "bank"))  # fmt: skip
    assert [open_with_dek(b, k, allow_pickle=False) for b, k in zip(blobs, deks, strict=True)] == [
        b"first",
        b"second",
    ]
    assert h.audit.batches == batches + 1
    assert [(r["event"], r.get("item")) for r in h.audit.records[-3:]] == [
        ("attest", None),
        ("unwrap", 0),
        ("unwrap", 1),
    ]
