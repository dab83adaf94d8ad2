"""Owner signatures (docs/kbs.md "Owner signatures") against a real broker on 127.0.0.1: the owner signs
each key version's statement with its mutual-TLS key, the broker verifies, keeps, audits and serves
it, refuses releases without it under ``require_owner_signature``, and clients pinning the owner CA
refuse descriptors whose owner signature does not hold."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ray_confidential.kbs import owner_sig
from ray_confidential.kbs import record as rec_mod
from ray_confidential.kbs.broker import Denied
from ray_confidential.kbs.client import BrokerRefusedError, KBSClient
from ray_confidential.kbs.config import BrokerConfig, ConfigError, build, open_store, public_pem
from ray_confidential.kbs.domains import DomainRecord, store_key
from ray_confidential.kbs.owner_sig import OwnerSignatureError
from ray_confidential.kbs.proto import kbs_pb2
from ray_confidential.kbs.server import KBSServer
from ray_confidential.sealed.format import DomainPublicKey, seal
from tests.kbs.broker_env import PKI, Executor, Harness, pinned_policy, write_production_config

POLICY = pinned_policy("tdx")
UPDATED = pinned_policy("tdx", regions=("eu",))  # still admits the test executor (region "eu")


@pytest.fixture
def h(pki: PKI) -> Iterator[Harness]:
    harness = Harness(pki=pki, require_owner_signature=True, secrets={("hospital", "db-password"): b"s3cret"})
    yield harness
    harness.close()


def _raw(client: KBSClient, name: str = "hospital", version: int = 0) -> Any:
    return client._call("GetDescriptor", kbs_pb2.GetDescriptorRequest(name=name, version=version))


def _fields(client: KBSClient, name: str = "hospital", version: int = 0) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(_raw(client, name, version).descriptor)
    return result


def _sign_raw(client: KBSClient, signature: bytes, name: str = "hospital", version: int = 0) -> Any:
    return client._call("SignDescriptor", kbs_pb2.SignDescriptorRequest(name=name, version=version,
                                                                         signature=signature))  # fmt: skip


def _owner_key(pki: PKI, owner: str) -> ec.EllipticCurvePrivateKey:
    return owner_sig.load_owner_key(pki.owners[owner][1])


def _blob(client: KBSClient, version: int | None = None) -> bytes:
    d = client.descriptor("hospital", version)
    return bytes(
        seal(b"rows", DomainPublicKey(domain="hospital", version=d.version, public_key=d.public_key))
    )


def _denied(h: Harness, exc: pytest.ExceptionInfo[BrokerRefusedError], event: str, reason: str) -> None:
    assert exc.value.code == "PERMISSION_DENIED"
    record = h.audit.last(event)
    assert record["decision"] == "deny", record
    assert reason.lower() in record["reason"].lower(), record["reason"]


# ---- happy path --------------------------------------------------------------------------------


def test_create_signs_and_descriptor_carries_a_valid_owner_signature(h: Harness, pki: PKI) -> None:
    h.client("owner-a").create_domain("hospital", POLICY)
    grant = h.audit.last("sign_descriptor")
    assert (grant["decision"], grant["owner"], grant["domain"], grant["version"]) == (
        "grant", "CN=owner-a", "hospital", 1)  # fmt: skip
    assert grant["policy_hash"] == POLICY.policy_hash()
    public = h.client()  # the executor/driver listener: no client certificate
    resp = _raw(public)
    cert = x509.load_der_x509_certificate(resp.owner_certificate)
    assert cert.subject.rfc4514_string() == "CN=owner-a"
    d = json.loads(resp.descriptor)
    owner_sig.verify_statement(owner_sig.certificate_key(cert), owner_sig.statement_from_descriptor(d),
                               resp.owner_signature)  # fmt: skip
    verified = public.descriptor("hospital", owner_ca=pki.ca_pem)
    assert verified == public.descriptor("hospital")  # the same descriptor, now owner-verified
    # Releases work once signed.
    ex = Executor.create("tdx")
    token = ex.attest(public, domains=("hospital",))
    assert len(public.unwrap(token, _blob(public), ex.key)) == 32
    assert public.release(token, "hospital", "db-password", ex.key) == b"s3cret"


def test_rotate_signs_the_new_version(h: Harness, pki: PKI) -> None:
    owner = h.client("owner-a")
    owner.create_domain("hospital", POLICY)
    assert owner.rotate("hospital").version == 2
    public = h.client()
    assert public.descriptor("hospital", 2, owner_ca=pki.ca_pem).version == 2
    assert public.descriptor("hospital", 1, owner_ca=pki.ca_pem).version == 1
    ex = Executor.create("tdx")
    token = ex.attest(public, domains=("hospital",))
    assert len(public.unwrap(token, _blob(public, 2), ex.key)) == 32


# ---- the broker refuses signatures that are not the owner's over this statement ------------------


def test_owner_b_cannot_sign_owner_a_domain(h: Harness, pki: PKI) -> None:
    h.client("owner-a").create_domain("hospital", POLICY, sign=False)
    b = h.client("owner-b")
    statement = owner_sig.statement_from_descriptor(_fields(b))
    with pytest.raises(BrokerRefusedError) as exc:
        _sign_raw(b, owner_sig.sign_statement(_owner_key(pki, "owner-b"), statement))
    _denied(h, exc, "sign_descriptor", "does not own")
    assert not _raw(h.client()).owner_signature


def test_sign_without_client_certificate_refused(h: Harness, pki: PKI) -> None:
    h.client("owner-a").create_domain("hospital", POLICY, sign=False)
    public = h.client()
    signature = owner_sig.sign_statement(_owner_key(pki, "owner-a"),
                                         owner_sig.statement_from_descriptor(_fields(public)))  # fmt: skip
    with pytest.raises(BrokerRefusedError) as exc:
        _sign_raw(public, signature)  # the right signature, but not over mutual TLS
    _denied(h, exc, "sign_descriptor", "without a client certificate")
    assert not _raw(public).owner_signature


def _another_key(d: dict[str, Any]) -> tuple[dict[str, Any], ec.EllipticCurvePrivateKey | None]:
    return d, ec.generate_private_key(ec.SECP256R1())


def _another_policy(d: dict[str, Any]) -> tuple[dict[str, Any], None]:
    return {**d, "policy_hash": UPDATED.policy_hash()}, None


def _another_appraisal(d: dict[str, Any]) -> tuple[dict[str, Any], None]:
    return {**d, "appraisal_hash": "00" * 32}, None


def _another_public_key(d: dict[str, Any]) -> tuple[dict[str, Any], None]:
    return {**d, "public_key": "11" * 32}, None


def _pickle_on(d: dict[str, Any]) -> tuple[dict[str, Any], None]:
    return {**d, "allow_pickle": True}, None


def _another_recipient(d: dict[str, Any]) -> tuple[dict[str, Any], None]:
    return {**d, "recipients": ["x25519:" + "22" * 32]}, None


def _another_version(d: dict[str, Any]) -> tuple[dict[str, Any], None]:
    return {**d, "version": 2}, None


@pytest.mark.parametrize(
    "forge",
    [_another_key, _another_policy, _another_appraisal, _another_public_key, _pickle_on, _another_recipient,
     _another_version],
)  # fmt: skip
def test_signature_over_another_statement_or_by_another_key_refused(
    h: Harness, pki: PKI, forge: Callable[[dict[str, Any]], tuple[dict[str, Any], Any]]
) -> None:
    owner = h.client("owner-a")
    owner.create_domain("hospital", POLICY, sign=False)
    owner.rotate("hospital", sign=False)  # version 2 exists, unsigned
    d, key = forge(_fields(owner, version=1))
    signature = owner_sig.sign_statement(
        key or _owner_key(pki, "owner-a"), owner_sig.statement_from_descriptor(d)
    )
    with pytest.raises(BrokerRefusedError) as exc:
        _sign_raw(owner, signature, version=1)
    _denied(h, exc, "sign_descriptor", "does not verify")
    assert not _raw(owner, version=1).owner_signature and not _raw(owner, version=2).owner_signature


def test_signature_of_version_1_replayed_for_version_2_refused(h: Harness, pki: PKI) -> None:
    owner = h.client("owner-a")
    owner.create_domain("hospital", POLICY)
    v1_signature = bytes(_raw(owner, version=1).owner_signature)
    owner.rotate("hospital", sign=False)
    with pytest.raises(BrokerRefusedError) as exc:
        _sign_raw(owner, v1_signature, version=2)
    _denied(h, exc, "sign_descriptor", "does not verify")
    # The policy is signed (version 1): tokens are issued, but only the signed version unwraps.
    public, ex = h.client(), Executor.create("tdx")
    token = ex.attest(public, domains=("hospital",))
    assert len(public.unwrap(token, _blob(public, 1), ex.key)) == 32
    with pytest.raises(BrokerRefusedError) as exc:
        public.unwrap(token, _blob(public, 2), ex.key)
    _denied(h, exc, "unwrap", "key version 2 has no owner signature")


@pytest.mark.parametrize("garbage", [b"", b"\x30\x00", b"\x00" * 73])
def test_malformed_signature_refused(h: Harness, garbage: bytes) -> None:
    owner = h.client("owner-a")
    owner.create_domain("hospital", POLICY, sign=False)
    with pytest.raises(BrokerRefusedError) as exc:
        _sign_raw(owner, garbage)
    _denied(h, exc, "sign_descriptor", "owner signature")


# ---- enforcement -------------------------------------------------------------------------------


def test_unsigned_domain_serves_no_token_unwrap_or_release(h: Harness, pki: PKI) -> None:
    owner = h.client("owner-a")
    owner.create_domain("hospital", POLICY, sign=False)
    public, ex = h.client(), Executor.create("tdx")
    with pytest.raises(BrokerRefusedError) as exc:
        ex.attest(public, domains=("hospital",))
    _denied(h, exc, "attest", "no live key version has an owner signature over its current policy")
    owner.sign_descriptor("hospital", policy=POLICY)
    token = ex.attest(public, domains=("hospital",))
    assert len(public.unwrap(token, _blob(public), ex.key)) == 32


def test_update_policy_voids_the_signature_until_the_owner_signs_again(h: Harness, pki: PKI) -> None:
    owner, public, ex = h.client("owner-a"), h.client(), Executor.create("tdx")
    owner.create_domain("hospital", POLICY)
    blob = _blob(public)
    token = ex.attest(public, domains=("hospital",))
    assert len(public.unwrap(token, blob, ex.key)) == 32
    old_signature = bytes(_raw(public).owner_signature)

    owner.update_policy("hospital", UPDATED, sign=False)
    # The old signature is no longer served, nor accepted by a verifying client.
    assert not _raw(public).owner_signature and not _raw(public).owner_certificate
    with pytest.raises(OwnerSignatureError, match="carries no owner signature"):
        public.descriptor("hospital", owner_ca=pki.ca_pem)
    # A live token no longer unwraps or releases, and no new token is issued.
    with pytest.raises(BrokerRefusedError) as exc:
        public.unwrap(token, blob, ex.key)
    _denied(h, exc, "unwrap", "key version 1 has no owner signature")
    with pytest.raises(BrokerRefusedError) as exc:
        public.release(token, "hospital", "db-password", ex.key)
    _denied(h, exc, "release", "no live key version has an owner signature")
    with pytest.raises(BrokerRefusedError) as exc:
        ex.attest(public, domains=("hospital",))
    _denied(h, exc, "attest", "no live key version has an owner signature")
    # Presenting the signature over the old policy again is refused.
    with pytest.raises(BrokerRefusedError) as exc:
        _sign_raw(owner, old_signature)
    _denied(h, exc, "sign_descriptor", "does not verify")

    owner.sign_descriptor("hospital", policy=UPDATED)
    assert public.descriptor("hospital", owner_ca=pki.ca_pem).policy_hash == UPDATED.policy_hash()
    assert len(public.unwrap(token, blob, ex.key)) == 32


def test_update_policy_with_the_owner_key_re_signs_every_live_version(h: Harness, pki: PKI) -> None:
    owner, public = h.client("owner-a"), h.client()
    owner.create_domain("hospital", POLICY)
    owner.rotate("hospital")
    owner.rotate("hospital")
    owner.retire("hospital", 2)
    owner.update_policy("hospital", UPDATED)
    for version in (1, 3):
        assert (
            public.descriptor("hospital", version, owner_ca=pki.ca_pem).policy_hash == UPDATED.policy_hash()
        )
    assert not _raw(public, version=2).owner_signature  # retired: never signed again


def test_owner_client_refuses_to_sign_a_policy_it_did_not_send(h: Harness) -> None:
    owner = h.client("owner-a")
    owner.create_domain("hospital", POLICY, sign=False)
    with pytest.raises(Exception, match="another policy than the one sent"):
        owner.sign_descriptor("hospital", policy=UPDATED)
    assert not _raw(owner).owner_signature


def test_without_require_owner_signature_unsigned_domains_serve(pki: PKI) -> None:
    h = Harness(pki=pki)  # the development default: off
    try:
        h.client("owner-a").create_domain("hospital", POLICY, sign=False)
        public, ex = h.client(), Executor.create("tdx")
        token = ex.attest(public, domains=("hospital",))
        assert len(public.unwrap(token, _blob(public), ex.key)) == 32
    finally:
        h.close()


def test_development_broker_has_no_certificate_to_sign_with(pki: PKI) -> None:
    config = BrokerConfig.development()
    assert config.settings.require_owner_signature is False
    h = Harness(pki=pki)
    try:
        h.client("owner-a").create_domain("hospital", POLICY, sign=False)
        with pytest.raises(Denied, match="client certificate"):
            h.broker.sign_descriptor("CN=owner-a", "hospital", 1, b"\x30\x00", None)
    finally:
        h.close()


# ---- client-side verification against the pinned owner CA -------------------------------------


def _serve(client: KBSClient, monkeypatch: pytest.MonkeyPatch, rewrite: Callable[[Any], Any]) -> None:
    """A broker (holding the release key) that rewrites GetDescriptor answers."""
    call = client._call

    def rogue(method: str, request: Any) -> Any:
        resp = call(method, request)
        return rewrite(resp) if method == "GetDescriptor" else resp

    monkeypatch.setattr(client, "_call", rogue)


def test_client_refuses_a_signature_that_does_not_verify(
    h: Harness, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.client("owner-a").create_domain("hospital", POLICY)
    public = h.client()

    def flip(resp: Any) -> Any:
        sig = bytearray(resp.owner_signature)
        sig[-1] ^= 1
        return kbs_pb2.DescriptorResponse(descriptor=resp.descriptor, signature=resp.signature,
                                          owner_signature=bytes(sig), owner_certificate=resp.owner_certificate)  # fmt: skip

    _serve(public, monkeypatch, flip)
    with pytest.raises(OwnerSignatureError, match="does not verify"):
        public.descriptor("hospital", owner_ca=pki.ca_pem)


@pytest.mark.parametrize(
    ("field", "value"),
    [("public_key", "33" * 32), ("policy_hash", "44" * 32), ("allow_pickle", True), ("recipients", ["x25519:" + "55" * 32])],
)  # fmt: skip
def test_client_refuses_a_descriptor_the_broker_changed_under_the_owner_signature(
    h: Harness, pki: PKI, monkeypatch: pytest.MonkeyPatch, field: str, value: Any
) -> None:
    """A broker holding the release key substitutes its own key (or loosens the policy) and re-signs
    the descriptor: the owner's signature no longer covers it."""
    h.client("owner-a").create_domain("hospital", POLICY)
    public = h.client()

    def substitute(resp: Any) -> Any:
        d = json.loads(resp.descriptor)
        d[field] = value
        body = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return kbs_pb2.DescriptorResponse(descriptor=body, signature=rec_mod.sign(h.release_key, body),
                                          owner_signature=resp.owner_signature,
                                          owner_certificate=resp.owner_certificate)  # fmt: skip

    _serve(public, monkeypatch, substitute)
    public.descriptor("hospital")  # the release key alone vouches for it
    with pytest.raises(OwnerSignatureError, match="does not verify"):
        public.descriptor("hospital", owner_ca=pki.ca_pem)


