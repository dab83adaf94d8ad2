"""Key broker against a real gRPC server on 127.0.0.1 (TLS, owners over mutual TLS): happy paths,
and every refusal of issue 4's acceptance list: denied, audited, no key material on the wire."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from ray_confidential.crypto import hpke
from ray_confidential.domains import DomainPolicy
from ray_confidential.kbs.client import BrokerRefusedError, KBSClient
from ray_confidential.kbs.tokens import TokenClaims, TokenIssuer
from ray_confidential.sealed.format import DomainPublicKey, SealedHeader, open_with_dek, seal
from ray_confidential.testing.simulated import default_measurement
from tests.kbs.broker_env import BUNDLE, CLUSTER, PKI, PROFILE, Executor, Harness, pinned_policy


@pytest.fixture
def h(pki: PKI) -> Iterator[Harness]:
    harness = Harness(pki=pki)
    yield harness
    harness.close()


def _seal(
    owner: KBSClient, domain: str, value: Any = b"patient records", version: int | None = None
) -> bytes:
    desc = owner.descriptor(domain, version)
    return bytes(
        seal(value, DomainPublicKey(domain=domain, version=desc.version, public_key=desc.public_key))
    )


def _denied(
    h: Harness, exc: pytest.ExceptionInfo[BrokerRefusedError], code: str, event: str, reason: str
) -> None:
    """Coarse code on the wire, full reason only in the audit record (written before the answer)."""
    assert exc.value.code == code
    record = h.audit.last(event)
    assert record["decision"] == "deny", record
    assert reason.lower() in record["reason"].lower(), record["reason"]


# ---- happy path per TEE kind ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(PROFILE))
def test_happy_path_unwrapped_key_opens_data(h: Harness, kind: str) -> None:
    owner = h.client("owner-a")
    owner.create_domain("hospital", pinned_policy(kind))
    blob = _seal(owner, "hospital", {"rows": [1, 2, 3]})
    ex = Executor.create(kind)
    client = h.client()
    token = ex.attest(client, domains=("hospital",))
    assert (token.claims.env, token.claims.scope, token.claims.tee) == ("dev", "release", kind)
    assert token.claims.measurement == default_measurement(kind).hex()
    assert token.claims.exp - token.claims.iat <= 300
    dek = client.unwrap(token, blob, ex.key)
    assert open_with_dek(blob, dek, allow_pickle=False) == {"rows": [1, 2, 3]}
    grant = h.audit.last("unwrap")
    assert grant["decision"] == "grant" and grant["domain"] == "hospital" and grant["token_id"] == token.jti


def test_health_serving(h: Harness, pki: PKI) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem)
    with grpc.secure_channel(h.target, creds) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_jwks_verifies_issued_tokens(h: Harness) -> None:
    from ray_confidential.kbs.tokens import TokenVerifier

    owner = h.client("owner-a")
    owner.create_domain("d", pinned_policy("tdx"))
    client = h.client()
    token = Executor.create("tdx").attest(client, domains=("d",))
    verifier = TokenVerifier(jwks=client.jwks(), issuer="test-kbs", audience="test-kbs", production=False)
    assert verifier.verify(token.raw, now=token.claims.iat).jti == token.jti


# ---- attestation refusals ------------------------------------------------------------------------


@pytest.fixture
def hospital(h: Harness) -> KBSClient:
    owner = h.client("owner-a")
    owner.create_domain("hospital", pinned_policy("sev-snp"))
    return owner


def _attest_raw(h: Harness, ex: Executor, *, evidence_binding: dict[str, Any] | None = None,
                request: dict[str, Any] | None = None, challenge: Any = None) -> Any:  # fmt: skip
    """Attest with evidence bound to (possibly) other values than the request claims."""
    client = h.client()
    ch = challenge or client.challenge()
    eb = {"cluster_id": CLUSTER, "bundle_digest": BUNDLE, **(evidence_binding or {})}
    key = eb.pop("key", ex.key)
    nonce_ch = eb.pop("challenge", ch)
    evidence = ex.tee.evidence(nonce_ch.binding(key, **eb))
    req = {"cluster_id": CLUSTER, "bundle_digest": BUNDLE, **(request or {})}
    return client.attest(ch, evidence, profile=PROFILE[ex.kind], executor_key=ex.key, scope="release",
                         node_id="node-1", pool="pool-1", region="eu", domains=("hospital",), **req)  # fmt: skip


def test_replayed_nonce_denied(h: Harness, hospital: KBSClient) -> None:
    ex = Executor.create("sev-snp")
    client = h.client()
    ch = client.challenge()
    _attest_raw(h, ex, challenge=ch)
    with pytest.raises(BrokerRefusedError) as exc:
        _attest_raw(h, ex, challenge=ch)
    _denied(h, exc, "PERMISSION_DENIED", "attest", "already used")


def test_expired_nonce_denied(h: Harness, hospital: KBSClient) -> None:
    ch = h.client().challenge()
    h.clock.offset = 1.5  # challenge_ttl is 1 s in the harness
    with pytest.raises(BrokerRefusedError) as exc:
        _attest_raw(h, Executor.create("sev-snp"), challenge=ch)
    _denied(h, exc, "PERMISSION_DENIED", "attest", "expired")


@pytest.mark.parametrize(
    "what",
    ["key", "nonce", "cluster", "bundle"],
)
def test_evidence_binding_something_else_denied(h: Harness, hospital: KBSClient, what: str) -> None:
    ex = Executor.create("sev-snp")
    others: dict[str, dict[str, Any]] = {
        "key": {"key": hpke.generate_private_key()},
        "nonce": {"challenge": h.client().challenge()},
        "cluster": {"cluster_id": "someone-elses-cluster"},
        "bundle": {"bundle_digest": b"\x66" * 32},
    }
    other = others[what]
    with pytest.raises(BrokerRefusedError) as exc:
        _attest_raw(h, ex, evidence_binding=other)
    _denied(h, exc, "PERMISSION_DENIED", "attest", "binding")


@pytest.mark.parametrize(
    "tee_kw, reason",
    [
        ({"measurement": b"\x01" * 48}, "measurement"),
        ({"debug": True}, "debug"),
        ({"root": "attacker"}, "root"),
    ],
    ids=["wrong-measurement-trusted-root", "debug-tee", "untrusted-root"],
)
def test_appraisal_failures_denied(
    h: Harness, hospital: KBSClient, tee_kw: dict[str, Any], reason: str
) -> None:
    with pytest.raises(BrokerRefusedError) as exc:
        _attest_raw(h, Executor.create("sev-snp", **tee_kw))
    _denied(h, exc, "PERMISSION_DENIED", "attest", reason)


def test_tcb_below_minimum_denied(h: Harness) -> None:
    m = default_measurement("sev-snp").hex()
    appraisal = {
        "version": 1,
        "tees": {"sev-snp": {"measurements": [m], "min_tcb": {"bl": 9, "tee": 0, "snp": 99, "ucode": 250}}},
    }
    h.client("owner-a").create_domain("hospital", pinned_policy("sev-snp"), appraisal=appraisal)
    with pytest.raises(BrokerRefusedError) as exc:
        _attest_raw(h, Executor.create("sev-snp"))
    _denied(h, exc, "PERMISSION_DENIED", "attest", "tcb")


def test_bundle_not_approved_denied_at_attest(h: Harness, hospital: KBSClient) -> None:
    with pytest.raises(BrokerRefusedError) as exc:
        _attest_raw(h, Executor.create("sev-snp"), evidence_binding={"bundle_digest": b"\x55" * 32},
                    request={"bundle_digest": b"\x55" * 32})  # fmt: skip
    _denied(h, exc, "PERMISSION_DENIED", "attest", "not approved")


def test_test_root_on_production_broker_denied(pki: PKI) -> None:
    prod = Harness(env="prod", pki=pki)
    try:
        policy = dataclasses.replace(pinned_policy("sev-snp"))
        prod.client("owner-a").create_domain("hospital", policy)
        with pytest.raises(BrokerRefusedError) as exc:
            _attest_raw(prod, Executor.create("sev-snp"))  # simulated root: not a vendor root
        _denied(prod, exc, "PERMISSION_DENIED", "attest", "root")
    finally:
        prod.close()


def test_production_broker_refuses_development_policy(pki: PKI) -> None:
    prod = Harness(env="prod", pki=pki)
    try:
        with pytest.warns(UserWarning):
            dev_policy = DomainPolicy.development()
        with pytest.raises(BrokerRefusedError) as exc:
            prod.client("owner-a").create_domain("d", dev_policy)
        _denied(prod, exc, "INVALID_ARGUMENT", "create_domain", "development")
        with pytest.raises(BrokerRefusedError) as exc:  # approved bundle but no measurement pin
            prod.client("owner-a").create_domain("d", DomainPolicy(bundles=(BUNDLE.hex(),)))
        _denied(prod, exc, "INVALID_ARGUMENT", "create_domain", "measurement pin")
    finally:
        prod.close()


# ---- unwrap refusals -----------------------------------------------------------------------------


@pytest.fixture
def granted(h: Harness, hospital: KBSClient) -> tuple[Executor, Any, bytes]:
    ex = Executor.create("sev-snp")
    token = ex.attest(h.client(), domains=("hospital",))
    return ex, token, _seal(hospital, "hospital")


def test_token_presented_with_another_key_denied(h: Harness, granted: Any) -> None:
    _ex, token, blob = granted
    thief = hpke.generate_private_key()
    with pytest.raises(BrokerRefusedError) as exc:
        h.client().unwrap(token, blob, thief)
    _denied(h, exc, "PERMISSION_DENIED", "unwrap", "cnf")


def _mint(h: Harness, ex: Executor, *, env: str = "dev", audience: str = "test-kbs", scope: str = "release",
          domains: tuple[str, ...] = ("hospital",)) -> Any:  # fmt: skip
    """A token signed by the broker's own token key, with chosen claims (an attacker holding a token
    from a sibling broker that shares the key, or the broker's own routing/dev token)."""
    from ray_confidential.kbs.client import Token

    issuer = TokenIssuer(signing_key=h.token_key, issuer="test-kbs", audience=audience, env=env)
    claims = TokenClaims.build(issuer="test-kbs", audience=audience, env=env, scope=scope, now=int(h.clock()), ttl=60,
                               cnf_key=ex.key.public_key(), tee="sev-snp",
                               measurement=default_measurement("sev-snp").hex(), tcb="unknown", node_id="node-1",
                               pool="pool-1", region="eu", bundle_digest=BUNDLE.hex(), cluster_id=CLUSTER,
                               domains=domains)  # fmt: skip
    return Token.from_raw(issuer.sign(claims))


