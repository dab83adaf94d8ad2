"""AMD SEV-SNP: genuine samples, simulator, attacks, policy validation, fuzzing."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_confidential.attestation import snp
from ray_confidential.attestation.reference import UNSAFE_ANY_MEASUREMENT, measurement_pins
from ray_confidential.attestation.snp import abi
from ray_confidential.attestation.snp.abi import SNPReport, TCBVersion, build_cert_table
from ray_confidential.attestation.snp.validate import Policy, validate_claims
from ray_confidential.attestation.snp.verify import (
    AMD_PSS,
    endorsement_extensions,
    load_certificates,
    verify_endorsement_chain,
    verify_evidence,
)
from ray_confidential.attestation.trust import VENDOR_ROOT_FINGERPRINTS, TrustConfig
from ray_confidential.errors import AttestationError, EvidenceFormatError
from ray_confidential.testing.snp_fake import BREAKS, SNPTestRoot, build_evidence

PROD = TrustConfig.production()
UTC = timezone.utc
NOW = datetime.now(UTC)


# --- genuine samples -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    name: str
    report: str  # path under sev-snp/
    certs: tuple[str, ...]  # paths under vectors/
    at: datetime
    version: int
    debug: bool
    policy: int
    tcb: dict[str, int]
    measurement: str
    report_data: str
    firmware: str | None = None


SAMPLES = [
    Sample(
        "virtee-sev",
        "virtee-sev/report_milan.hex",
        ("sev-snp/virtee-sev/vcek_milan.der", "sev-snp/virtee-sev/cert_chain_milan"),
        datetime(2024, 1, 1, tzinfo=UTC),
        2,
        False,
        0x30000,
        {"bl": 3, "tee": 0, "snp": 8, "ucode": 115},
        "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f",
        "d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c645810b0f2cdfca0040433be063fc1a8293f0"
        "f3f8dae7b79fecb3d1cd82bd6a93ebfd",
    ),
    Sample(
        "go-sev-guest",
        "go-sev-guest/attestation.bin",
        ("sev-snp/go-sev-guest/vcek.testcer", "sev-snp/go-sev-guest/milan.testcer"),
        datetime(2022, 9, 24, 1, 0, tzinfo=UTC),
        2,
        True,
        0xB0000,
        {"bl": 2, "tee": 0, "snp": 5, "ucode": 68},
        "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01",
        "0102030405" + "00" * 59,
    ),
    Sample(
        "trustee",
        "trustee/test-report.bin",
        ("sev-snp/trustee/test-vcek.der", "roots/amd_ask_milan.pem", "roots/amd_ark_milan.pem"),
        datetime(2024, 1, 1, tzinfo=UTC),
        2,
        False,
        0x3001F,
        {"bl": 3, "tee": 0, "snp": 8, "ucode": 115},
        "",
        "",
    ),
    Sample(
        "teekit",
        "teekit/sev-gcp.bin",
        ("sev-snp/teekit/sev-gcp-vcek.pem", "sev-snp/teekit/sev-gcp-cert-chain.pem"),
        datetime(2025, 12, 6, tzinfo=UTC),
        5,
        False,
        0x30000,
        {"bl": 4, "tee": 0, "snp": 27, "ucode": 222},
        "b747d55452e0b9e9079770a49e397c5e6d9573581e246da7baac4f28b5cdc5b1b6d19251b8ee600fd16a3708f58406f3",
        "00" * 64,
        firmware="1.55.35",
    ),
]


def _report(vectors: Path, s: Sample) -> bytes:
    raw = (vectors / "sev-snp" / s.report).read_bytes()
    return bytes.fromhex(raw.decode().strip()) if s.report.endswith(".hex") else raw


def _certs(vectors: Path, s: Sample) -> list[bytes]:
    return [(vectors / p).read_bytes() for p in s.certs]


@pytest.mark.parametrize("s", SAMPLES, ids=lambda s: s.name)
def test_snp_genuine_sample_verifies_at_its_time(vectors: Path, s: Sample) -> None:
    claims = verify_evidence(_report(vectors, s), trust=PROD, certs=_certs(vectors, s), now=s.at)
    d = claims.details
    assert claims.tee == "sev-snp"
    assert claims.root_fingerprint == VENDOR_ROOT_FINGERPRINTS["amd-ark-milan"]
    assert claims.tcb_status == "unknown"
    assert (d["version"], claims.debug, d["policy"], d["vmpl"]) == (s.version, s.debug, s.policy, 0)
    assert d["reported_tcb"] == s.tcb
    assert d["product"] == "Milan" and d["signing_key"] == "vcek"
    if s.measurement:
        assert claims.measurements["measurement"].hex() == s.measurement
    if s.report_data:
        assert claims.report_data.hex() == s.report_data
    if s.firmware:
        assert d["firmware"] == s.firmware
    # CHIP_ID equals the VCEK hwID (SOURCE.txt cross-checks).
    vcek = load_certificates([_certs(vectors, s)[0]])[0]
    assert endorsement_extensions(vcek).hwid == d["chip_id"]


def test_snp_go_sev_guest_debug_sample_refused_by_production_policy(vectors: Path) -> None:
    s = SAMPLES[1]
    claims = verify_evidence(_report(vectors, s), trust=PROD, certs=_certs(vectors, s), now=s.at)
    policy = Policy(measurements=measurement_pins([s.measurement]))
    assert [v.field for v in validate_claims(claims, policy)] == ["debug"]
    assert validate_claims(claims, replace(policy, allow_debug=True)) == []


def test_snp_genuine_extended_report_cert_table(vectors: Path) -> None:
    s = SAMPLES[0]
    certs = load_certificates(_certs(vectors, s))
    by_cn = {c.subject.rfc4514_string().split(",")[0]: c.public_bytes(Encoding.DER) for c in certs}
    table = build_cert_table(
        [
            (abi.GUID_ARK, by_cn["CN=ARK-Milan"]),
            (abi.GUID_VCEK, by_cn["CN=SEV-VCEK"]),
            (abi.GUID_ASK, by_cn["CN=SEV-Milan"]),
        ]
    )
    claims = verify_evidence(_report(vectors, s) + table, trust=PROD, now=s.at)
    assert claims.measurements["measurement"].hex() == s.measurement


def test_snp_ark_fingerprints_match_the_amd_pems(vectors: Path) -> None:
    for product in ("milan", "genoa", "turin"):
        pem = (vectors / "roots" / f"amd_ark_{product}.pem").read_bytes()
        der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
        assert VENDOR_ROOT_FINGERPRINTS[f"amd-ark-{product}"] == hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize("product", ["milan", "genoa", "turin"])
def test_snp_amd_ask_chains_to_ark(vectors: Path, product: str) -> None:
    bundles = sorted((vectors / "sev-snp" / "go-sev-guest" / "trust").glob(f"ask_ark_{product}*.pem"))
    assert len(bundles) == 2  # VCEK (ASK) and VLEK (ASVK) chains
    for path in bundles:
        ask, ark = load_certificates([path.read_bytes()])
        key = ark.public_key()
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 4096
        key.verify(ask.signature, ask.tbs_certificate_bytes, AMD_PSS, hashes.SHA384())
        fp = hashlib.sha256(ark.public_bytes(Encoding.DER)).hexdigest()
        assert fp == VENDOR_ROOT_FINGERPRINTS[f"amd-ark-{product}"]


def test_snp_turin_vcek_chains_and_decodes_turin_tcb(vectors: Path) -> None:
    folder = vectors / "sev-snp" / "virtee-sev"
    vcek, ask, ark = load_certificates(
        [(folder / "vcek_turin.der").read_bytes(), (folder / "cert_chain_turin").read_bytes()]
    )
    at = datetime(2025, 1, 1, tzinfo=UTC)
    assert verify_endorsement_chain(vcek, ask, ark, trust=PROD, now=at) == "Turin"
    ext = endorsement_extensions(vcek)
    assert len(ext.hwid or b"") == 8
    assert TCBVersion.decode(ext.tcb, product="Turin").as_dict() == {
        "fmc": 0,
        "bl": 0,
        "tee": 0,
        "snp": 0,
        "ucode": 9,
    }


def test_snp_tcb_layouts_differ_between_milan_and_turin() -> None:
    raw = int.from_bytes(bytes([1, 2, 3, 4, 0, 0, 0, 5]), "little")
    assert TCBVersion.decode(raw, product="Turin") == TCBVersion(fmc=1, bl=2, tee=3, snp=4, ucode=5)
    assert TCBVersion.decode(raw, product="Milan") == TCBVersion(bl=1, tee=2, snp=0, ucode=5)
    milan = TCBVersion(bl=3, tee=0, snp=8, ucode=115)
    assert TCBVersion.decode(milan.encode(product="Genoa"), product="Genoa") == milan
    with pytest.raises(ValueError, match="unknown SEV-SNP product"):
        TCBVersion.decode(raw, product="Naples")


@pytest.mark.parametrize("name", ["test-vcek-invalid-legacy.der", "test-vcek-invalid-new.der"])
def test_snp_trustee_corrupted_vcek_fails(vectors: Path, name: str) -> None:
    s = SAMPLES[2]
    bad = (vectors / "sev-snp" / "trustee" / name).read_bytes()
    vcek = load_certificates([bad])[0]
    ask, ark = load_certificates([(vectors / p).read_bytes() for p in s.certs[1:]])
    with pytest.raises(AttestationError, match="signature by 'SEV-Milan' does not verify"):
        verify_endorsement_chain(vcek, ask, ark, trust=PROD, now=s.at)
    with pytest.raises(AttestationError):
        verify_evidence(_report(vectors, s), trust=PROD, certs=[bad, *_certs(vectors, s)[1:]], now=s.at)


@pytest.mark.parametrize(("idx", "byte", "mask"), [(2, 42, 0x01), (0, 21, 0x80)])
def test_snp_genuine_report_bit_flip_fails(vectors: Path, idx: int, byte: int, mask: int) -> None:
    s = SAMPLES[idx]
    raw = bytearray(_report(vectors, s))
    raw[byte] ^= mask
    with pytest.raises((AttestationError, EvidenceFormatError)):
        verify_evidence(bytes(raw), trust=PROD, certs=_certs(vectors, s), now=s.at)


def test_snp_virtee_vcek_byte_flip_fails(vectors: Path) -> None:
    s = SAMPLES[0]
    certs = _certs(vectors, s)
    vcek = bytearray(certs[0])
    vcek[40] ^= 0xFF
    with pytest.raises((AttestationError, EvidenceFormatError)):
        verify_evidence(_report(vectors, s), trust=PROD, certs=[bytes(vcek), certs[1]], now=s.at)


@pytest.mark.parametrize(
    ("s", "at"),
    [(SAMPLES[0], datetime(2031, 1, 1, tzinfo=UTC)), (SAMPLES[3], datetime(2025, 12, 1, tzinfo=UTC))],
    ids=["expired", "not-yet-valid"],
)
def test_snp_vcek_outside_validity_fails(vectors: Path, s: Sample, at: datetime) -> None:
    with pytest.raises(AttestationError, match="is not valid at"):
        verify_evidence(_report(vectors, s), trust=PROD, certs=_certs(vectors, s), now=at)


def test_snp_ark_not_on_allow_list_fails(vectors: Path) -> None:
    s = SAMPLES[0]
    genoa_only = TrustConfig(root_fingerprints=frozenset({VENDOR_ROOT_FINGERPRINTS["amd-ark-genoa"]}))
    with pytest.raises(AttestationError, match="not an allow-listed root"):
        verify_evidence(_report(vectors, s), trust=genoa_only, certs=_certs(vectors, s), now=s.at)


def test_snp_missing_chain_fails(vectors: Path) -> None:
    s = SAMPLES[0]
    with pytest.raises(AttestationError, match="no ASK/ASVK certificate"):
        verify_evidence(_report(vectors, s), trust=PROD, certs=_certs(vectors, s)[:1], now=s.at)
    with pytest.raises(AttestationError, match="no VCEK certificate"):
        verify_evidence(_report(vectors, s), trust=PROD, certs=_certs(vectors, s)[1:], now=s.at)


def test_snp_certs_in_any_order_and_duplicated(vectors: Path) -> None:
    s = SAMPLES[3]
    certs = _certs(vectors, s)
    der = [c.public_bytes(Encoding.DER) for c in load_certificates(certs)]
    claims = verify_evidence(_report(vectors, s), trust=PROD, certs=[der[2], *certs[::-1], der[0]], now=s.at)
    assert claims.details["version"] == 5


def test_snp_garbage_certificate_is_a_format_error(vectors: Path) -> None:
    s = SAMPLES[0]
    with pytest.raises(EvidenceFormatError, match="malformed certificate"):
        verify_evidence(_report(vectors, s), trust=PROD, certs=[b"\x30\x03abc"], now=s.at)


@pytest.mark.parametrize("s", SAMPLES, ids=lambda s: s.name)
def test_snp_round_trip(vectors: Path, s: Sample) -> None:
    raw = _report(vectors, s)
    report = SNPReport.from_bytes(raw)
    assert report.to_bytes() == raw
    assert SNPReport.from_bytes(report.to_bytes()) == report
    assert report.signed_bytes() == raw[:0x2A0]


# --- parser negatives -------------------------------------------------------------------------------------
def _mutate(raw: bytes, off: int, value: int) -> bytes:
    b = bytearray(raw)
    b[off] = value
    return bytes(b)


def test_snp_truncated_and_oversized_raise_format_error(vectors: Path) -> None:
    raw = _report(vectors, SAMPLES[0])
    for bad in (b"", raw[:-1], raw[:0x2A0], raw + b"\0", raw + bytes(abi.CERT_TABLE_MAX_SIZE + 1)):
        with pytest.raises(EvidenceFormatError):
            verify_evidence(bad, trust=PROD, now=NOW)
    with pytest.raises(EvidenceFormatError, match="must be 1184 bytes"):
        SNPReport.from_bytes(raw + b"\0")


@pytest.mark.parametrize(
    ("name", "off", "value", "match"),
    [
        ("snp_reserved_04c_set", 0x4C, 1, "must-be-zero"),
        ("snp_v2_cpuid_bytes_set", 0x188, 0x19, "must-be-zero"),
        ("snp_reserved_1eb_set", 0x1EB, 1, "must-be-zero"),
        ("snp_v2_mit_vector_set", 0x1F8, 1, "must-be-zero"),
        ("snp_signature_padding_set", 0x2A0 + 144, 1, "must-be-zero"),
        ("snp_version_6", 0x0, 6, "unsupported SEV-SNP report version"),
        ("snp_policy_bit17_clear", 0xA, 0x01, "bit 17"),
        ("snp_policy_reserved_high_bit", 0xF, 0x80, "63:26"),
        ("snp_signing_key_reserved", 0x48, 2 << 2, "reserved SIGNING_KEY"),
        ("snp_signature_algo_unknown", 0x34, 2, "signature algorithm"),
    ],
)
def test_snp_malformed_report_raises_format_error(
    vectors: Path, name: str, off: int, value: int, match: str
) -> None:
    raw = _report(vectors, SAMPLES[0])
    with pytest.raises(EvidenceFormatError, match=match):
        SNPReport.from_bytes(_mutate(raw, off, value))


def test_snp_malformed_cert_table_raises_format_error(vectors: Path) -> None:
    raw = _report(vectors, SAMPLES[0])
    entry = abi.GUID_VCEK.bytes + (0).to_bytes(4, "little") + (10).to_bytes(4, "little")
    for table in (entry, entry + bytes(24) + bytes(10), bytes(10)):
        with pytest.raises(EvidenceFormatError, match="certificate table"):
            verify_evidence(raw + table, trust=PROD, now=NOW)


# --- simulator ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def roots() -> dict[str, SNPTestRoot]:
    return {p: SNPTestRoot.generate(product=p) for p in ("Milan", "Genoa", "Turin")}


def _dev(root: SNPTestRoot) -> TrustConfig:
    return TrustConfig.development([root.root_certificate])


@pytest.mark.parametrize("product", ["Milan", "Genoa", "Turin"])
@pytest.mark.parametrize("version", [2, 3, 5])
@pytest.mark.parametrize("extended", [False, True])
def test_snp_simulated_evidence_verifies_under_dev_root_only(
    roots: dict[str, SNPTestRoot], product: str, version: int, extended: bool
) -> None:
    root = roots[product]
    ev = build_evidence(
        root, report_data=b"\x07" * 64, measurement=b"\x11" * 48, version=version, extended=extended
    )
    claims = verify_evidence(ev.evidence, trust=_dev(root), certs=ev.certs, now=NOW)
    d = claims.details
    assert (d["product"], d["version"], claims.debug) == (product, version, False)
    assert d["reported_tcb"] == root.tcb.as_dict()
    assert ("fmc" in d["reported_tcb"]) == (product == "Turin")
    assert claims.report_data == b"\x07" * 64 and claims.measurements["measurement"] == b"\x11" * 48
    assert SNPReport.from_bytes(ev.evidence[: abi.REPORT_SIZE]).to_bytes() == ev.evidence[: abi.REPORT_SIZE]
    with pytest.raises(AttestationError, match="not an allow-listed root"):
        verify_evidence(ev.evidence, trust=PROD, certs=ev.certs, now=NOW)


def test_snp_simulated_vlek(roots: dict[str, SNPTestRoot]) -> None:
    root = roots["Milan"]
    ev = build_evidence(root, report_data=bytes(64), signing_key="vlek")
    claims = verify_evidence(ev.evidence, trust=_dev(root), certs=ev.certs, now=NOW)
    assert claims.details["signing_key"] == "vlek"
    policy = Policy(measurements=UNSAFE_ANY_MEASUREMENT, signing_keys=frozenset({"vcek"}))
    assert [v.field for v in validate_claims(claims, policy)] == ["signing_key"]


BREAK_CASES = [
    ("bad_signature", "signature does not verify"),
    ("tamper_signed_bytes", "signature does not verify"),
    ("wrong_chip_id", "no VCEK certificate for CHIP_ID"),
    ("tcb_mismatch", "REPORTED_TCB"),
    ("foreign_ask", "signature by 'SEV-Milan' does not verify"),
    ("expired_vcek", "is not valid at"),
    ("omit_vcek", "no VCEK certificate supplied"),
    ("omit_ask", "no ASK/ASVK certificate"),
    ("omit_ark", "no ARK certificate"),
    ("wrong_cpuid", "is not a Milan part"),
    ("unsigned", "not signed"),
]


@pytest.mark.parametrize(("brk", "match"), BREAK_CASES)
def test_snp_simulated_break_fails(roots: dict[str, SNPTestRoot], brk: str, match: str) -> None:
    root = roots["Milan"]
    breaks: dict[str, Any] = {brk: True}
    ev = build_evidence(root, report_data=bytes(64), **breaks)
    with pytest.raises(AttestationError, match=match):
        verify_evidence(ev.evidence, trust=_dev(root), certs=ev.certs, now=NOW)


def test_snp_every_break_is_tested() -> None:
    assert {brk for brk, _ in BREAK_CASES} == BREAKS


def test_snp_unknown_break_is_a_type_error(roots: dict[str, SNPTestRoot]) -> None:
    with pytest.raises(TypeError, match="unknown break"):
        build_evidence(roots["Milan"], report_data=bytes(64), no_such_break=True)


def test_snp_other_test_root_is_not_trusted(roots: dict[str, SNPTestRoot]) -> None:
    other = SNPTestRoot.generate(product="Milan")
    ev = build_evidence(other, report_data=bytes(64))
    with pytest.raises(AttestationError, match="not an allow-listed root"):
        verify_evidence(ev.evidence, trust=_dev(roots["Milan"]), certs=ev.certs, now=NOW)


def test_snp_test_root_pem_round_trip_exports_no_ca_key(roots: dict[str, SNPTestRoot]) -> None:
    root = roots["Turin"]
    pem = root.to_pem()
    assert pem.count(b"-----BEGIN PRIVATE KEY-----") == 2
    loaded = SNPTestRoot.from_pem(pem)
    assert loaded.ark_key is None and loaded.chip_id == root.chip_id and loaded.tcb == root.tcb
    ev = build_evidence(loaded, report_data=bytes(64), extended=True)
    verify_evidence(ev.evidence, trust=_dev(root), now=NOW)
    with pytest.raises(ValueError, match="needs the CA keys"):
        build_evidence(loaded, report_data=bytes(64), expired_vcek=True)
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(root)
    assert "redacted" in repr(root)


def test_snp_crl_collateral(roots: dict[str, SNPTestRoot]) -> None:
    root = roots["Milan"]
    assert root.ark_key is not None
    ev = build_evidence(root, report_data=bytes(64))

    def crl(revoked: list[int], *, next_update: datetime) -> bytes:
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(root.ark.subject)
            .last_update(NOW - timedelta(hours=1))
            .next_update(next_update)
        )
        for serial in revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW).build()
            )
        assert root.ark_key is not None
        return b.sign(root.ark_key, hashes.SHA384(), rsa_padding=AMD_PSS).public_bytes(Encoding.DER)

    good = crl([12345], next_update=NOW + timedelta(days=1))
    verify_evidence(ev.evidence, trust=_dev(root), certs=ev.certs, collateral=good, now=NOW)
    revoked = crl([root.ask.serial_number], next_update=NOW + timedelta(days=1))
    with pytest.raises(AttestationError, match="is revoked"):
        verify_evidence(ev.evidence, trust=_dev(root), certs=ev.certs, collateral=revoked, now=NOW)
    stale = crl([], next_update=NOW - timedelta(minutes=1))
    with pytest.raises(AttestationError, match="not current"):
        verify_evidence(ev.evidence, trust=_dev(root), certs=ev.certs, collateral=stale, now=NOW)
    with pytest.raises(EvidenceFormatError, match="not an AMD CRL"):
        verify_evidence(ev.evidence, trust=_dev(root), certs=ev.certs, collateral=b"junk", now=NOW)


def test_snp_naive_now_is_a_type_error(roots: dict[str, SNPTestRoot]) -> None:
    ev = build_evidence(roots["Milan"], report_data=bytes(64))
    with pytest.raises(TypeError, match="timezone-aware"):
        verify_evidence(ev.evidence, trust=PROD, certs=ev.certs, now=datetime(2024, 1, 1))


def test_snp_backend_contract() -> None:
    from ray_confidential.attestation.registry import backend

    b = backend("sev-snp")
    assert b.TEE == snp.TEE == "sev-snp"
    assert b.verify_evidence is verify_evidence and b.Policy is Policy


# --- validation under a trusted root ------------------------------------------------------------------
def test_snp_wrong_vmpl_measurement_chip_id_all_reported(roots: dict[str, SNPTestRoot]) -> None:
    root = roots["Milan"]
    ev = build_evidence(
        root,
        report_data=b"\x01" * 64,
        measurement=b"\x22" * 48,
        vmpl=2,
        policy=0x30000 | 1 << abi.POLICY_MIGRATE_MA_BIT,
        host_data=b"\x33" * 32,
        guest_svn=1,
    )
    claims = verify_evidence(ev.evidence, trust=_dev(root), certs=ev.certs, now=NOW)
    policy = Policy(
        measurements=measurement_pins([b"\x44" * 48]),
        report_data=b"\x02" * 64,
        host_data=b"\x55" * 32,
        vmpl=0,
        allow_smt=False,
        min_tcb=TCBVersion(bl=4, tee=0, snp=28, ucode=222),
        min_guest_svn=2,
        chip_ids=frozenset({b"\x66" * 64}),
        products=frozenset({"Genoa"}),
    )
    got = {v.field: v for v in validate_claims(claims, policy)}
    assert set(got) == {
        "measurement",
        "report_data",
        "host_data",
        "vmpl",
        "policy.smt",
        "policy.migrate_ma",
        "reported_tcb.snp",
        "guest_svn",
        "chip_id",
        "product",
    }
    assert got["measurement"].got == "22" * 48 and got["measurement"].want == f"one of [{'44' * 48}]"
    assert got["vmpl"].got == "2" and got["vmpl"].want == "0"
    assert got["chip_id"].got == root.chip_id.hex()


def test_snp_debug_bit_set_refused(roots: dict[str, SNPTestRoot]) -> None:
    root = roots["Genoa"]
    ev = build_evidence(root, report_data=bytes(64), measurement=b"\x01" * 48, debug=True)
    claims = verify_evidence(ev.evidence, trust=_dev(root), certs=ev.certs, now=NOW)
    assert claims.debug
    policy = Policy(measurements=measurement_pins([b"\x01" * 48]))
    assert [v.field for v in validate_claims(claims, policy)] == ["debug"]


def test_snp_matching_policy_has_no_violation(roots: dict[str, SNPTestRoot]) -> None:
    root = roots["Turin"]
    ev = build_evidence(root, report_data=bytes(64), measurement=b"\x01" * 48)
    claims = verify_evidence(ev.evidence, trust=_dev(root), certs=ev.certs, now=NOW)
    policy = Policy.from_dict(
        {
            "measurements": ["01" * 48],
            "vmpl": 0,
            "min_tcb": root.tcb.as_dict(),
            "chip_ids": [root.chip_id.hex()],
            "products": ["Turin"],
            "signing_keys": ["vcek"],
            "host_data": "00" * 32,
        }
    )
    assert validate_claims(claims, policy) == []
    assert validate_claims(claims, replace(policy, min_tcb=replace(root.tcb, fmc=(root.tcb.fmc or 0) + 1)))[
        0
    ].field == ("reported_tcb.fmc")


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({}, "needs 'measurements'"),
        ({"measurements": []}, "empty measurement allow-list"),
        ({"measurements": ["00" * 47]}, "48 bytes"),
        ({"measurements": ["00" * 48], "vmpll": 0}, "unknown SEV-SNP policy key"),
        ({"measurements": ["00" * 48], "vmpl": 4}, "vmpl must be 0..3"),
        ({"measurements": ["00" * 48], "min_tcb": {"bl": 1, "sn": 2}}, "unknown TCB component"),
        ({"measurements": ["00" * 48], "products": ["Naples"]}, "products must be"),
        ({"measurements": ["00" * 48], "allow_debug": "yes"}, "true or false"),
    ],
)
def test_snp_policy_from_dict_rejects_bad_input(d: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Policy.from_dict(d)


# --- fuzzing -----------------------------------------------------------------------------------------------
_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(st.binary(max_size=2000))
def test_snp_fuzz_random_bytes(data: bytes) -> None:
    with pytest.raises((EvidenceFormatError, AttestationError)):
        verify_evidence(data, trust=PROD, now=NOW)


@_FUZZ
@given(idx=st.integers(0, len(SAMPLES) - 1), cut=st.integers(0, abi.REPORT_SIZE - 1))
def test_snp_fuzz_truncations(vectors: Path, idx: int, cut: int) -> None:
    s = SAMPLES[idx]
    with pytest.raises(EvidenceFormatError):
        verify_evidence(_report(vectors, s)[:cut], trust=PROD, certs=_certs(vectors, s), now=s.at)


@_FUZZ
@given(idx=st.integers(0, len(SAMPLES) - 1), off=st.integers(0, abi.REPORT_SIZE - 1), x=st.integers(1, 255))
def test_snp_fuzz_mutations_of_genuine_samples_fail(vectors: Path, idx: int, off: int, x: int) -> None:
    s = SAMPLES[idx]
    raw = bytearray(_report(vectors, s))
    raw[off] ^= x
    with pytest.raises((EvidenceFormatError, AttestationError)):
        verify_evidence(bytes(raw), trust=PROD, certs=_certs(vectors, s), now=s.at)


@_FUZZ
@given(tail=st.binary(min_size=1, max_size=600))
def test_snp_fuzz_cert_table_tail(vectors: Path, tail: bytes) -> None:
    s = SAMPLES[0]
    try:
        verify_evidence(_report(vectors, s) + tail, trust=PROD, certs=_certs(vectors, s), now=s.at)
    except (EvidenceFormatError, AttestationError):
        pass


def test_snp_chain_cache_is_keyed_by_leaf_and_rechecks_validity(roots: dict[str, SNPTestRoot]) -> None:
    root = roots["Genoa"]
    good = build_evidence(root, report_data=bytes(64))
    verify_evidence(good.evidence, trust=_dev(root), certs=good.certs, now=NOW)  # chain now cached
    forged = build_evidence(root, report_data=bytes(64), foreign_ask=True)  # same names, other leaf
    with pytest.raises(AttestationError, match="does not verify"):
        verify_evidence(forged.evidence, trust=_dev(root), certs=forged.certs, now=NOW)
    with pytest.raises(AttestationError, match="is not valid at"):
        verify_evidence(good.evidence, trust=_dev(root), certs=good.certs, now=NOW + timedelta(days=8 * 365))
    with pytest.raises(AttestationError, match="not an allow-listed root"):
        verify_evidence(good.evidence, trust=PROD, certs=good.certs, now=NOW)


def test_snp_simulated_report_has_the_genuine_v5_shape(vectors: Path, roots: dict[str, SNPTestRoot]) -> None:
    genuine = SNPReport.from_bytes(_report(vectors, SAMPLES[3]))
    fake = SNPReport.from_bytes(build_evidence(roots["Milan"], report_data=bytes(64), version=5).evidence)
    shape = [f.name for f in fields(SNPReport) if getattr(genuine, f.name) is None]
    assert shape == [f.name for f in fields(SNPReport) if getattr(fake, f.name) is None] == []
    same = ("version", "signature_algo", "policy", "vmpl", "cpuid_fam_id", "cpuid_mod_id", "signer_info")
    assert {n: getattr(fake, n) for n in same} == {n: getattr(genuine, n) for n in same}
    assert fake.cpuid_product == genuine.cpuid_product == "Milan"
