"""The shared X.509 path checks: constraints, cache-key rules, time windows (attacks on each)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ray_confidential.attestation.trust import TrustConfig
from ray_confidential.attestation.x509chain import (
    LRUCache,
    WindowCache,
    der,
    der_digest,
    require_aware,
    verify_path,
)
from ray_confidential.errors import AttestationError
from ray_confidential.testing.nitro_fake import NitroTestRoot
from ray_confidential.testing.x509_fake import issue, key_usage

NOW = datetime.now(timezone.utc)
Chain = tuple[x509.Certificate, ...]


@pytest.fixture(scope="module")
def pki() -> NitroTestRoot:
    return NitroTestRoot.generate()


@pytest.fixture(scope="module")
def dev(pki: NitroTestRoot) -> TrustConfig:
    return TrustConfig.development([pki.root_certificate])


def _chain(pki: NitroTestRoot) -> Chain:
    return (pki.leaf_certificate, pki.intermediate_certificate, pki.root_certificate)


def _verify(chain: Chain, trust: TrustConfig, cache: LRUCache[bytes, Chain], now: datetime = NOW) -> None:
    verify_path(chain, trust=trust, now=now, label="t", cache=cache, key=der_digest(der(c) for c in chain))


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool | None,
    path_length: int | None = None,
    critical: bool = True,
) -> x509.Certificate:
    exts: list[tuple[x509.ExtensionType, bool]] = [(key_usage(ca=bool(ca), digital_signature=not ca), True)]
    if ca is not None:
        exts.append((x509.BasicConstraints(ca=ca, path_length=path_length), critical))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return issue(name, key, issuer, issuer_key, not_before=NOW - timedelta(days=1),
                 not_after=NOW + timedelta(days=1), extensions=exts, algorithm=hashes.SHA384())  # fmt: skip


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def test_cache_never_reused_across_leaf_trust_or_time(pki: NitroTestRoot, dev: TrustConfig) -> None:
    cache: LRUCache[bytes, Chain] = LRUCache()
    _verify(_chain(pki), dev, cache)
    assert cache.hits == 0 and cache.misses == 1
    # A leaf signed by another key, under the same (cached) intermediate and root: checked afresh.
    forged = _cert("forged leaf", _key(), pki.intermediate_certificate, _key(), ca=False)
    with pytest.raises(AttestationError, match="not signed by its issuer"):
        _verify((forged, *_chain(pki)[1:]), dev, cache)
    # The cached chain is still held to the allow-list and the clock.
    with pytest.raises(AttestationError, match="not allow-listed"):
        _verify(_chain(pki), TrustConfig.production(), cache)
    with pytest.raises(AttestationError, match="not valid at"):
        _verify(_chain(pki), dev, cache, now=NOW + timedelta(days=30))
    _verify(_chain(pki), dev, cache)
    assert cache.hits == 1


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("intermediate_not_ca", "is not a CA certificate"),
        ("intermediate_ca_not_critical", "is not a CA certificate"),
        ("path_length", "path length constraint 0 exceeded"),
        ("leaf_is_ca", "leaf certificate is a CA"),
        ("leaf_p256", "key is not ECDSA P-384"),
        ("root_not_self_signed", "root certificate is not signed by itself"),
    ],
)
def test_constraints_refused(case: str, match: str) -> None:
    rk, ik, lk = _key(), _key(), ec.generate_private_key(ec.SECP256R1()) if case == "leaf_p256" else _key()
    root = _cert("root", rk, None, _key() if case == "root_not_self_signed" else rk, ca=True)
    inter = _cert(
        "inter",
        ik,
        root,
        rk,
        ca=case != "intermediate_not_ca",
        path_length=0 if case == "path_length" else None,
        critical=case != "intermediate_ca_not_critical",
    )
    chain: Chain = (_cert("leaf", lk, inter, ik, ca=case == "leaf_is_ca"), inter, root)
    if case == "path_length":  # a second CA below one with pathLen 0
        sub_key = _key()
        sub = _cert("sub", sub_key, inter, ik, ca=True)
        chain = (_cert("leaf", lk, sub, sub_key, ca=False), sub, inter, root)
    trust = TrustConfig.development([root])
    with pytest.raises(AttestationError, match=match):
        _verify(chain, trust, LRUCache())


def test_window_cache_reuses_only_inside_the_window() -> None:
    @dataclass(frozen=True)
    class Result:
        valid_from: datetime
        valid_until: datetime

    cache: WindowCache[str, Result] = WindowCache()
    cache.put("k", Result(NOW, NOW + timedelta(hours=1)))
    assert cache.get_at("k", NOW + timedelta(minutes=30)) is not None
    assert cache.get_at("k", NOW + timedelta(hours=2)) is None  # past nextUpdate / validity
    assert cache.get_at("k", NOW - timedelta(seconds=1)) is None  # before issue
    assert (cache.hits, cache.misses) == (1, 2)


def test_lru_cache_is_bounded() -> None:
    cache: LRUCache[int, int] = LRUCache(maxsize=2)
    for i in range(3):
        cache.put(i, i)
    assert cache.get(0) is None and cache.get(2) == 2


def test_require_aware() -> None:
    require_aware(NOW)
    with pytest.raises(ValueError, match="timezone-aware"):
        require_aware(datetime.now())
    with pytest.raises(TypeError, match="timezone-aware"):
        require_aware("2024-01-01", error=TypeError)
