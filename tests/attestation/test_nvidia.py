"""NVIDIA H100 GPU evidence: genuine nvtrust sample, RIMs, simulator, attacks, fuzzing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_confidential.attestation import nvidia
from ray_confidential.attestation.claims import VerifiedClaims
from ray_confidential.attestation.nvidia.abi import GPUAttestationReport, parse_report
from ray_confidential.attestation.nvidia.rim import parse_rim, verify_rim_signature
from ray_confidential.attestation.nvidia.validate import compare_rims
from ray_confidential.attestation.reference import UNSAFE_ANY_MEASUREMENT, measurement_pins
from ray_confidential.attestation.trust import VENDOR_ROOT_FINGERPRINTS, TrustConfig
from ray_confidential.errors import AttestationError, EvidenceFormatError
from ray_confidential.testing.nvidia_fake import NVIDIATestRoot, build_evidence, matching_rims

PROD = TrustConfig.production()
NOW = datetime.now(timezone.utc)
SAMPLE_NONCE = "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb"
SAMPLE_FWID = (
    "f5c384aebb579217a2c66b17ed0f28e6a9b8d639041acd7b4721cec004f7275494ba94bb5cdfdb3055ee051762b1f75d"
)
# The device chain is valid 2022-03-01 .. 9999-12-31; any later time works.
SAMPLE_TIME = datetime(2024, 7, 1, tzinfo=timezone.utc)


def _dir(vectors: Path) -> Path:
    return vectors / "nvidia-gpu" / "nvtrust"


def _genuine(vectors: Path) -> tuple[bytes, bytes]:
    d = _dir(vectors)
    return (d / "hopperAttestationReport.txt").read_bytes(), (d / "hopperCertChain.txt").read_bytes()


def _unsafe_any() -> nvidia.Policy:
    with pytest.warns(UserWarning):
        return nvidia.Policy(measurements=measurement_pins(UNSAFE_ANY_MEASUREMENT))


@pytest.fixture(scope="module")
def root() -> NVIDIATestRoot:
    return NVIDIATestRoot.generate()


@pytest.fixture(scope="module")
def dev(root: NVIDIATestRoot) -> TrustConfig:
    return TrustConfig.development([root.root_certificate])


# ---------------------------------------------------------------- genuine sample


def test_nvidia_genuine_report_verifies_with_genuine_chain(vectors: Path) -> None:
    report, chain = _genuine(vectors)
    claims = nvidia.verify_evidence(report, certs=[chain], trust=PROD, now=SAMPLE_TIME)
    # SOURCE.txt: chain to the NVIDIA Device Identity CA; FWID and nonce as listed; driver 550.90.07,
    # VBIOS 96.00.9f.00.01 (nvtrust nvmlHandlerTest.py).
    assert claims.tee == "nvidia-gpu" and claims.debug is False
    assert claims.root_fingerprint == VENDOR_ROOT_FINGERPRINTS["nvidia-device-identity-ca"]
    assert claims.report_data.hex() == SAMPLE_NONCE
    assert claims.details["fwid"].hex() == SAMPLE_FWID
    assert claims.details["driver_version"] == "550.90.07"
    assert claims.details["vbios_version"] == "96.00.9f.00.01"
    assert claims.details["hw_model"] == "GH100 A01 GSP BROM"
    assert len([k for k in claims.measurements if k.startswith("measurement_")]) == 64
    assert len(claims.measurements["measurement"]) == 48


def test_nvidia_genuine_chain_in_any_order_and_der(vectors: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    report, chain = _genuine(vectors)
    ders = [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(chain)]
    claims = nvidia.verify_evidence(report, certs=ders[::-1], trust=PROD, now=SAMPLE_TIME)
    assert claims.report_data.hex() == SAMPLE_NONCE


def test_nvidia_genuine_round_trip_is_byte_exact(vectors: Path) -> None:
    text, _ = _genuine(vectors)
    raw = bytes.fromhex(text.decode())
    report = GPUAttestationReport.from_bytes(raw)
    assert report.to_bytes() == raw
    assert GPUAttestationReport.from_bytes(report.to_bytes()) == report
    assert parse_report(text) == parse_report(raw) == report


def test_nvidia_genuine_bit_flips_in_signed_bytes_fail(vectors: Path) -> None:
    text, chain = _genuine(vectors)
    raw = bytes.fromhex(text.decode())
    for pos in [*range(0, len(raw), 61), len(raw) - 1]:
        mutated = bytearray(raw)
        mutated[pos] ^= 0x04
        with pytest.raises((AttestationError, EvidenceFormatError)):
            nvidia.verify_evidence(bytes(mutated), certs=[chain], trust=PROD, now=SAMPLE_TIME)


def test_nvidia_genuine_without_chain_or_with_missing_link_fails(vectors: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    report, chain = _genuine(vectors)
    with pytest.raises(AttestationError, match="no device certificates"):
        nvidia.verify_evidence(report, trust=PROD, now=SAMPLE_TIME)
    certs = x509.load_pem_x509_certificates(chain)
    partial = [c.public_bytes(Encoding.DER) for i, c in enumerate(certs) if i != 2]
    with pytest.raises(AttestationError, match="no certificate for issuer"):
        nvidia.verify_evidence(report, certs=partial, trust=PROD, now=SAMPLE_TIME)


def test_nvidia_genuine_report_from_another_session_refused(vectors: Path) -> None:
    report, chain = _genuine(vectors)
    claims = nvidia.verify_evidence(report, certs=[chain], trust=PROD, now=SAMPLE_TIME)
    with pytest.warns(UserWarning):
        policy = nvidia.Policy(measurements=measurement_pins("UNSAFE_ANY"), expected_nonce=b"\x42" * 32)
    violations = nvidia.validate_claims(claims, policy)
    assert [(v.field, v.got, v.want) for v in violations] == [("nonce", SAMPLE_NONCE, "42" * 32)]


def test_nvidia_genuine_report_does_not_match_test_rims(vectors: Path) -> None:
    report, chain = _genuine(vectors)
    claims = nvidia.verify_evidence(report, certs=[chain], trust=PROD, now=SAMPLE_TIME)
    rims_dir = _dir(vectors) / "rims"
    rims = tuple(
        parse_rim((rims_dir / n).read_bytes())
        for n in ("Driver_RIM_test_no_gpu.swidtag", "1010_0200_882_96005E0001_test_no_gpu.swidtag")
    )
    # SOURCE.txt: the sample does NOT match the *_test_no_gpu RIMs (many indices differ).
    mismatches = compare_rims(claims, rims)
    assert len(mismatches) > 5
    assert all(v.field.startswith("measurement_") for v in mismatches)
    # Their versions (545.00, 96.00.5E.00.01) are not the report's: a policy selects no RIM, and
    # refuses when a RIM is required.
    policy = nvidia.Policy(measurements=_unsafe_any().measurements, rims=rims, require_rim=True)
    assert {v.field for v in nvidia.validate_claims(claims, policy)} == {"driver_rim", "vbios_rim"}


def _rim_time(data: bytes) -> datetime:
    import base64
    import re

    from cryptography import x509

    first = re.search(rb"<ds:X509Certificate>(.*?)</ds:X509Certificate>", data, re.S)
    assert first is not None
    leaf = x509.load_der_x509_certificate(base64.b64decode(b"".join(first.group(1).split())))
    return leaf.not_valid_before_utc + timedelta(days=1)


def test_nvidia_genuine_rim_signatures_verify_to_corim_root(vectors: Path) -> None:
    paths = sorted((_dir(vectors) / "rims").glob("*.swidtag"))
    assert len(paths) >= 20
    for path in paths:
        data = path.read_bytes()
        rim = verify_rim_signature(data, trust=PROD, now=_rim_time(data))
        assert rim == parse_rim(data)
        assert rim.product == "GH100" and len(rim.measurements) == 64


def test_nvidia_genuine_rim_tampered_or_untrusted_fails(vectors: Path) -> None:
    data = (_dir(vectors) / "rims" / "1010_0200_882_96005E0001_PROD.swidtag").read_bytes()
    t = _rim_time(data)
    tampered = data.replace(b'index="1" active="True"', b'index="1" active="False"', 1)
    assert tampered != data
    with pytest.raises(AttestationError, match="digest does not match"):
        verify_rim_signature(tampered, trust=PROD, now=t)
    no_roots = TrustConfig(root_fingerprints=frozenset())
    with pytest.raises(AttestationError, match="not allow-listed"):
        verify_rim_signature(data, trust=no_roots, now=t)
    with pytest.raises(AttestationError, match="not valid"):
        verify_rim_signature(data, trust=PROD, now=t + timedelta(days=3650))


@pytest.mark.parametrize(
    ("xml", "match"),
    [
        (b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>', "not allowed"),
        (b'<!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;">]><x>&b;</x>', "not allowed"),
        (b"<x><!-- c --></x>", "not allowed"),
        (b"<x>", "malformed"),
        (b"<x/>", "not a SWID"),
        (b"<" + b"a>" * 40, "too deep|malformed"),
    ],
)
def test_nvidia_rim_unsafe_or_malformed_xml_refused(xml: bytes, match: str) -> None:
    with pytest.raises(EvidenceFormatError, match=match):
        parse_rim(xml)


# ---------------------------------------------------------------- simulator


def test_nvidia_simulated_verifies_under_dev_and_fails_under_production(
    root: NVIDIATestRoot, dev: TrustConfig
) -> None:
    nonce = bytes(range(32))
    fake = build_evidence(root, report_data=nonce)
    claims = nvidia.verify_evidence(fake.evidence, certs=fake.certs, trust=dev, now=NOW)
    assert claims.report_data == nonce and claims.tee == "nvidia-gpu"
    policy = nvidia.Policy(
        measurements=measurement_pins([claims.measurements["measurement"]]),
        expected_nonce=nonce,
        rims=matching_rims(fake.evidence),
        require_rim=True,
        driver_versions={"550.90.07"},
        vbios_versions={"96.00.9F.00.01"},
    )
    assert nvidia.validate_claims(claims, policy) == []
    with pytest.raises(AttestationError, match="not allow-listed"):
        nvidia.verify_evidence(fake.evidence, certs=fake.certs, trust=PROD, now=NOW)


def test_nvidia_simulated_hex_form_and_pem_round_trip(root: NVIDIATestRoot, dev: TrustConfig) -> None:
    fake = build_evidence(root, report_data=bytes(32), as_hex=True)
    assert parse_report(fake.evidence) == parse_report(bytes.fromhex(fake.evidence.decode()))
    again = NVIDIATestRoot.from_pem(root.to_pem())
    assert again.leaf_certificate == root.leaf_certificate and again.fwid == root.fwid
    assert "PRIVATE" not in repr(again)
    fake2 = build_evidence(again, report_data=bytes(32))
    nvidia.verify_evidence(fake2.evidence, certs=fake2.certs, trust=dev, now=NOW)


def test_nvidia_gpu_nonce_from_another_session_refused(root: NVIDIATestRoot, dev: TrustConfig) -> None:
    this_session, other_session = b"\x01" * 32, b"\x02" * 32
    relayed = build_evidence(root, report_data=other_session)
    claims = nvidia.verify_evidence(relayed.evidence, certs=relayed.certs, trust=dev, now=NOW)
    policy = nvidia.Policy(
        measurements=measurement_pins([claims.measurements["measurement"]]), expected_nonce=this_session
    )
    violations = nvidia.validate_claims(claims, policy)
    assert [(v.field, v.got, v.want) for v in violations] == [
        ("nonce", other_session.hex(), this_session.hex())
    ]


@pytest.mark.parametrize(
    ("hook", "error", "match"),
    [
        ("bad_signature", AttestationError, "signature does not verify"),
        ("tamper_measurement", AttestationError, "signature does not verify"),
        ("untrusted_root", AttestationError, "not allow-listed"),
        ("foreign_leaf", AttestationError, "not signed by its issuer"),
        ("drop_intermediate", AttestationError, "no certificate for issuer"),
        ("expired_leaf", AttestationError, "not valid at"),
        ("wrong_fwid", AttestationError, "FWID does not match"),
        ("unsigned_request", EvidenceFormatError, "signed response"),
    ],
)
def test_nvidia_break_hook_refused(
    root: NVIDIATestRoot, dev: TrustConfig, hook: str, error: type[Exception], match: str
) -> None:
    fake = build_evidence(root, report_data=bytes(32), **{hook: True})
    with pytest.raises(error, match=match):
        nvidia.verify_evidence(fake.evidence, certs=fake.certs, trust=dev, now=NOW)


def test_nvidia_simulated_chain_expires_at_later_now(root: NVIDIATestRoot, dev: TrustConfig) -> None:
    fake = build_evidence(root, report_data=bytes(32))
    nvidia.verify_evidence(fake.evidence, certs=fake.certs, trust=dev, now=NOW)  # cached chain
    with pytest.raises(AttestationError, match="not valid at"):
        nvidia.verify_evidence(fake.evidence, certs=fake.certs, trust=dev, now=NOW + timedelta(days=4000))


def test_nvidia_debug_cannot_be_simulated(root: NVIDIATestRoot) -> None:
    with pytest.raises(ValueError, match="no debug flag"):
        build_evidence(root, report_data=bytes(32), debug=True)
    with pytest.raises(TypeError, match="unknown break hook"):
        build_evidence(root, report_data=bytes(32), bad_sig=True)


def test_nvidia_wrong_measurement_and_rim_mismatch_all_reported(
    root: NVIDIATestRoot, dev: TrustConfig
) -> None:
    good = build_evidence(root, report_data=bytes(32))
    other = build_evidence(root, report_data=bytes(32), measurement=b"\x07" * 48, driver_version="999.1")
    good_claims = nvidia.verify_evidence(good.evidence, certs=good.certs, trust=dev, now=NOW)
    claims = nvidia.verify_evidence(other.evidence, certs=other.certs, trust=dev, now=NOW)
    policy = nvidia.Policy(
        measurements=measurement_pins([good_claims.measurements["measurement"]]),
        measurement_values={5: good_claims.measurements["measurement_5"]},
        rims=matching_rims(good.evidence),
        require_rim=True,
        driver_versions={"550.90.07"},
    )
    fields = [v.field for v in nvidia.validate_claims(claims, policy)]
    assert fields[:4] == ["measurement", "measurement_5", "driver_version", "driver_rim"]
    # The VBIOS RIM still matches by version and reports each differing index.
    assert "measurement_1" in fields and "measurement_11" not in fields


def test_nvidia_conflicting_rims_reported(root: NVIDIATestRoot) -> None:
    fake = build_evidence(root, report_data=bytes(32))
    driver, vbios = matching_rims(fake.evidence)
    claims = VerifiedClaims(tee="nvidia-gpu", debug=False, report_data=bytes(32), measurements={})
    conflict = [v for v in compare_rims(claims, (vbios, vbios)) if "claimed by" in v.got]
    assert conflict and driver.version == "550.90.07"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, "needs 'measurements'"),
        ({"measurements": ["aa"]}, "48-byte"),
        ({"measurements": ["aa" * 48], "expected_nonce": "00"}, "32 bytes"),
        ({"measurements": ["aa" * 48], "measurement_values": {"0": "00"}}, "1..254"),
        ({"measurements": ["aa" * 48], "require_rim": "yes"}, "true or false"),
        ({"measurements": ["aa" * 48], "rims": "<x/>"}, "list of RIM"),
        ({"measurements": ["aa" * 48], "driver_version": ["1"]}, "unknown nvidia-gpu policy key"),
    ],
)
def test_nvidia_policy_from_dict_rejects_bad_input(data: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nvidia.Policy.from_dict(data)


def test_nvidia_policy_from_dict_with_rim_text(vectors: Path) -> None:
    xml = (_dir(vectors) / "rims" / "Driver_RIM_test_no_gpu.swidtag").read_text()
    policy = nvidia.Policy.from_dict(
        {
            "measurements": ["aa" * 48],
            "rims": [xml],
            "expected_nonce": SAMPLE_NONCE,
            "driver_versions": ["545.00"],
        }
    )
    assert policy.rims[0].version == "545.00" and policy.expected_nonce is not None


# ---------------------------------------------------------------- parser strictness and fuzz


@pytest.mark.parametrize("cut", [1, 50, 96, 97, 500, 4000])
def test_nvidia_truncated_report_raises_format_error(vectors: Path, cut: int) -> None:
    raw = bytes.fromhex(_genuine(vectors)[0].decode())
    with pytest.raises(EvidenceFormatError):
        parse_report(raw[: len(raw) - cut])


@pytest.mark.parametrize(
    ("evidence", "match"),
    [
        (b"", "empty"),
        (b"zz", "neither"),
        (b"0" * 200_000, "more than"),
        (b"\x11" * 200_000, "more than"),
        (b"\x12" + bytes(300), "neither"),
    ],
)
def test_nvidia_malformed_evidence_raises_format_error(evidence: bytes, match: str) -> None:
    with pytest.raises(EvidenceFormatError, match=match):
        parse_report(evidence)


def test_nvidia_oversized_or_inconsistent_fields_raise_format_error(vectors: Path) -> None:
    raw = bytearray(bytes.fromhex(_genuine(vectors)[0].decode()))
    cases = {
        "trailing": bytes(raw) + b"\x00",
        "record length": bytes(raw[:42]) + b"\xff\xff\x00" + bytes(raw[45:]),
        "block count": bytes(raw[:41]) + b"\x41" + bytes(raw[42:]),
        "zero blocks": bytes(raw[:41]) + b"\x00" + bytes(raw[42:]),
        "wrong code": bytes(raw[:38]) + b"\x61" + bytes(raw[39:]),
    }
    for name, data in cases.items():
        with pytest.raises(EvidenceFormatError):
            parse_report(data)
        assert name


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=2048))
def test_nvidia_fuzz_random_bytes_raise_only_format_errors(data: bytes) -> None:
    for evidence in (data, b"\x11\xe0\x01\xff" + data, data.hex().encode()):
        try:
            parse_report(evidence)
        except EvidenceFormatError:
            pass
    try:
        parse_rim(data)
    except EvidenceFormatError:
        pass


@pytest.mark.filterwarnings("ignore:Attribute's length")
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_nvidia_fuzz_mutated_genuine_sample(vectors: Path, data: st.DataObject) -> None:
    text, chain = _genuine(vectors)
    original = bytes.fromhex(text.decode())
    raw = bytearray(original)
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "set"]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        del raw[pos:]
    elif kind == "insert":
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        nvidia.verify_evidence(bytes(raw), certs=[chain], trust=PROD, now=SAMPLE_TIME)
    except (EvidenceFormatError, AttestationError):
        return
    assert bytes(raw) == original