def test_aud_mismatch_denied(h: Harness, granted: Any) -> None:
    ex, _, blob = granted
    with pytest.raises(BrokerRefusedError) as exc:
        h.client().unwrap(_mint(h, ex, audience="another-broker"), blob, ex.key)
    _denied(h, exc, "PERMISSION_DENIED", "unwrap", "aud")


def test_dev_token_in_production_denied(pki: PKI) -> None:
    prod = Harness(env="prod", pki=pki)
    try:
        owner = prod.client("owner-a")
        owner.create_domain("hospital", pinned_policy("sev-snp"))
        blob = _seal(owner, "hospital")
        ex = Executor.create("sev-snp")
        client = prod.client()
        assert (
            len(client.unwrap(_mint(prod, ex, env="prod"), blob, ex.key)) == 32
        )  # control: prod token opens
        with pytest.raises(BrokerRefusedError) as exc:
            client.unwrap(_mint(prod, ex, env="dev"), blob, ex.key)
        _denied(prod, exc, "PERMISSION_DENIED", "unwrap", "env=dev")
    finally:
        prod.close()


def test_routing_scope_token_for_release_denied(h: Harness, granted: Any) -> None:
    ex, _, blob = granted
    client = h.client()
    routing = ex.attest(client, scope="routing")
    assert routing.claims.scope == "routing"
    with pytest.raises(BrokerRefusedError) as exc:
        client.unwrap(routing, blob, ex.key)
    _denied(h, exc, "PERMISSION_DENIED", "unwrap", "routing-scope")


