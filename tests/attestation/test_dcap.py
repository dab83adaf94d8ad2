"""Shared Intel DCAP machinery: parsing, PCK chain, QE binding, collateral, TCB evaluation, caches.

Genuine samples come from ../shared/vectors (tdx/*, sgx-dcap/*); dcap-qvl is the independent oracle
for TCB status and advisory IDs (differential tests).
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_confidential.attestation.dcap import abi, verify
from ray_confidential.attestation.dcap.abi import Quote
from ray_confidential.attestation.dcap.collateral import QuoteCollateralV3, TcbInfo
from ray_confidential.attestation.dcap.pck import encode_sgx_extension, parse_sgx_extension, pck_extension
from ray_confidential.attestation.dcap.verify import verify_collateral, verify_quote
from ray_confidential.attestation.trust import VENDOR_ROOT_FINGERPRINTS, TrustConfig
from ray_confidential.errors import AttestationError, EvidenceFormatError
from ray_confidential.testing.dcap_fake import DCAPTestRoot, build_collateral, build_evidence

dcap_qvl = pytest.importorskip("dcap_qvl")

PROD = TrustConfig.production()
INTEL_ROOT = VENDOR_ROOT_FINGERPRINTS["intel-sgx-root-ca"]


def T(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


# (quote path, collateral path or None, time inside every window, expected status or error)
SAMPLES = {
    "tdx_quote": ("tdx/dcap-qvl/tdx_quote", "tdx/dcap-qvl/tdx_quote_collateral.json", "2025-06-19T11:00:00Z"),
    "tdx_quote_outdated": (
        "tdx/dcap-qvl/tdx_quote_outdated",
        "tdx/dcap-qvl/tdx_quote_outdated_collateral.json",
        "2026-02-18T12:00:00Z",
    ),
    "sgx_quote": (
        "sgx-dcap/dcap-qvl/sgx_quote",
        "sgx-dcap/dcap-qvl/sgx_quote_collateral.json",
        "2025-06-19T11:00:00Z",
    ),
    "spr_e4": (
        "tdx/go-tdx-guest/tdx_prod_quote_SPR_E4.dat",
        "tdx/go-tdx-guest/collateral_SPR_E4.assembled.json",
        "2023-07-01T01:00:00Z",
    ),
    "v5_sample": ("tdx/go-tdx-guest/quote_v5_sample.dat", None, "2026-02-03T01:00:00Z"),
    "cos_113": ("tdx/go-tdx-guest/cos-113-tdx-quote.dat", None, "2024-08-01T00:00:00Z"),
    "tappd_hex": ("tdx/dcap-qvl/quote-from-tappd.hex", None, "2025-01-01T00:00:00Z"),
    "tdx_quote_hex": ("tdx/dcap-qvl/tdx-quote.hex", None, "2025-01-01T00:00:00Z"),
}
EXPECTED = {
    "tdx_quote": ("UpToDate", ()),
    "sgx_quote": ("ConfigurationAndSWHardeningNeeded", ("INTEL-SA-00289", "INTEL-SA-00615")),
    "tdx_quote_outdated": "no matching TCB level",
    "spr_e4": "no matching TCB level",
}


def load_quote(vectors: Path, rel: str) -> bytes:
    data = (vectors / rel).read_bytes()
    return bytes.fromhex(data.decode().strip()) if rel.endswith(".hex") else data


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    verify.clear_caches()


@pytest.fixture(scope="module")
def root() -> DCAPTestRoot:
    return DCAPTestRoot.generate()


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_dcap_genuine_sample_parses_and_round_trips(vectors: Path, name: str) -> None:
    raw = load_quote(vectors, SAMPLES[name][0])
    q = Quote.from_bytes(raw)
    assert q.to_bytes() == raw
    assert Quote.from_bytes(q.to_bytes()) == q
    assert q.header.qe_vendor_id == abi.INTEL_QE_VENDOR_ID


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_dcap_genuine_sample_verifies_without_collateral(vectors: Path, name: str) -> None:
    rel, _, when = SAMPLES[name]
    r = verify_quote(load_quote(vectors, rel), trust=PROD, now=T(when))
    assert r.root_fingerprint == INTEL_ROOT
    assert r.tcb_status == "unknown" and r.advisories == ()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dcap_genuine_sample_tcb_status_with_collateral(vectors: Path, name: str) -> None:
    rel, col, when = SAMPLES[name]
    assert col is not None
    quote, collateral = load_quote(vectors, rel), (vectors / col).read_bytes()
    want = EXPECTED[name]
    if isinstance(want, str):
        with pytest.raises(AttestationError, match=want):
            verify_quote(quote, trust=PROD, collateral=collateral, now=T(when))
    else:
        r = verify_quote(quote, trust=PROD, collateral=collateral, now=T(when))
        assert (r.tcb_status, r.advisories) == want
        assert r.qe_tcb_status == "UpToDate"


def _oracle(
    quote: bytes, collateral: bytes, now: datetime, root_der: bytes | None = None
) -> tuple[str, tuple[str, ...]]:
    col = dcap_qvl.QuoteCollateralV3.from_json(collateral.decode())
    try:
        if root_der is None:
            rep = dcap_qvl.verify(quote, col, int(now.timestamp()))
        else:
            rep = dcap_qvl.verify_with_root_ca(quote, col, root_der, int(now.timestamp()))
    except ValueError as e:
        return ("error:" + ("no matching TCB level" if "No matching TCB level" in str(e) else str(e)), ())
    return rep.status, tuple(rep.advisory_ids)


def _ours(quote: bytes, collateral: bytes, now: datetime, trust: TrustConfig) -> tuple[str, tuple[str, ...]]:
    try:
        r = verify_quote(quote, trust=trust, collateral=collateral, now=now)
    except AttestationError as e:
        return ("error:" + ("no matching TCB level" if "no matching TCB level" in str(e) else str(e)), ())
    return r.tcb_status, r.advisories


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dcap_differential_against_dcap_qvl_genuine(vectors: Path, name: str) -> None:
    rel, col, when = SAMPLES[name]
    assert col is not None
    quote, collateral = load_quote(vectors, rel), (vectors / col).read_bytes()
    assert _ours(quote, collateral, T(when), PROD) == _oracle(quote, collateral, T(when))


@pytest.mark.parametrize(
    ("tee", "hooks"),
    [
        ("tdx", {}),
        ("tdx", {"quote_version": 5}),
        ("sgx", {}),
        ("sgx", {"tcb_status": "SWHardeningNeeded", "advisories": ["INTEL-SA-00615"]}),
        ("tdx", {"tcb_status": "OutOfDate", "advisories": ["INTEL-SA-00837", "INTEL-SA-00615"]}),
        ("sgx", {"tcb_status": "ConfigurationAndSWHardeningNeeded", "advisories": ["INTEL-SA-00289"]}),
        ("tdx", {"no_matching_tcb": True}),
    ],
)
def test_dcap_differential_against_dcap_qvl_simulated(
    root: DCAPTestRoot, tee: str, hooks: dict[str, object]
) -> None:
    now = datetime.now(timezone.utc)
    ev = build_evidence(root, tee=tee, report_data=bytes(64), **hooks)  # type: ignore[arg-type]
    assert ev.collateral is not None
    trust = TrustConfig.development([root.root_certificate])
    root_der = root.root_certificate.public_bytes(Encoding.DER)
    assert _ours(ev.evidence, ev.collateral, now, trust) == _oracle(ev.evidence, ev.collateral, now, root_der)


@pytest.mark.parametrize("name", ["tdx_quote", "sgx_quote"])
def test_dcap_collateral_outside_its_window_fails(vectors: Path, name: str) -> None:
    rel, col, _when = SAMPLES[name]
    assert col is not None
    quote, collateral = load_quote(vectors, rel), (vectors / col).read_bytes()
    info = json.loads(json.loads(collateral)["tcb_info"])
    with pytest.raises(AttestationError, match="TCB info issue date is in the future"):
        verify_quote(
            quote, trust=PROD, collateral=collateral, now=T(info["issueDate"]) - timedelta(seconds=1)
        )
    with pytest.raises(AttestationError, match="expired"):
        verify_quote(quote, trust=PROD, collateral=collateral, now=T(info["nextUpdate"]) + timedelta(days=1))


def test_dcap_expired_pck_certificate_fails_later(vectors: Path) -> None:
    quote = load_quote(vectors, SAMPLES["spr_e4"][0])
    with pytest.raises(AttestationError, match="not valid at"):
        verify_quote(quote, trust=PROD, now=T("2053-07-01T01:00:00Z"))


def test_dcap_tcb_info_bit_flip_in_signed_json_fails(vectors: Path) -> None:
    rel, col, when = SAMPLES["tdx_quote"]
    assert col is not None
    d = json.loads((vectors / col).read_bytes())
    d["tcb_info"] = d["tcb_info"].replace('"tcbEvaluationDataNumber":17', '"tcbEvaluationDataNumber":18')
    with pytest.raises(AttestationError, match="TCB info: signature"):
        verify_quote(load_quote(vectors, rel), trust=PROD, collateral=json.dumps(d).encode(), now=T(when))


def test_dcap_qe_identity_bit_flip_fails(vectors: Path) -> None:
    rel, col, when = SAMPLES["sgx_quote"]
    assert col is not None
    d = json.loads((vectors / col).read_bytes())
    d["qe_identity"] = d["qe_identity"].replace('"isvprodid":1', '"isvprodid":3')
    with pytest.raises(AttestationError, match="QE identity: signature"):
        verify_quote(load_quote(vectors, rel), trust=PROD, collateral=json.dumps(d).encode(), now=T(when))


def test_dcap_collateral_round_trip(vectors: Path) -> None:
    raw = (vectors / SAMPLES["tdx_quote"][1]).read_bytes()  # type: ignore[operator]
    col = QuoteCollateralV3.from_bytes(raw)
    assert QuoteCollateralV3.from_bytes(col.to_bytes()) == col
    assert TcbInfo.from_json(col.tcb_info).fmspc.hex() == "b0c06f000000"


@pytest.mark.parametrize("name", ["tdx_quote", "sgx_quote", "v5_sample"])
def test_dcap_single_bit_flips_in_signed_bytes_fail(vectors: Path, name: str) -> None:
    rel, _, when = SAMPLES[name]
    raw = load_quote(vectors, rel)
    q = Quote.from_bytes(raw)
    signed = len(q.signed_bytes())
    # header fields, body, QE report (signed by the PCK), QE auth data (bound by the QE report)
    qe_at = signed + 4 + 64 + 64 + (0 if q.header.version == 3 else 6)
    positions = [20, 40, signed - 1, signed // 2, qe_at + 100, qe_at + 384 + 64 + 2 + 5]
    for pos in positions:
        mutated = bytearray(raw)
        mutated[pos] ^= 0x01
        with pytest.raises((AttestationError, EvidenceFormatError)):
            verify_quote(bytes(mutated), trust=PROD, now=T(when))


@pytest.mark.parametrize("name", ["tdx_quote", "sgx_quote", "v5_sample"])
def test_dcap_truncated_quote_raises_format_error(vectors: Path, name: str) -> None:
    raw = load_quote(vectors, SAMPLES[name][0])
    for cut in (
        0,
        10,
        47,
        48,
        300,
        632,
        700,
        1000,
        len(Quote.from_bytes(raw).to_bytes()) - len(Quote.from_bytes(raw).trailing) - 1,
    ):
        with pytest.raises(EvidenceFormatError):
            Quote.from_bytes(raw[:cut])


def test_dcap_oversized_quote_raises_format_error(vectors: Path) -> None:
    raw = load_quote(vectors, SAMPLES["tdx_quote"][0])
    with pytest.raises(EvidenceFormatError, match="too large"):
        Quote.from_bytes(raw + bytes(abi.MAX_QUOTE_SIZE))


def test_dcap_unknown_version_and_key_type_raise_format_error(vectors: Path) -> None:
    raw = bytearray(load_quote(vectors, SAMPLES["tdx_quote"][0]))
    for pos, value in ((0, 9), (2, 3), (4, 0x42)):
        m = bytearray(raw)
        m[pos] = value
        with pytest.raises(EvidenceFormatError):
            Quote.from_bytes(bytes(m))


def test_dcap_pck_extension_fields(vectors: Path) -> None:
    q = Quote.from_bytes(load_quote(vectors, SAMPLES["sgx_quote"][0]))
    certs = verify.load_certificates([q.signature_data.qe.certification_data.data])
    ext = pck_extension(certs[0])
    assert ext.fmspc.hex() == "00a067110000" and ext.pce_svn == 13 and ext.pce_id == bytes(2)
    assert ext.tcb_components == tuple(ext.cpu_svn)
    again = parse_sgx_extension(
        encode_sgx_extension(
            ppid=ext.ppid, cpu_svn=ext.cpu_svn, pce_svn=ext.pce_svn, pce_id=ext.pce_id, fmspc=ext.fmspc
        )
    )
    assert again == ext


# --- simulator ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tee", ["tdx", "sgx"])
def test_dcap_simulated_passes_dev_trust_and_fails_production(root: DCAPTestRoot, tee: str) -> None:
    now = datetime.now(timezone.utc)
    ev = build_evidence(root, tee=tee, report_data=bytes(64))
    r = verify_quote(
        ev.evidence, trust=TrustConfig.development([root.root_certificate]), collateral=ev.collateral, now=now
    )
    assert r.tcb_status == "UpToDate"
    with pytest.raises(AttestationError, match="not allow-listed"):
        verify_quote(ev.evidence, trust=PROD, now=now)
    with pytest.raises(AttestationError, match="not allow-listed"):
        verify_collateral(ev.collateral or b"", trust=PROD, now=now)


def test_dcap_test_root_pem_round_trip(root: DCAPTestRoot) -> None:
    again = DCAPTestRoot.from_pem(root.to_pem())
    assert again.root_certificate == root.root_certificate
    ev = build_evidence(again, tee="sgx", report_data=bytes(64))
    verify_quote(
        ev.evidence, trust=TrustConfig.development([root.root_certificate]), now=datetime.now(timezone.utc)
    )
    with pytest.raises(ValueError, match="PEM bundle"):
        DCAPTestRoot.from_pem(root.to_pem()[:-300])


BREAKS = {
    "bad_quote_signature": "quote: signature",
    "bad_qe_report_signature": "QE report: signature",
    "bad_qe_binding": "does not bind the attestation key",
    "untrusted_root": "not allow-listed",
    "revoked_pck": "revoked",
    "expired_collateral": "expired",
    "bad_tcb_info_signature": "TCB info: signature",
    "bad_qe_identity_signature": "QE identity: signature",
    "no_matching_tcb": "no matching TCB level",
    "wrong_fmspc": "FMSPC",
}


@pytest.mark.parametrize("tee", ["tdx", "sgx"])
@pytest.mark.parametrize("hook", sorted(BREAKS))
def test_dcap_simulated_break_is_refused(root: DCAPTestRoot, tee: str, hook: str) -> None:
    ev = build_evidence(root, tee=tee, report_data=bytes(64), **{hook: True})  # type: ignore[arg-type]
    with pytest.raises(AttestationError, match=BREAKS[hook]):
        verify_quote(
            ev.evidence,
            trust=TrustConfig.development([root.root_certificate]),
            collateral=ev.collateral,
            now=datetime.now(timezone.utc),
        )


def test_dcap_simulated_round_trip(root: DCAPTestRoot) -> None:
    for tee, v in (("tdx", 4), ("tdx", 5), ("sgx", 3)):
        ev = build_evidence(root, tee=tee, report_data=bytes(range(64)), quote_version=v)
        q = Quote.from_bytes(ev.evidence)
        assert q.header.version == v and q.to_bytes() == ev.evidence


def test_dcap_collateral_for_other_root_is_refused(root: DCAPTestRoot) -> None:
    other = DCAPTestRoot.generate()
    ev = build_evidence(root, tee="tdx", report_data=bytes(64))
    trust = TrustConfig.development([root.root_certificate, other.root_certificate])
    with pytest.raises(AttestationError, match="different roots"):
        verify_quote(
            ev.evidence,
            trust=trust,
            collateral=build_collateral(other, tee="tdx"),
            now=datetime.now(timezone.utc),
        )


# --- caches ----------------------------------------------------------------------------------------------


def test_dcap_chain_cache_is_keyed_by_leaf(root: DCAPTestRoot) -> None:
    """A cached chain result for one PCK leaf must not vouch for another leaf under the same CA."""
    now = datetime.now(timezone.utc)
    trust = TrustConfig.development([root.root_certificate])
    good = build_evidence(root, tee="tdx", report_data=bytes(64))
    verify_quote(good.evidence, trust=trust, now=now)
    verify_quote(good.evidence, trust=trust, now=now)
    assert verify.cache_stats()["chain"][0] >= 1  # second call hit
    # Same subject/issuer names, but a leaf signed by a key outside the hierarchy.
    from cryptography.hazmat.primitives.asymmetric import ec

    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    forged = replace(root, platform_ca_key=rogue_ca_key)
    forged = replace(forged, pck_certificate=_resign(root.pck_certificate, rogue_ca_key))
    bad = build_evidence(forged, tee="tdx", report_data=bytes(64))
    with pytest.raises(AttestationError, match="no issuer certificate"):
        verify_quote(bad.evidence, trust=trust, now=now)


def _resign(cert, key):  # type: ignore[no-untyped-def]
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    b = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        b = b.add_extension(ext.value, critical=ext.critical)
    return b.sign(key, hashes.SHA256())


def test_dcap_collateral_cache_not_reused_past_next_update(root: DCAPTestRoot) -> None:
    now = datetime.now(timezone.utc)
    trust = TrustConfig.development([root.root_certificate])
    ev = build_evidence(root, tee="sgx", report_data=bytes(64))
    assert ev.collateral is not None
    first = verify_collateral(ev.collateral, trust=trust, now=now)
    assert verify_collateral(ev.collateral, trust=trust, now=now + timedelta(days=1)) is first
    assert verify.cache_stats()["collateral"][0] == 1
    with pytest.raises(AttestationError, match="expired"):
        verify_collateral(ev.collateral, trust=trust, now=first.valid_until + timedelta(seconds=1))
    with pytest.raises(AttestationError, match="expired"):
        verify_quote(
            ev.evidence, trust=trust, collateral=ev.collateral, now=first.valid_until + timedelta(seconds=1)
        )


def test_dcap_collateral_cache_keyed_by_trust(root: DCAPTestRoot) -> None:
    now = datetime.now(timezone.utc)
    ev = build_evidence(root, tee="sgx", report_data=bytes(64))
    assert ev.collateral is not None
    verify_collateral(ev.collateral, trust=TrustConfig.development([root.root_certificate]), now=now)
    with pytest.raises(AttestationError, match="not allow-listed"):
        verify_collateral(ev.collateral, trust=PROD, now=now)


def test_dcap_revoked_leaf_not_masked_by_cache(root: DCAPTestRoot) -> None:
    """Chain cached as good; revocation is still checked per call against the collateral's CRL."""
    now = datetime.now(timezone.utc)
    trust = TrustConfig.development([root.root_certificate])
    ev = build_evidence(root, tee="tdx", report_data=bytes(64))
    verify_quote(ev.evidence, trust=trust, collateral=ev.collateral, now=now)
    revoked = build_collateral(root, tee="tdx", revoked_pck=True)
    with pytest.raises(AttestationError, match="revoked"):
        verify_quote(ev.evidence, trust=trust, collateral=revoked, now=now)


