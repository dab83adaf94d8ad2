"""The verified-token cache of ``TokenVerifier``: a speed-up that must never accept what a full check
would refuse (any changed byte, a token past ``exp``, a token this verifier would refuse)."""

from __future__ import annotations

import base64
import json

import pytest

from ray_confidential.crypto.hpke import generate_private_key
from ray_confidential.errors import KeyReleaseDenied
from ray_confidential.kbs.tokens import TokenClaims, TokenIssuer, new_signing_key

NOW = 1_000_000


def _claims(**kw: object) -> TokenClaims:
    base: dict[str, object] = dict(issuer="kbs", audience="kbs", env="dev", scope="release", now=NOW, ttl=60,
                                   cnf_key=generate_private_key().public_key(), tee="tdx", measurement="aa",
                                   tcb="UpToDate", node_id="n1", pool="p", region="r", bundle_digest="bb",
                                   cluster_id="c", domains=("d",))  # fmt: skip
    base.update(kw)
    return TokenClaims.build(**base)  # type: ignore[arg-type]


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer(signing_key=new_signing_key(), issuer="kbs", audience="kbs", env="dev")


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_second_verification_is_a_cache_hit(issuer: TokenIssuer) -> None:
    v = issuer.verifier()
    token = issuer.sign(_claims())
    assert v.verify(token, now=NOW) == v.verify(token, now=NOW + 1)
    assert (v.misses, v.hits) == (1, 1)


def test_changed_claims_with_the_cached_signature_refused(issuer: TokenIssuer) -> None:
    v = issuer.verifier()
    token = issuer.sign(_claims())
    v.verify(token, now=NOW)  # cached
    header, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["domains"] = ["other-domain"]  # same jti, same signature, other claims
    with pytest.raises(KeyReleaseDenied, match="signature"):
        v.verify(".".join((header, _b64(claims), sig)), now=NOW)


def test_same_jti_signed_by_another_key_refused(issuer: TokenIssuer) -> None:
    v = issuer.verifier()
    claims = _claims()
    v.verify(issuer.sign(claims), now=NOW)  # cached
    rogue = TokenIssuer(signing_key=new_signing_key(), issuer="kbs", audience="kbs", env="dev")
    with pytest.raises(KeyReleaseDenied, match="signature"):
        v.verify(rogue.sign(claims), now=NOW)


def test_cached_token_refused_at_exp_and_dropped(issuer: TokenIssuer) -> None:
    v = issuer.verifier()
    claims = _claims()
    token = issuer.sign(claims)
    v.verify(token, now=NOW)
    with pytest.raises(KeyReleaseDenied, match="expired"):
        v.verify(token, now=claims.exp)
    assert not v._cache  # never served from the cache again
    with pytest.raises(KeyReleaseDenied, match="expired"):
        v.verify(token, now=claims.exp + 9)


def test_cached_token_still_checked_against_iat(issuer: TokenIssuer) -> None:
    v = issuer.verifier()
    token = issuer.sign(_claims())
    v.verify(token, now=NOW)
    with pytest.raises(KeyReleaseDenied, match="future"):
        v.verify(token, now=NOW - 60)


def test_remember_refuses_what_verify_would_refuse(issuer: TokenIssuer) -> None:
    prod = TokenIssuer(signing_key=new_signing_key(), issuer="kbs", audience="kbs", env="prod").verifier()
    claims = _claims()  # env=dev
    with pytest.raises(KeyReleaseDenied, match="env=dev"):
        prod.remember(issuer.sign(claims), claims)
    with pytest.raises(KeyReleaseDenied, match="aud"):
        issuer.verifier().remember("x.y.z", _claims(audience="elsewhere"))
    assert not prod._cache


def test_cache_is_bounded(issuer: TokenIssuer) -> None:
    v = issuer.verifier()
    v._cache_size = 3
    for _ in range(5):
        v.verify(issuer.sign(_claims()), now=NOW)
    assert len(v._cache) == 3