def test_token_for_domain_x_used_on_y_denied(h: Harness, granted: Any) -> None:
    ex, token, _ = granted
    other = h.client("owner-a")
    other.create_domain("bank", pinned_policy("sev-snp"))
    with pytest.raises(BrokerRefusedError) as exc:
        h.client().unwrap(token, _seal(other, "bank"), ex.key)
    _denied(h, exc, "PERMISSION_DENIED", "unwrap", "does not name domain")


def _with_version(blob: bytes, version: int) -> bytes:
    header = SealedHeader.parse(blob)
    offset = 5 + 6 + 1 + len(header.domain.encode())
    return blob[:offset] + struct.pack(">I", version) + blob[offset + 4 :]


def test_key_version_downgrade_denied(h: Harness, hospital: KBSClient) -> None:
    hospital.rotate("hospital")
    blob = _seal(hospital, "hospital")
    assert SealedHeader.parse(blob).key_version == 2
    ex = Executor.create("sev-snp")
    client = h.client()
    token = ex.attest(client, domains=("hospital",))
    assert len(client.unwrap(token, blob, ex.key)) == 32
    with pytest.raises(BrokerRefusedError) as exc:  # header rewritten to name version 1
        client.unwrap(token, _with_version(blob, 1), ex.key)
    _denied(h, exc, "PERMISSION_DENIED", "unwrap", "downgrade")


