"""The broker side of the registry: routing tokens -> signed admits, revocations -> signed revokes."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from scheduler.registry import SignedStatement, StatementSigner, TrustRegistry
from scheduler.statements import UNSET_LABEL, StatementIssuer

NODE_A, NODE_B = "aa" * 28, "bb" * 28


@dataclass
class Claims:
    node_id: str
    tee: str = "sev-snp"
    pool: str = "snp-eu"
    region: str = "eu"
    measurement: str = "11" * 48
    tcb: str = "snp:1"
    env: str = "dev"
    iat: int = 1000
    exp: int = 1300


def _setup() -> tuple[StatementIssuer, TrustRegistry, list[SignedStatement], list[float]]:
    now = [1000.0]
    signer = StatementSigner(ec.generate_private_key(ec.SECP256R1()), registry_id="c1", clock=lambda: now[0])
    out: list[SignedStatement] = []
    registry = TrustRegistry(signer.verifier(), clock=lambda: now[0])
    return StatementIssuer(signer, out.append), registry, out, now


def test_admit_follows_the_routing_token_and_expires_with_it() -> None:
    issuer, registry, out, now = _setup()
    issuer.routing_granted(Claims(NODE_A, pool="(none)"))
    registry.submit(out[-1])
    (entry,) = registry.entries()
    assert entry.expires_at == 1300 and entry.pool == UNSET_LABEL and entry.claims["env"] == "dev"
    now[0] = 1300.0
    assert registry.entries() == ()  # expiry follows the routing token


def test_revocations_cover_routed_nodes() -> None:
    issuer, registry, out, _now = _setup()
    issuer.routing_granted(Claims(NODE_A))
    issuer.routing_granted(Claims(NODE_B, measurement="22" * 48))
    for st in out:
        registry.submit(st)
    issuer.revoked("measurement", "22" * 48, "bad build")
    registry.submit(out[-1])
    assert [e.node_id for e in registry.entries()] == [NODE_A]
    issuer.revoked("node", NODE_A, "")
    registry.submit(out[-1])
    assert registry.entries() == ()
    n = len(out)
    issuer.revoked("bundle", "00" * 32, "")  # says nothing about routing
    assert len(out) == n


def test_non_ray_node_ids_get_no_statement() -> None:
    issuer, _registry, out, _now = _setup()
    issuer.routing_granted(Claims("not-a-node"))
    issuer.routing_granted(Claims(NODE_A, tee="tpm"))
    assert out == []


def test_a_forged_admit_is_refused_by_the_registry() -> None:
    _issuer, registry, _out, _now = _setup()
    other = StatementSigner(ec.generate_private_key(ec.SECP256R1()), registry_id="c1", clock=lambda: 1000.0)
    st = other.admit(node_id=NODE_A, tee="sev-snp", pool="p", region="r", measurement="", claims={},
                     expires_at=1200)  # fmt: skip
    import pytest

    from scheduler.registry import StatementRejected

    with pytest.raises(StatementRejected):
        registry.submit(st)
