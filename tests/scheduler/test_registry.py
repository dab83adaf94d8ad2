"""Trust registry: only broker-signed, fresh, in-order statements mutate it; it survives restarts."""

from __future__ import annotations

import base64
import json
import pickle
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from scheduler.registry import (
    CONTEXT,
    MAX_ENTRY_LIFETIME,
    RegistryVerifier,
    SignedStatement,
    StatementRejected,
    StatementSigner,
    TrustRegistry,
    canonical_json,
)

NODE_A = "aa" * 28
NODE_B = "bb" * 28
T0 = 1_800_000_000


def _signer(registry_id: str = "cluster-1") -> StatementSigner:
    return StatementSigner(ec.generate_private_key(ec.SECP256R1()), registry_id=registry_id)


def _admit(
    signer: StatementSigner, node: str = NODE_A, now: float = T0, ttl: int = 60, **kw: object
) -> SignedStatement:
    args: dict[str, object] = {
        "tee": "sev-snp",
        "pool": "snp-eu",
        "region": "eu",
        "measurement": "11" * 48,
        "claims": {"env": "dev", "gpu_cc": False},
    }
    args.update(kw)
    return signer.admit(node_id=node, expires_at=now + ttl, now=now, **args)  # type: ignore[arg-type]


@pytest.fixture
def signer() -> StatementSigner:
    return _signer()


def test_admit_revoke_expire(signer: StatementSigner) -> None:
    reg = TrustRegistry(signer.verifier())
    reg.submit(_admit(signer, NODE_A), now=T0)
    reg.submit(_admit(signer, NODE_B, ttl=10), now=T0)
    assert [e.node_id for e in reg.entries(now=T0 + 1)] == [NODE_A, NODE_B]
    e = reg.entries(now=T0 + 1)[0]
    assert (e.tee, e.pool, e.region, e.claims["env"], e.expires_at) == (
        "sev-snp",
        "snp-eu",
        "eu",
        "dev",
        T0 + 60,
    )
    assert [e.node_id for e in reg.entries(now=T0 + 11)] == [NODE_A]  # B expired
    assert reg.prune(now=T0 + 11) == [NODE_B]
    reg.submit(signer.revoke(node_id=NODE_A, reason="measurement revoked", now=T0 + 12), now=T0 + 12)
    assert reg.entries(now=T0 + 13) == ()


def test_dead_nodes_are_dropped(signer: StatementSigner) -> None:
    reg = TrustRegistry(signer.verifier())
    reg.submit(_admit(signer, NODE_A), now=T0)
    reg.submit(_admit(signer, NODE_B), now=T0)
    assert [e.node_id for e in reg.entries(now=T0, alive={NODE_B})] == [NODE_B]
    assert reg.prune(now=T0, alive={NODE_B}) == [NODE_A]
    assert [e.node_id for e in reg.entries(now=T0)] == [NODE_B]


def test_statement_from_another_key_is_refused(signer: StatementSigner) -> None:
    reg = TrustRegistry(signer.verifier())
    with pytest.raises(StatementRejected, match="signature does not verify"):
        reg.submit(_admit(_signer()), now=T0)
    assert reg.entries(now=T0) == ()


def test_unsigned_or_resigned_payload_is_refused(signer: StatementSigner) -> None:
    reg = TrustRegistry(signer.verifier())
    good = _admit(signer)
    body = json.loads(good.payload)
    body["pool"] = "gpu-us"  # an attacker edits the pool of a genuine statement
    forged = SignedStatement(canonical_json(body), good.signature)
    with pytest.raises(StatementRejected, match="signature"):
        reg.submit(forged, now=T0)
    with pytest.raises(StatementRejected, match="signature"):
        reg.submit(SignedStatement(good.payload, b""), now=T0)
    with pytest.raises(StatementRejected, match="expected a SignedStatement"):
        reg.submit("admit me", now=T0)  # type: ignore[arg-type]