def _signed_by(pki: PKI, owner: str) -> Callable[[Any], Any]:
    """Answers with a valid signature over the served statement, by ``owner`` of ``pki``."""
    cert = x509.load_pem_x509_certificate(pki.owners[owner][0]).public_bytes(serialization.Encoding.DER)

    def rewrite(resp: Any) -> Any:
        statement = owner_sig.statement_from_descriptor(json.loads(resp.descriptor))
        return kbs_pb2.DescriptorResponse(descriptor=resp.descriptor, signature=resp.signature,
                                          owner_signature=owner_sig.sign_statement(_owner_key(pki, owner), statement),
                                          owner_certificate=cert)  # fmt: skip

    return rewrite


def test_client_refuses_an_owner_certificate_from_another_ca(
    h: Harness, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.client("owner-a").create_domain("hospital", POLICY)
    public = h.client()
    _serve(public, monkeypatch, _signed_by(PKI.create(), "owner-a"))  # same subject, another CA
    with pytest.raises(OwnerSignatureError, match="does not chain to the pinned owner CA"):
        public.descriptor("hospital", owner_ca=pki.ca_pem)


def test_client_refuses_a_certificate_that_does_not_name_the_owner(
    h: Harness, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.client("owner-a").create_domain("hospital", POLICY)
    public = h.client()
    _serve(public, monkeypatch, _signed_by(pki, "owner-b"))  # right CA, valid signature, another owner
    with pytest.raises(OwnerSignatureError, match="the descriptor's owner is 'CN=owner-a'"):
        public.descriptor("hospital", owner_ca=pki.ca_pem)


def test_client_refuses_a_descriptor_without_owner_signature_only_when_asked(h: Harness, pki: PKI) -> None:
    h.client("owner-a").create_domain("hospital", POLICY, sign=False)
    public = h.client()
    assert public.descriptor("hospital").version == 1  # default behaviour unchanged
    with pytest.raises(OwnerSignatureError, match="carries no owner signature"):
        public.descriptor("hospital", owner_ca=pki.ca_pem)


# ---- key types ---------------------------------------------------------------------------------


def _pem(key: Any) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))  # fmt: skip