# --- fuzz ---------------------------------------------------------------------------------------------------


def _seeds() -> list[bytes]:
    from tests.attestation.conftest import VECTORS

    if not VECTORS.is_dir():
        return [build_evidence(DCAPTestRoot.generate(), tee="tdx", report_data=bytes(64)).evidence]
    return [load_quote(VECTORS, SAMPLES[n][0]) for n in ("tdx_quote", "sgx_quote", "v5_sample")]


SEEDS = _seeds()
FUZZ_NOW = T("2025-06-19T11:00:00Z")


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.sampled_from(SEEDS),
    cut=st.integers(min_value=0, max_value=6000),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=5999), st.integers(1, 255)), max_size=4),
    junk=st.binary(max_size=64),
)
def test_dcap_fuzz_mutations_raise_only_dcap_errors(
    seed: bytes, cut: int, flips: list[tuple[int, int]], junk: bytes
) -> None:
    data = bytearray(seed[:cut])
    for pos, x in flips:
        if pos < len(data):
            data[pos] ^= x
    for candidate in (bytes(data), bytes(data) + junk, junk):
        try:
            verify_quote(candidate, trust=PROD, now=FUZZ_NOW)
        except (EvidenceFormatError, AttestationError):
            pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048))
def test_dcap_fuzz_collateral_raises_only_dcap_errors(blob: bytes) -> None:
    for candidate in (blob, json.dumps({"tcb_info": blob.decode("latin-1")}).encode()):
        with pytest.raises((EvidenceFormatError, AttestationError)):
            verify_collateral(candidate, trust=PROD, now=FUZZ_NOW)