def test_non_canonical_payload_is_refused(signer: StatementSigner) -> None:
    """Even correctly signed, a second encoding of the same body is refused (one encoding only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    s = StatementSigner(key, registry_id="cluster-1")
    body = json.loads(_admit(s).payload)
    payload = json.dumps(body, indent=1).encode()
    from cryptography.hazmat.primitives import hashes

    sig = key.sign(CONTEXT + payload, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(StatementRejected, match="not canonical"):
        TrustRegistry(s.verifier()).submit(SignedStatement(payload, sig), now=T0)


def test_other_registry_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    mine = StatementSigner(key, registry_id="cluster-1")
    theirs = StatementSigner(key, registry_id="cluster-2")  # same broker key, another cluster
    with pytest.raises(StatementRejected, match="for registry 'cluster-2'"):
        TrustRegistry(mine.verifier()).submit(_admit(theirs), now=T0)


def test_replay_and_reordering_are_refused(signer: StatementSigner) -> None:
    reg = TrustRegistry(signer.verifier())
    admit = _admit(signer, now=T0)
    revoke = signer.revoke(node_id=NODE_A, reason="compromised", now=T0 + 1)
    reg.submit(admit, now=T0 + 1)
    reg.submit(revoke, now=T0 + 2)
    with pytest.raises(StatementRejected, match="replay"):
        reg.submit(admit, now=T0 + 3)  # the old admit, replayed after the revocation
    assert reg.entries(now=T0 + 3) == ()
    # Reordering: a newer revoke delivered first makes the older admit stale.
    reg2 = TrustRegistry(signer.verifier())
    a2 = _admit(signer, NODE_B, now=T0 + 4)
    r2 = signer.revoke(node_id=NODE_B, reason="x", now=T0 + 5)
    reg2.submit(r2, now=T0 + 5)
    with pytest.raises(StatementRejected, match="replay"):
        reg2.submit(a2, now=T0 + 5)


def test_stale_and_future_statements_are_refused(signer: StatementSigner) -> None:
    reg = TrustRegistry(signer.verifier(max_age=300, leeway=5))
    with pytest.raises(StatementRejected, match="outside"):
        reg.submit(_admit(signer, now=T0 - 301, ttl=300), now=T0)
    with pytest.raises(StatementRejected, match="outside"):
        reg.submit(_admit(signer, now=T0 + 60), now=T0)
    with pytest.raises(StatementRejected, match="already expired"):
        reg.submit(_admit(signer, now=T0 - 100, ttl=50), now=T0)
    with pytest.raises(StatementRejected, match="lifetime"):
        reg.submit(_admit(signer, ttl=MAX_ENTRY_LIFETIME + 1), now=T0)


def test_tombstones_outlive_the_replay_window(signer: StatementSigner) -> None:
    """After a revocation, pruning keeps the node's high-water mark while an old admit could pass."""
    reg = TrustRegistry(signer.verifier(max_age=300, leeway=5))
    admit = _admit(signer, now=T0, ttl=300)
    reg.submit(admit, now=T0)
    reg.submit(signer.revoke(node_id=NODE_A, reason="r", now=T0 + 1), now=T0 + 1)
    reg.prune(now=T0 + 200)
    with pytest.raises(StatementRejected, match="replay"):
        reg.submit(admit, now=T0 + 200)
    reg.prune(now=T0 + 400)  # mark dropped: the admit is now too old for the iat window anyway
    with pytest.raises(StatementRejected, match="outside"):
        reg.submit(admit, now=T0 + 400)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b.update(v=2), "unsupported version"),
        (lambda b: b.update(kind="promote"), "unknown kind"),
        (lambda b: b.update(extra=1), "fields are"),
        (lambda b: b.pop("exp"), "fields are"),
        (lambda b: b.update(node_id="zz"), "not a Ray node id"),
        (lambda b: b.update(tee="sev"), "tee 'sev'"),
        (lambda b: b.update(pool="bad pool"), "not a valid label value"),
        (lambda b: b.update(seq=-1), "seq must be"),
        (lambda b: b.update(seq=True), "seq must be"),
        (lambda b: b.update(claims={"k": [1]}), "claim 'k'"),
        (lambda b: b.update(claims={f"k{i}": 1 for i in range(40)}), "at most 32"),
    ],
)
def test_malformed_bodies_are_refused_even_when_signed(mutate: object, match: str) -> None:
    from cryptography.hazmat.primitives import hashes

    key = ec.generate_private_key(ec.SECP256R1())
    s = StatementSigner(key, registry_id="cluster-1")
    body = json.loads(_admit(s).payload)
    mutate(body)  # type: ignore[operator]
    payload = canonical_json(body)
    sig = key.sign(CONTEXT + payload, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(StatementRejected, match=match):
        TrustRegistry(s.verifier()).submit(SignedStatement(payload, sig), now=T0)


def test_wire_round_trip_and_framing(signer: StatementSigner) -> None:
    st_ = _admit(signer)
    assert SignedStatement.from_bytes(st_.to_bytes()) == st_
    wire = st_.to_bytes()
    for bad in (b"", b"\x02" + wire[1:], wire[:-1], wire + b"\x00", b"\x01" + struct.pack(">I", 1 << 30)):
        with pytest.raises(StatementRejected):
            SignedStatement.from_bytes(bad)
    reg = TrustRegistry(signer.verifier())
    reg.submit(wire, now=T0)  # bytes are accepted too
    assert len(reg.entries(now=T0)) == 1


@given(st.binary(max_size=300))
def test_fuzz_wire_parser_never_crashes(data: bytes) -> None:
    try:
        SignedStatement.from_bytes(data)
    except StatementRejected:
        pass


def test_signer_key_does_not_cross_boundaries(signer: StatementSigner) -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(signer)
    assert "redacted" in repr(signer)
    with pytest.raises(TypeError, match="P-256"):
        StatementSigner(ec.generate_private_key(ec.SECP384R1()), registry_id="c")


def test_seq_grows_across_a_signer_restart() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    a = StatementSigner(key, registry_id="c").revoke(node_id=NODE_A, reason="", now=T0)
    b = StatementSigner(key, registry_id="c").revoke(node_id=NODE_A, reason="", now=T0 + 0.5)
    assert json.loads(b.payload)["seq"] > json.loads(a.payload)["seq"]


def test_survives_restart_and_refuses_a_tampered_file(signer: StatementSigner, tmp_path: Path) -> None:
    path = tmp_path / "reg" / "registry.json"
    reg = TrustRegistry(signer.verifier(), path=path)
    admit_b = _admit(signer, NODE_B)
    reg.submit(_admit(signer, NODE_A), now=T0)
    reg.submit(admit_b, now=T0)
    reg.submit(signer.revoke(node_id=NODE_B, reason="r", now=T0 + 1), now=T0 + 1)
    assert path.stat().st_mode & 0o077 == 0
    again = TrustRegistry(signer.verifier(), path=path)
    assert [e.node_id for e in again.entries(now=T0 + 2)] == [NODE_A]
    # The revocation survived too: B's old admit is still a replay after the restart.
    with pytest.raises(StatementRejected, match="replay"):
        again.submit(admit_b, now=T0 + 2)
    # An attacker with write access adds a node signed by their own key: dropped on load.
    doc = json.loads(path.read_text())
    doc["statements"].append(base64.b64encode(_admit(_signer(), "cc" * 28).to_bytes()).decode())
    path.write_text(json.dumps(doc))
    third = TrustRegistry(signer.verifier(), path=path)
    assert [e.node_id for e in third.entries(now=T0 + 2)] == [NODE_A]
    assert third.rejected_on_load and "signature" in third.rejected_on_load[0]
    # A file for another registry is refused outright.
    other = StatementSigner(ec.generate_private_key(ec.SECP256R1()), registry_id="cluster-9")
    with pytest.raises(StatementRejected, match="for registry 'cluster-1'"):
        TrustRegistry(other.verifier(), path=path)


def test_verifier_from_pem(signer: StatementSigner) -> None:
    v = RegistryVerifier.from_pem(signer.public_pem(), registry_id="cluster-1")
    assert v.fingerprint == signer.verifier().fingerprint
    TrustRegistry(v).submit(_admit(signer), now=T0)