def test_retired_version_denied(h: Harness, granted: Any, hospital: KBSClient) -> None:
    ex, token, blob = granted
    client = h.client()
    assert len(client.unwrap(token, blob, ex.key)) == 32
    hospital.rotate("hospital")
    hospital.retire("hospital", 1)
    with pytest.raises(BrokerRefusedError) as exc:
        client.unwrap(token, blob, ex.key)
    _denied(h, exc, "PERMISSION_DENIED", "unwrap", "retired")


@pytest.mark.parametrize("kind", ["node", "measurement", "bundle", "token", "tcb"])
def test_revocation_denies_in_the_same_second(
    h: Harness, granted: Any, hospital: KBSClient, kind: str
) -> None:
    ex, token, blob = granted
    client = h.client()
    assert len(client.unwrap(token, blob, ex.key)) == 32
    epoch = client.revocation_epoch()
    value = {"node": "node-1", "measurement": default_measurement("sev-snp").hex(), "bundle": BUNDLE.hex(),
             "token": token.jti, "tcb": token.claims.tcb}[kind]  # fmt: skip
    assert hospital.revoke(kind, value, reason="test") == epoch + 1
    assert client.revocation_epoch() == epoch + 1
    with pytest.raises(BrokerRefusedError) as exc:  # no clock advance: the very next unwrap
        client.unwrap(token, blob, ex.key)
    _denied(h, exc, "PERMISSION_DENIED", "unwrap", f"revoked {kind}")


def test_owner_revocation_is_scoped_to_their_domains(h: Harness, granted: Any) -> None:
    ex, token, blob = granted  # hospital belongs to owner-a
    h.client("owner-b").revoke("node", "node-1")
    assert len(h.client().unwrap(token, blob, ex.key)) == 32


@pytest.mark.parametrize("op", ["create", "update", "rotate", "retire"])
def test_owner_b_cannot_touch_owner_a_domain(h: Harness, hospital: KBSClient, op: str) -> None:
    b = h.client("owner-b")
    calls: dict[str, Callable[[], object]] = {
        "create": lambda: b.create_domain("hospital", pinned_policy("sev-snp")),
        "update": lambda: b.update_policy("hospital", pinned_policy("tdx")),
        "rotate": lambda: b.rotate("hospital"),
        "retire": lambda: b.retire("hospital", 1),
    }
    with pytest.raises(BrokerRefusedError) as exc:
        calls[op]()
    event = {"create": "create_domain", "update": "update_policy"}.get(op, op)
    _denied(h, exc, "PERMISSION_DENIED", event, "CN=owner-a")
    assert h.client("owner-a").descriptor("hospital").version == 1


def test_owner_rpc_without_client_certificate_denied(h: Harness) -> None:
    with pytest.raises(BrokerRefusedError) as exc:
        h.client().create_domain("d", pinned_policy("tdx"))
    _denied(h, exc, "PERMISSION_DENIED", "create_domain", "client certificate")


