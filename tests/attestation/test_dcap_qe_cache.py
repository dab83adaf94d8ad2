"""The QE report signature cache of ``dcap.verify``: keyed by the exact PCK leaf, report and signature,
so a cached success never vouches for another leaf or a changed byte."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import pytest

from ray_confidential.attestation.dcap import verify
from ray_confidential.attestation.dcap.abi import Quote
from ray_confidential.attestation.dcap.verify import verify_quote
from ray_confidential.attestation.trust import TrustConfig
from ray_confidential.errors import AttestationError
from ray_confidential.testing.dcap_fake import DCAPTestRoot, build_evidence


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    verify.clear_caches()


@pytest.fixture(scope="module")
def roots() -> tuple[DCAPTestRoot, DCAPTestRoot]:
    return DCAPTestRoot.generate(), DCAPTestRoot.generate()


def test_repeated_qe_report_is_a_cache_hit(roots: tuple[DCAPTestRoot, DCAPTestRoot]) -> None:
    """A platform's QE report and its PCK signature repeat in every quote (they certify the
    attestation key, not the workload)."""
    root = roots[0]
    trust, now = TrustConfig.development([root.root_certificate]), datetime.now(timezone.utc)
    quote = build_evidence(root, tee="tdx", report_data=bytes(64)).evidence
    for _ in range(3):
        verify_quote(quote, trust=trust, now=now)
    assert verify.cache_stats()["qe_report"] == (2, 1)


def test_changed_qe_report_signature_fails_after_a_cached_success(
    roots: tuple[DCAPTestRoot, DCAPTestRoot],
) -> None:
    root = roots[0]
    trust, now = TrustConfig.development([root.root_certificate]), datetime.now(timezone.utc)
    verify_quote(build_evidence(root, tee="tdx", report_data=bytes(64)).evidence, trust=trust, now=now)
    bad = build_evidence(root, tee="tdx", report_data=bytes(64), bad_qe_report_signature=True)
    with pytest.raises(AttestationError, match="QE report: signature does not verify"):
        verify_quote(bad.evidence, trust=trust, now=now)


def test_cached_qe_report_does_not_vouch_for_another_pck_leaf(
    roots: tuple[DCAPTestRoot, DCAPTestRoot],
) -> None:
    """Quote B carries quote A's QE report and signature (cached as good under A's leaf) with B's leaf."""
    a, b = roots
    trust = TrustConfig.development([a.root_certificate, b.root_certificate])
    now = datetime.now(timezone.utc)
    qa = Quote.from_bytes(build_evidence(a, tee="tdx", report_data=bytes(64)).evidence)
    verify_quote(qa, trust=trust, now=now)
    qb = Quote.from_bytes(build_evidence(b, tee="tdx", report_data=bytes(64)).evidence)
    qe = replace(qb.signature_data.qe, qe_report=qa.signature_data.qe.qe_report,
                 qe_report_signature=qa.signature_data.qe.qe_report_signature)  # fmt: skip
    spliced = replace(qb, signature_data=replace(qb.signature_data, qe=qe))
    with pytest.raises(AttestationError, match="QE report: signature does not verify"):
        verify_quote(spliced.to_bytes(), trust=trust, now=now)
