"""AWS Nitro Enclaves attestation documents: genuine samples, simulator, attacks, fuzzing."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_confidential.attestation import nitro
from ray_confidential.attestation.claims import VerifiedClaims
from ray_confidential.attestation.nitro.abi import AttestationDocument, NitroDocument, parse_document
from ray_confidential.attestation.reference import UNSAFE_ANY_MEASUREMENT, measurement_pins
from ray_confidential.attestation.trust import VENDOR_ROOT_FINGERPRINTS, TrustConfig
from ray_confidential.errors import AttestationError, EvidenceFormatError
from ray_confidential.testing.nitro_fake import DEFAULT_MEASUREMENT, NitroTestRoot, build_evidence

SAMPLES = ("example_attestation", "lib_rs_test_verify_doc.b64")
PROD = TrustConfig.production()


def _sample(vectors: Path, name: str) -> bytes:
    return (vectors / "nitro" / "EternisAI-remote-attestation-verifier" / name).read_bytes()


def _time_of(doc: NitroDocument) -> datetime:
    return datetime.fromtimestamp(doc.document.timestamp / 1000, timezone.utc)


@pytest.fixture(scope="module")
def root() -> NitroTestRoot:
    return NitroTestRoot.generate()


@pytest.fixture(scope="module")
def dev(root: NitroTestRoot) -> TrustConfig:
    return TrustConfig.development([root.root_certificate])


NOW = datetime.now(timezone.utc)


# ---------------------------------------------------------------- genuine samples


@pytest.mark.parametrize("name", SAMPLES)
def test_nitro_genuine_sample_verifies_at_its_time(vectors: Path, name: str) -> None:
    evidence = _sample(vectors, name)
    doc = parse_document(evidence)
    claims = nitro.verify_evidence(evidence, trust=PROD, now=_time_of(doc))
    # SOURCE.txt: debug enclave (PCR0..2 zero), nonce 00..01 (20 bytes), public_key b"dummy", root G1.
    assert claims.tee == "nitro"
    assert claims.debug is True
    assert claims.root_fingerprint == VENDOR_ROOT_FINGERPRINTS["aws-nitro-enclaves-root-g1"]
    assert claims.details["nonce"] == bytes(19) + b"\x01"
    assert claims.details["public_key"] == b"dummy"
    assert claims.details["digest"] == "SHA384"
    assert claims.details["module_id"].startswith("i-0bbf1bfe232b8c2ce-enc")
    assert claims.report_data == doc.document.user_data and len(claims.report_data) == 68
    assert set(claims.measurements) == {f"pcr{i}" for i in range(16)}
    assert all(claims.measurements[f"pcr{i}"] == bytes(48) for i in (0, 1, 2))
    assert len(doc.document.cabundle) == 4  # root -> regional -> zonal -> instance


@pytest.mark.parametrize("name", SAMPLES)
def test_nitro_genuine_debug_sample_refused_by_production_policy(vectors: Path, name: str) -> None:
    evidence = _sample(vectors, name)
    claims = nitro.verify_evidence(evidence, trust=PROD, now=_time_of(parse_document(evidence)))
    policy = nitro.Policy(measurements=measurement_pins(["ab" * 48]))
    fields = {v.field for v in nitro.validate_claims(claims, policy)}
    assert fields == {"debug", "pcr0"}
    with pytest.warns(UserWarning):
        lax = nitro.Policy(measurements=measurement_pins(UNSAFE_ANY_MEASUREMENT))
    assert [v.field for v in nitro.validate_claims(claims, lax)] == ["debug"]


@pytest.mark.parametrize("name", SAMPLES)
def test_nitro_genuine_round_trip_is_byte_exact(vectors: Path, name: str) -> None:
    raw = base64.b64decode(_sample(vectors, name))
    doc = NitroDocument.from_bytes(raw)
    assert doc.to_bytes() == raw
    assert NitroDocument.from_bytes(doc.to_bytes()) == doc
    assert AttestationDocument.from_bytes(doc.document.to_bytes()) == doc.document
    assert parse_document(raw) == doc  # raw and base64 input give the same record


def test_nitro_genuine_expired_leaf_fails_later(vectors: Path) -> None:
    evidence = _sample(vectors, SAMPLES[0])
    t = _time_of(parse_document(evidence))
    with pytest.raises(AttestationError, match="not valid at"):
        nitro.verify_evidence(evidence, trust=PROD, now=t + timedelta(days=1))
    with pytest.raises(AttestationError, match="not valid at"):
        nitro.verify_evidence(evidence, trust=PROD, now=t - timedelta(days=1))


def test_nitro_genuine_root_not_allow_listed_refused(vectors: Path, root: NitroTestRoot) -> None:
    evidence = _sample(vectors, SAMPLES[0])
    only_test_root = TrustConfig(root_fingerprints=frozenset(), test_roots=(root.root_certificate,))
    with pytest.raises(AttestationError, match="not allow-listed"):
        nitro.verify_evidence(evidence, trust=only_test_root, now=_time_of(parse_document(evidence)))


@pytest.mark.filterwarnings("ignore:Attribute's length")
def test_nitro_genuine_single_bit_flips_in_signed_bytes_fail(vectors: Path) -> None:
    raw = base64.b64decode(_sample(vectors, SAMPLES[0]))
    doc = NitroDocument.from_bytes(raw)
    now = _time_of(doc)
    start = raw.index(doc.payload)
    # Flip bits across the payload (user_data, pcrs, certificates) and in the signature.
    positions = [*range(start, start + len(doc.payload), 97), len(raw) - 1, len(raw) - 60]
    for pos in positions:
        for bit in (0, 7):
            mutated = bytearray(raw)
            mutated[pos] ^= 1 << bit
            with pytest.raises((AttestationError, EvidenceFormatError)):
                nitro.verify_evidence(bytes(mutated), trust=PROD, now=now)


# ---------------------------------------------------------------- simulator


def test_nitro_simulated_verifies_under_dev_and_fails_under_production(
    root: NitroTestRoot, dev: TrustConfig
) -> None:
    fake = build_evidence(root, report_data=b"\x07" * 64, nonce=b"n" * 32, public_key=b"pk")
    claims = nitro.verify_evidence(fake.evidence, trust=dev, now=NOW)
    assert claims == VerifiedClaims(
        tee="nitro",
        debug=False,
        report_data=b"\x07" * 64,
        measurements=claims.measurements,
        root_fingerprint=claims.root_fingerprint,
        details=claims.details,
    )
    assert claims.measurements["pcr0"] == DEFAULT_MEASUREMENT
    assert claims.details["nonce"] == b"n" * 32 and claims.details["public_key"] == b"pk"
    policy = nitro.Policy(
        measurements=measurement_pins([DEFAULT_MEASUREMENT]),
        expected_nonce=b"n" * 32,
        expected_user_data=b"\x07" * 64,
        expected_public_key=b"pk",
    )
    assert nitro.validate_claims(claims, policy) == []
    with pytest.raises(AttestationError, match="not allow-listed"):
        nitro.verify_evidence(fake.evidence, trust=PROD, now=NOW)


def test_nitro_simulated_base64_and_tagged_forms_verify(root: NitroTestRoot, dev: TrustConfig) -> None:
    fake = build_evidence(root, report_data=b"r", tagged=True, as_base64=True)
    assert fake.evidence[:1].isalnum()
    doc = parse_document(fake.evidence)
    assert doc.tagged and NitroDocument.from_bytes(doc.to_bytes()) == doc
    # Base64 with line breaks and URL-safe alphabet is accepted too.
    wrapped = b"\n".join(fake.evidence[i : i + 64] for i in range(0, len(fake.evidence), 64))
    urlsafe = base64.urlsafe_b64encode(base64.b64decode(fake.evidence)).rstrip(b"=")
    for form in (fake.evidence, wrapped, urlsafe):
        assert nitro.verify_evidence(form, trust=dev, now=NOW).report_data == b"r"


def test_nitro_test_root_pem_round_trip(root: NitroTestRoot, dev: TrustConfig) -> None:
    again = NitroTestRoot.from_pem(root.to_pem())
    assert again.root_certificate == root.root_certificate
    assert again.leaf_certificate == root.leaf_certificate
    assert "PRIVATE" not in repr(again) and "leaf_key" not in repr(again)
    nitro.verify_evidence(build_evidence(again, report_data=b"").evidence, trust=dev, now=NOW)
    with pytest.raises(ValueError, match="3 certificates"):
        NitroTestRoot.from_pem(root.root_certificate.public_bytes(Encoding.PEM))


@pytest.mark.parametrize(
    ("hook", "error", "match"),
    [
        ("bad_signature", AttestationError, "signature does not verify"),
        ("tamper_payload", AttestationError, "signature does not verify"),
        ("untrusted_root", AttestationError, "not allow-listed"),
        ("foreign_leaf", AttestationError, "not signed by its issuer"),
        ("drop_intermediate", AttestationError, "not signed by its issuer"),
        ("expired_leaf", AttestationError, "not valid at"),
        ("extra_field", EvidenceFormatError, "unknown payload field"),
        ("wrong_alg", EvidenceFormatError, "ES384"),
    ],
)
def test_nitro_break_hook_refused(
    root: NitroTestRoot, dev: TrustConfig, hook: str, error: type[Exception], match: str
) -> None:
    fake = build_evidence(root, report_data=b"x", **{hook: True})
    with pytest.raises(error, match=match):
        nitro.verify_evidence(fake.evidence, trust=dev, now=NOW)


def test_nitro_unknown_break_hook_is_a_type_error(root: NitroTestRoot) -> None:
    with pytest.raises(TypeError, match="unknown break hook"):
        build_evidence(root, report_data=b"", bad_signatur=True)


def test_nitro_simulated_leaf_expired_at_later_now(root: NitroTestRoot, dev: TrustConfig) -> None:
    fake = build_evidence(root, report_data=b"")
    with pytest.raises(AttestationError, match="not valid at"):
        nitro.verify_evidence(fake.evidence, trust=dev, now=NOW + timedelta(days=30))


def test_nitro_naive_now_is_misuse(root: NitroTestRoot, dev: TrustConfig) -> None:
    fake = build_evidence(root, report_data=b"")
    with pytest.raises(ValueError, match="timezone-aware"):
        nitro.verify_evidence(fake.evidence, trust=dev, now=datetime.now())


def test_nitro_chain_cache_never_reused_across_leaf_trust_or_time(
    root: NitroTestRoot, dev: TrustConfig
) -> None:
    good = build_evidence(root, report_data=b"")
    nitro.verify_evidence(good.evidence, trust=dev, now=NOW)  # chain now cached
    # Same cabundle, another leaf: a different cache key, so the chain is checked afresh.
    with pytest.raises(AttestationError, match="not signed by its issuer"):
        nitro.verify_evidence(
            build_evidence(root, report_data=b"", foreign_leaf=True).evidence, trust=dev, now=NOW
        )
    # The cached chain is still checked against the trust configuration and the clock.
    with pytest.raises(AttestationError, match="not allow-listed"):
        nitro.verify_evidence(good.evidence, trust=PROD, now=NOW)
    with pytest.raises(AttestationError, match="not valid at"):
        nitro.verify_evidence(good.evidence, trust=dev, now=NOW + timedelta(days=30))
    # And the document signature is checked every time.
    with pytest.raises(AttestationError, match="signature does not verify"):
        nitro.verify_evidence(
            build_evidence(root, report_data=b"", bad_signature=True).evidence, trust=dev, now=NOW
        )


# ---------------------------------------------------------------- validate


def test_nitro_debug_enclave_refused(root: NitroTestRoot, dev: TrustConfig) -> None:
    claims = nitro.verify_evidence(
        build_evidence(root, report_data=b"", debug=True).evidence, trust=dev, now=NOW
    )
    assert claims.debug
    policy = nitro.Policy(measurements=measurement_pins([DEFAULT_MEASUREMENT]))
    violations = nitro.validate_claims(claims, policy)
    assert {v.field for v in violations} == {"debug", "pcr0"}
    debug_ok = nitro.Policy(measurements=measurement_pins([bytes(48)]), allow_debug=True)
    assert nitro.validate_claims(claims, debug_ok) == []


def test_nitro_wrong_measurement_and_pcrs_all_reported(root: NitroTestRoot, dev: TrustConfig) -> None:
    other = bytes.fromhex("11" * 48)
    fake = build_evidence(root, report_data=b"a", measurement=other, nonce=b"old", public_key=b"k1")
    claims = nitro.verify_evidence(fake.evidence, trust=dev, now=NOW)
    policy = nitro.Policy.from_dict(
        {
            "measurements": [DEFAULT_MEASUREMENT.hex()],
            "pcrs": {"1": "22" * 48, 8: "00" * 48},
            "expected_nonce": b"new".hex(),
            "expected_user_data": b"b".hex(),
            "expected_public_key": b"k2".hex(),
        }
    )
    violations = {v.field: v for v in nitro.validate_claims(claims, policy)}
    assert set(violations) == {"pcr0", "pcr1", "nonce", "user_data", "public_key"}
    assert violations["pcr0"].got == other.hex()
    assert DEFAULT_MEASUREMENT.hex() in violations["pcr0"].want
    assert violations["nonce"].got == b"old".hex() and violations["nonce"].want == b"new".hex()


def test_nitro_wrong_tee_claims_refused() -> None:
    claims = VerifiedClaims(
        tee="sev-snp", debug=False, report_data=b"", measurements={"pcr0": DEFAULT_MEASUREMENT}
    )
    policy = nitro.Policy(measurements=measurement_pins([DEFAULT_MEASUREMENT]))
    assert [v.field for v in nitro.validate_claims(claims, policy)] == ["tee"]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({}, "needs 'measurements'"),
        ({"measurements": []}, "empty measurement allow-list"),
        ({"measurements": ["aa"]}, "48 bytes"),
        ({"measurements": ["aa" * 48], "pcrs": {"40": "00" * 48}}, "PCR index"),
        ({"measurements": ["aa" * 48], "pcrs": {"1": "00"}}, "48 bytes"),
        ({"measurements": ["aa" * 48], "alow_debug": True}, "unknown nitro policy key"),
        ({"measurements": ["aa" * 48], "allow_debug": "yes"}, "true or false"),
        ({"measurements": ["aa" * 48], "expected_nonce": "zz"}, "hex"),
    ],
)
def test_nitro_policy_from_dict_rejects_bad_input(data: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nitro.Policy.from_dict(data)


def test_nitro_policy_unsafe_any_warns() -> None:
    with pytest.warns(UserWarning, match="UNSAFE_ANY_MEASUREMENT"):
        policy = nitro.Policy.from_dict({"measurements": "UNSAFE_ANY"})
    assert policy.measurements is UNSAFE_ANY_MEASUREMENT


# ---------------------------------------------------------------- parser strictness


def _cose(payload: bytes, *, protected: bytes = b"\xa1\x01\x38\x22", unprotected: object = None) -> bytes:
    return cbor2.dumps([protected, {} if unprotected is None else unprotected, payload, bytes(96)])


def _payload(**override: object) -> bytes:
    base: dict[str, object] = {
        "module_id": "m",
        "digest": "SHA384",
        "timestamp": 1,
        "pcrs": {0: bytes(48)},
        "certificate": b"c",
        "cabundle": [b"r"],
        "public_key": None,
        "user_data": None,
        "nonce": None,
    }
    base.update(override)
    return cbor2.dumps({k: v for k, v in base.items() if v is not ...})


@pytest.mark.parametrize(
    ("evidence", "match"),
    [
        (b"", "empty"),
        (b"\x84", "truncated"),
        (_cose(_payload())[:-1], "truncated"),
        (_cose(_payload()) + b"\x00", "trailing"),
        (
            b"\x84" + b"\x44\xa1\x01\x38\x22" + b"\xa0" + b"\x5a\x00\x00\x00\x01" + b"\x00" + b"\x40",
            "non-minimal",
        ),
        (b"\x84\x5f\x41\x00\xff", "indefinite"),
        (b"\xd2\xd2" + _cose(_payload()), "unexpected CBOR item"),
        (b"\x84" * 20000, "more than"),
        (b"x" * 100_000, "more than"),
        (b"!!!!", "neither"),
        (base64.b64encode(b"\x00\x01"), "not a COSE_Sign1"),
        (cbor2.dumps([1, 2, 3, 4]), "protected header must be a byte string"),
        (cbor2.dumps([b"", {}, b"", b""]), "protected header has 0 bytes"),
        (_cose(_payload(), protected=cbor2.dumps({1: -35, 4: b"kid"})), "exactly"),
        (_cose(_payload(), unprotected={4: b"kid"}), "unprotected header must be empty"),
        (_cose(_payload(extra=1)), "unknown payload field"),
        (_cose(_payload(module_id=...)), "missing mandatory field 'module_id'"),
        (_cose(_payload(certificate=None)), "missing mandatory field 'certificate'"),
        (_cose(_payload(module_id="")), "module_id"),
        (_cose(_payload(digest="SHA256")), "digest"),
        (_cose(_payload(timestamp=0)), "timestamp"),
        (_cose(_payload(timestamp=-5)), "timestamp"),
        (_cose(_payload(pcrs={})), "pcrs"),
        (_cose(_payload(pcrs={32: bytes(48)})), "PCR index"),
        (_cose(_payload(pcrs={"0": bytes(48)})), "PCR index"),
        (_cose(_payload(pcrs={0: bytes(32)})), "PCR0 has 32 bytes"),
        (_cose(_payload(cabundle=[])), "cabundle"),
        (_cose(_payload(cabundle=[b""])), "cabundle entry has 0 bytes"),
        (_cose(_payload(certificate=b"c" * 1025)), "certificate has 1025 bytes"),
        (_cose(_payload(user_data=b"u" * 513)), "user_data has 513 bytes"),
        (_cose(_payload(nonce=b"u" * 513)), "nonce has 513 bytes"),
        (_cose(_payload(public_key=b"")), "public_key has 0 bytes"),
        (_cose(_payload(user_data="text")), "user_data must be a byte string"),
        (_cose(_payload(timestamp=1.5)), "unexpected CBOR item"),
        (_cose(_payload(nonce=True)), "unexpected CBOR item"),
        (_cose(b"\xa1\x61\xff\x01"), "CBOR decode failed"),
        (_cose(cbor2.dumps(cbor2.CBORTag(24, b"x"))), "unexpected CBOR item"),
        (_cose(b"\xa2\x61a\x01\x61a\x02"), "duplicate CBOR map key"),
        (_cose(cbor2.dumps([[[[[1]]]]])), "too deep"),
    ],
)
def test_nitro_malformed_document_raises_format_error(evidence: bytes, match: str) -> None:
    with pytest.raises(EvidenceFormatError, match=match):
        parse_document(evidence)


def test_nitro_bad_der_certificate_is_format_error(dev: TrustConfig) -> None:
    raw = _cose(_payload(certificate=b"\x30\x03\x02\x01\x01"))
    with pytest.raises(EvidenceFormatError, match="not a DER certificate"):
        nitro.verify_evidence(raw, trust=dev, now=NOW)


@pytest.mark.parametrize("cut", [1, 2, 10, 100, 1000, 2000, 2900])
def test_nitro_truncated_document_raises_format_error(root: NitroTestRoot, cut: int) -> None:
    raw = build_evidence(root, report_data=b"").evidence
    with pytest.raises(EvidenceFormatError):
        parse_document(raw[: len(raw) - cut])


# ---------------------------------------------------------------- fuzz


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=4096))
def test_nitro_fuzz_random_bytes_raise_only_format_errors(data: bytes) -> None:
    for evidence in (data, b"\x84" + data, b"\xd2\x84" + data, base64.b64encode(data)):
        try:
            parse_document(evidence)
        except EvidenceFormatError:
            pass


@pytest.mark.filterwarnings("ignore:Attribute's length")
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_nitro_fuzz_mutated_genuine_sample(vectors: Path, data: st.DataObject) -> None:
    raw = bytearray(base64.b64decode(_sample(vectors, SAMPLES[1])))
    now = datetime.fromtimestamp(1726534079.695, timezone.utc)
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
    mutated = bytes(raw)
    try:
        nitro.verify_evidence(mutated, trust=PROD, now=now)
    except (EvidenceFormatError, AttestationError):
        return
    # Only a no-op mutation may still verify.
    assert mutated == base64.b64decode(_sample(vectors, SAMPLES[1]))