def test_create_existing_domain_with_other_policy_refused_update_is_audited(
    h: Harness, hospital: KBSClient
) -> None:
    assert hospital.create_domain("hospital", pinned_policy("sev-snp")).version == 1  # idempotent
    with pytest.raises(BrokerRefusedError) as exc:
        hospital.create_domain("hospital", pinned_policy("tdx"))
    _denied(h, exc, "ALREADY_EXISTS", "create_domain", "different policy")
    hospital.update_policy("hospital", pinned_policy("tdx"))
    rec = h.audit.last("update_policy")
    assert rec["decision"] == "grant" and rec["old_policy_hash"] != rec["policy_hash"]


def test_policy_update_applies_to_live_tokens(h: Harness, granted: Any, hospital: KBSClient) -> None:
    ex, token, blob = granted
    hospital.update_policy("hospital", pinned_policy("sev-snp", regions=("us",)))
    with pytest.raises(BrokerRefusedError) as exc:
        h.client().unwrap(token, blob, ex.key)
    _denied(h, exc, "PERMISSION_DENIED", "unwrap", "region")


def test_rate_limit_exceeded_denied(pki: PKI) -> None:
    limited = Harness(pki=pki, rate_limit=(0.5, 3))
    try:
        client = limited.client()
        for _ in range(3):
            client.revocation_epoch()
        with pytest.raises(BrokerRefusedError) as exc:
            client.challenge()
        _denied(limited, exc, "RESOURCE_EXHAUSTED", "rate_limit", "rate limit")
    finally:
        limited.close()


def test_denials_carry_no_detail_on_the_wire(h: Harness, granted: Any, pki: PKI) -> None:
    from ray_confidential.kbs.proto import kbs_pb2, kbs_pb2_grpc

    _ex, token, blob = granted
    thief = hpke.generate_private_key().public_key()
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem)
    with grpc.secure_channel(h.target, creds) as ch:
        with pytest.raises(grpc.RpcError) as exc:
            stub = kbs_pb2_grpc.KeyBrokerStub(ch)  # type: ignore[no-untyped-call]
            stub.Unwrap(kbs_pb2.UnwrapRequest(
                token=token.raw, header=blob, request_nonce=b"\x00" * 32, hpke_suite=thief.suite,
                executor_public_key=thief.raw), timeout=5)  # fmt: skip
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert exc.value.details() == "permission denied"
    assert not exc.value.trailing_metadata()


def test_every_decision_is_in_the_signed_audit_log(h: Harness, granted: Any) -> None:
    from ray_confidential.kbs.audit import verify_log

    ex, token, blob = granted
    client = h.client()
    client.unwrap(token, blob, ex.key)
    with pytest.raises(BrokerRefusedError):
        client.unwrap(token, blob, hpke.generate_private_key())
    checkpoint = h.audit.inner.checkpoint()
    summary = verify_log(h.audit_dir / "audit.log", h.audit_key.public_key(), checkpoint=checkpoint)
    assert summary is not None
    lines = (h.audit_dir / "audit.log").read_text().splitlines()
    decisions = [(r["event"], r["decision"]) for r in h.audit.records if "decision" in r]
    assert decisions[-3:] == [("attest", "grant"), ("unwrap", "grant"), ("unwrap", "deny")]
    assert sum('"decision"' in line for line in lines) == len(decisions)


# ---- audit checkpoints for owners ------------------------------------------------------------------


def test_owner_fetches_a_signed_checkpoint_that_verifies_the_log(h: Harness, granted: Any) -> None:
    from ray_confidential.kbs.audit import parse_checkpoint, verify_log

    cp = h.client("owner-b").audit_checkpoint()
    parsed = parse_checkpoint(cp, h.audit_key.public_key())
    record = h.audit.last("audit_checkpoint")
    assert record["owner"] == "CN=owner-b" and record["decision"] == "grant"
    assert (
        verify_log(h.audit_dir / "audit.log", h.audit_key.public_key(), checkpoint=cp).last_seq == parsed.seq
    )


def test_checkpoint_without_client_certificate_denied(h: Harness) -> None:
    with pytest.raises(BrokerRefusedError) as exc:
        h.client().audit_checkpoint()
    _denied(h, exc, "PERMISSION_DENIED", "audit_checkpoint", "client certificate")