@pytest.mark.parametrize(
    ("key", "named"),
    [(ec.generate_private_key(ec.SECP384R1()), "ECDSA secp384r1"),
     (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSAPrivateKey"),
     (ed25519.Ed25519PrivateKey.generate(), "Ed25519PrivateKey")],
)  # fmt: skip
def test_owner_keys_other_than_p256_refused_clearly(pki: PKI, key: Any, named: str) -> None:
    with pytest.raises(OwnerSignatureError, match=f"must be an ECDSA P-256 key.*{named}"):
        owner_sig.load_owner_key(_pem(key))
    with pytest.raises(OwnerSignatureError, match="ECDSA P-256"):
        owner_sig.verify_statement(key.public_key(), b"{}", b"\x30\x00")
    with pytest.raises(ValueError, match=r"client_key / client_cert: .*ECDSA P-256"):
        KBSClient("127.0.0.1:1", release_public_key=public_pem(_owner_key(pki, "owner-a")), ca_cert=pki.ca_pem,
                  client_cert=pki.owners["owner-a"][0], client_key=_pem(key))  # fmt: skip


def test_client_key_must_match_client_certificate(pki: PKI) -> None:
    with pytest.raises(ValueError, match="not the key of client_cert"):
        KBSClient("127.0.0.1:1", release_public_key=public_pem(_owner_key(pki, "owner-a")), ca_cert=pki.ca_pem,
                  client_cert=pki.owners["owner-a"][0], client_key=pki.owners["owner-b"][1])  # fmt: skip


def test_statement_from_descriptor_needs_every_field() -> None:
    d = {"name": "d", "owner": "CN=a", "version": 1, "suite": "x25519", "public_key": "01" * 32,
         "policy_hash": "ab" * 32, "appraisal_hash": "cd" * 32, "allow_pickle": False, "seal_arguments": False,
         "recipients": []}  # fmt: skip
    statement = owner_sig.statement_from_descriptor(d)
    assert json.loads(statement)["context"] == owner_sig.STATEMENT_CONTEXT
    assert b" " not in statement
    for missing in d:
        with pytest.raises(OwnerSignatureError, match="lacks an owner statement field"):
            owner_sig.statement_from_descriptor({k: v for k, v in d.items() if k != missing})
    with pytest.raises(OwnerSignatureError):
        owner_sig.statement_from_descriptor({**d, "allow_pickle": "yes"})


# ---- configuration and persistence -------------------------------------------------------------


def test_production_config_requires_owner_signatures_by_default(tmp_path: Path, pki: PKI) -> None:
    path = write_production_config(tmp_path, pki)
    assert BrokerConfig.from_yaml(path).settings.require_owner_signature is True
    with pytest.warns(UserWarning, match="require_owner_signature: false"):
        config = BrokerConfig.from_yaml(write_production_config(tmp_path, pki, require_owner_signature=False))
    assert config.settings.require_owner_signature is False
    with pytest.raises(ConfigError, match="require_owner_signature must be true or false"):
        BrokerConfig.from_yaml(write_production_config(tmp_path, pki, require_owner_signature="no"))


def test_owner_signature_survives_restart_and_a_store_edit_voids_it(tmp_path: Path, pki: PKI) -> None:
    config = BrokerConfig.from_yaml(write_production_config(tmp_path, pki))
    pem = public_pem(config.release_key)
    policy = config.domains[0].policy  # "hospital", created unsigned at start (owner CN=owner-a)

    def clients(server: KBSServer) -> tuple[KBSClient, KBSClient]:
        cert, key = pki.owners["owner-a"]
        return (KBSClient(f"127.0.0.1:{server.owner_port}", release_public_key=pem, ca_cert=pki.ca_pem,
                          client_cert=cert, client_key=key, retries=0),
                KBSClient(f"127.0.0.1:{server.port}", release_public_key=pem, ca_cert=pki.ca_pem, retries=0))  # fmt: skip

    def run(check: Callable[[KBSClient, KBSClient, Any], None], config: BrokerConfig = config) -> None:
        server, broker = build(config)
        server.start()
        owner, public = clients(server)
        try:
            check(owner, public, broker)
        finally:
            owner.close()
            public.close()
            server.stop(0)
            broker.close()

    def sign(owner: KBSClient, public: KBSClient, broker: Any) -> None:
        with pytest.raises(OwnerSignatureError):
            public.descriptor("hospital", owner_ca=pki.ca_pem)
        assert not broker.domains.signed(broker.domains.get("hospital"), 1)
        owner.sign_descriptor("hospital", policy=policy)
        public.descriptor("hospital", owner_ca=pki.ca_pem)

    def still_signed(owner: KBSClient, public: KBSClient, broker: Any) -> None:
        assert broker.domains.signed(broker.domains.get("hospital"), 1)
        assert public.descriptor("hospital", owner_ca=pki.ca_pem).version == 1

    run(sign)
    run(still_signed)  # restart: same encrypted file store and master key

    # Someone with the store's master key loosens the policy but keeps the owner's signature.
    store = open_store(config.store)
    rec = DomainRecord.from_json(store.get(store_key("hospital")) or b"")
    assert rec.owner_signatures
    loosened = json.loads(rec.to_json())
    loosened["policy"]["regions"] = ["anywhere"]
    store.put(store_key("hospital"), json.dumps(loosened).encode())
    store.close()  # type: ignore[attr-defined]

    def voided(owner: KBSClient, public: KBSClient, broker: Any) -> None:
        assert not broker.domains.signed(broker.domains.get("hospital"), 1)
        assert not _raw(public).owner_signature

    run(voided, dataclasses.replace(config, domains=()))  # (the configured policy would now conflict)


def test_registry_refuses_a_certificate_of_another_subject_than_the_owner(pki: PKI) -> None:
    """Defence in depth below the wire (where the owner is the certificate's subject): a valid signature
    by owner B's certificate is not owner A's signature."""
    from ray_confidential.kbs.domains import DomainError, DomainRegistry
    from ray_confidential.kbs.store import MemoryStore

    reg = DomainRegistry(MemoryStore())
    rec = reg.create(
        owner="CN=owner-a", name="hospital", policy=POLICY, appraisal=None, suite="x25519", now=0
    )
    v = rec.versions[0]
    statement = rec.owner_statement(1, reg.public_key(rec, v))
    cert_b = x509.load_pem_x509_certificate(pki.owners["owner-b"][0]).public_bytes(serialization.Encoding.DER)
    with pytest.raises(DomainError, match="is not the owner 'CN=owner-a'"):
        reg.sign(owner="CN=owner-a", name="hospital", version=1, certificate=cert_b,
                 signature=owner_sig.sign_statement(_owner_key(pki, "owner-b"), statement))  # fmt: skip
    assert not reg.signed(reg.get("hospital"), 1)  # type: ignore[arg-type]


# ---- drivers and executors that pin the owner CA ------------------------------------------------


def test_a_driver_pinning_the_owner_ca_seals_only_to_owner_signed_keys(
    h: Harness, pki: PKI, tmp_path: Path
) -> None:
    """``owner_ca:`` in kbs-client.yaml (rc.init row 4): the driver's directory refuses a domain whose
    owner has not signed what the broker serves, and serves it once the owner signed."""
    from ray_confidential.kbs.directory import BrokerDirectory

    owner = h.client("owner-a")
    owner.create_domain("hospital", POLICY, sign=False)
    (tmp_path / "ca.pem").write_bytes(pki.ca_pem)
    (tmp_path / "release.pem").write_bytes(h.release_pem)
    base = f"target: {h.target}\nca_cert: {tmp_path / 'ca.pem'}\nrelease_public_key: {tmp_path / 'release.pem'}\n"
    (tmp_path / "plain.yaml").write_text(base)
    (tmp_path / "pinned.yaml").write_text(base + f"owner_ca: {tmp_path / 'ca.pem'}\n")
    assert BrokerDirectory.from_file(tmp_path / "plain.yaml").descriptor("hospital").version == 1
    pinned = BrokerDirectory.from_file(tmp_path / "pinned.yaml")
    with pytest.raises(OwnerSignatureError, match="carries no owner signature"):
        pinned.descriptor("hospital")  # not "unknown domain": the domain exists, unsigned
    owner.sign_descriptor("hospital", 1, policy=POLICY)
    assert pinned.descriptor("hospital").version == 1
    with pytest.raises(ValueError, match="unknown domain 'nope'"):
        pinned.descriptor("nope")


def test_an_executor_pinning_the_owner_ca_uses_only_owner_signed_domains(h: Harness, pki: PKI) -> None:
    """``owner_ca`` in the executor's launch data: its releaser refuses an unsigned domain (so the
    call is refused, ``denied``) and accepts it once signed."""
    from enclave_actors.keys import KBSKeyReleaser, NodeFacts

    owner = h.client("owner-a")
    owner.create_domain("hospital", POLICY, sign=False)

    def evidence(binding: Any) -> Any:
        raise AssertionError("domain lookups need no evidence")

    facts = NodeFacts(tee="tdx", node_id="n" * 56, cluster_id="dev")
    pinned = KBSKeyReleaser(lambda: h.client(), facts=facts, evidence=evidence, owner_ca=pki.ca_pem)
    plain = KBSKeyReleaser(lambda: h.client(), facts=facts, evidence=evidence)
    try:
        assert plain.domain("hospital").descriptor.version == 1
        with pytest.raises(OwnerSignatureError):
            pinned.domain("hospital")
        owner.sign_descriptor("hospital", 1, policy=POLICY)
        assert pinned.domain("hospital").descriptor.version == 1
    finally:
        pinned.close()
        plain.close()


def test_launch_data_carries_the_owner_ca(tmp_path: Path, pki: PKI) -> None:
    import os

    from enclave_actors.keys import LaunchData

    path = tmp_path / "launch.json"
    path.write_text(
        json.dumps({"target": "127.0.0.1:1", "release_public_key": "PEM", "owner_ca": pki.ca_pem.decode()})
    )
    os.chmod(path, 0o600)
    assert LaunchData.from_file(path).owner_ca == pki.ca_pem
    path.write_text(json.dumps({"target": "127.0.0.1:1", "release_public_key": "PEM"}))
    assert LaunchData.from_file(path).owner_ca is None
