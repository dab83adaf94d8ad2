"""Attest with unwrap (docs/kbs.md "Attest with unwrap"): one call that attests and unwraps, under
every check and audit record of a separate Unwrap, and verified by the client like one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ray_confidential.errors import KeyReleaseDenied
from ray_confidential.kbs.broker import MAX_ATTEST_UNWRAPS
from ray_confidential.kbs.client import BrokerRefusedError, KBSClient, Token
from ray_confidential.sealed.format import DomainPublicKey, open_with_dek, seal
from tests.kbs.broker_env import BUNDLE, CLUSTER, PKI, PROFILE, Executor, Harness, pinned_policy


@pytest.fixture
def h(pki: PKI) -> Iterator[Harness]:
    harness = Harness(pki=pki)
    owner = harness.client("owner-a")
    owner.create_domain("hospital", pinned_policy("tdx"))
    owner.create_domain("bank", pinned_policy("tdx"))
    yield harness
    harness.close()


def _blob(h: Harness, domain: str = "hospital", value: bytes = b"x-ray") -> bytes:
    d = h.client().descriptor(domain)
    return bytes(seal(value, DomainPublicKey(domain=domain, version=d.version, public_key=d.public_key)))


def _attest_unwrap(client: KBSClient, ex: Executor, blobs: list[bytes], *, domains: tuple[str, ...] = ("hospital",),
                   bundle: bytes = BUNDLE) -> tuple[Token, list[bytes]]:  # fmt: skip
    ch = client.challenge()
    evidence = ex.tee.evidence(ch.binding(ex.key, cluster_id=CLUSTER, bundle_digest=bundle))
    return client.attest_and_unwrap(ch, evidence, blobs, profile=PROFILE[ex.kind], executor_key=ex.key,
                                    cluster_id=CLUSTER, bundle_digest=bundle, node_id="node-1", pool="pool-1",
                                    region="eu", domains=domains)  # fmt: skip


def test_keys_open_their_objects_and_every_unwrap_is_audited(h: Harness) -> None:
    client, ex = h.client(), Executor.create("tdx")
    blobs = [_blob(h, value=b"first"), _blob(h, value=b"second")]
    token, deks = _attest_unwrap(client, ex, blobs)
    assert [open_with_dek(b, dek, allow_pickle=False) for b, dek in zip(blobs, deks, strict=True)] == [
        b"first",
        b"second",
    ]
    grants = [r for r in h.audit.records if r.get("decision") == "grant"]
    assert [r["event"] for r in grants[-3:]] == ["attest", "unwrap", "unwrap"]
    assert {r["token_id"] for r in grants[-2:]} == {token.jti}
    # The token works on its own afterwards, like any release token.
    assert len(client.unwrap(token, _blob(h), ex.key)) == 32


def test_no_objects_is_a_plain_attest(h: Harness) -> None:
    token, deks = _attest_unwrap(h.client(), Executor.create("tdx"), [])
    assert deks == [] and token.claims.scope == "release"


def test_object_of_a_domain_the_token_does_not_name_refused_and_audited(h: Harness) -> None:
    with pytest.raises(BrokerRefusedError, match="PERMISSION_DENIED"):
        _attest_unwrap(h.client(), Executor.create("tdx"), [_blob(h, "bank")], domains=("hospital",))
    denial = h.audit.last("unwrap")
    assert denial["decision"] == "deny" and "does not name domain" in denial["reason"]


def test_unapproved_bundle_refused_before_any_key(h: Harness) -> None:
    with pytest.raises(BrokerRefusedError, match="PERMISSION_DENIED"):
        _attest_unwrap(h.client(), Executor.create("tdx"), [_blob(h)], bundle=b"\x01" * 32)
    assert h.audit.last("attest")["decision"] == "deny"
    assert not any(r["event"] == "unwrap" for r in h.audit.records)


def test_too_many_objects_refused(h: Harness) -> None:
    blob = _blob(h)
    with pytest.raises(BrokerRefusedError, match="INVALID_ARGUMENT"):
        _attest_unwrap(h.client(), Executor.create("tdx"), [blob] * (MAX_ATTEST_UNWRAPS + 1))


def test_client_refuses_a_key_response_for_another_object(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker (or a relay) answering with the responses swapped: each is checked against its own
    request nonce and header, so the client refuses."""
    client, ex = h.client(), Executor.create("tdx")
    real = client._call

    def swapped(method: str, request: Any) -> Any:
        resp = real(method, request)
        if method == "Attest" and len(resp.keys) == 2:
            keys = list(resp.keys)
            del resp.keys[:]
            resp.keys.extend(reversed(keys))
        return resp

    monkeypatch.setattr(client, "_call", swapped)
    with pytest.raises(KeyReleaseDenied, match="replayed or misdirected"):
        _attest_unwrap(client, ex, [_blob(h, value=b"a"), _blob(h, value=b"b")])


def test_client_refuses_a_missing_key_response(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    client, ex = h.client(), Executor.create("tdx")
    real = client._call

    def dropped(method: str, request: Any) -> Any:
        resp = real(method, request)
        if method == "Attest":
            del resp.keys[:]
        return resp

    monkeypatch.setattr(client, "_call", dropped)
    with pytest.raises(KeyReleaseDenied, match="another number of objects"):
        _attest_unwrap(client, ex, [_blob(h)])
