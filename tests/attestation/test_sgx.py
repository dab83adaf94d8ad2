"""SGX backend: the genuine dcap-qvl quote v3 with collateral, policy, simulated enclaves."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from ray_confidential.attestation import sgx
from ray_confidential.attestation.claims import VerifiedClaims
from ray_confidential.attestation.dcap import verify as dcap_verify
from ray_confidential.attestation.trust import VENDOR_ROOT_FINGERPRINTS, TrustConfig
from ray_confidential.errors import AttestationError
from ray_confidential.testing.dcap_fake import (
    DEFAULT_MR_ENCLAVE,
    ENCLAVE_MRSIGNER,
    DCAPTestRoot,
    build_evidence,
)

PROD = TrustConfig.production()
NOW = datetime(2025, 6, 19, 11, 0, tzinfo=timezone.utc)
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    dcap_verify.clear_caches()


@pytest.fixture(scope="module")
def root() -> DCAPTestRoot:
    return DCAPTestRoot.generate()


@pytest.fixture(scope="module")
def dev(root: DCAPTestRoot) -> TrustConfig:
    return TrustConfig.development([root.root_certificate])


def _genuine(vectors: Path, collateral: bool = True) -> VerifiedClaims:
    d = vectors / "sgx-dcap" / "dcap-qvl"
    return sgx.verify_evidence(
        (d / "sgx_quote").read_bytes(),
        trust=PROD,
        collateral=(d / "sgx_quote_collateral.json").read_bytes() if collateral else None,
        now=NOW,
    )


def test_sgx_genuine_quote_fields_and_tcb_status(vectors: Path) -> None:
    c = _genuine(vectors)
    assert c.tee == "sgx" and not c.debug
    assert c.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert c.advisories == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert c.measurements == {"mr_enclave": bytes.fromhex(MRENCLAVE), "mr_signer": bytes.fromhex(MRSIGNER)}
    assert c.details["isv_prod_id"] == 0 and c.details["isv_svn"] == 0
    assert c.details["attributes"] == "0500000000000000e700000000000000"
    assert c.details["fmspc"] == "00a067110000" and c.details["pce_svn"] == 13
    assert c.details["qe_tcb_status"] == "UpToDate"
    assert c.report_data == b"Hello, world!".ljust(64, b"\0")
    assert c.root_fingerprint == VENDOR_ROOT_FINGERPRINTS["intel-sgx-root-ca"]


def test_sgx_genuine_without_collateral_is_unknown(vectors: Path) -> None:
    c = _genuine(vectors, collateral=False)
    assert c.tcb_status == "unknown" and c.advisories == ()


def test_sgx_genuine_policy(vectors: Path) -> None:
    c = _genuine(vectors)
    ok = sgx.Policy(mr_enclave=[MRENCLAVE], mr_signer=[MRSIGNER], isv_prod_id=0, min_isv_svn=0)
    assert sgx.validate_claims(c, ok) == []
    strict = sgx.Policy(mr_enclave=[MRENCLAVE], accepted_tcb_statuses=["UpToDate", "SWHardeningNeeded"])
    assert [v.field for v in sgx.validate_claims(c, strict)] == ["tcb_status"]


def test_sgx_tdx_quote_refused_by_sgx_backend(vectors: Path) -> None:
    with pytest.raises(AttestationError, match="not an SGX quote"):
        sgx.verify_evidence((vectors / "tdx/dcap-qvl/tdx_quote").read_bytes(), trust=PROD, now=NOW)


def _claims(root: DCAPTestRoot, dev: TrustConfig, **kw: object) -> VerifiedClaims:
    kw.setdefault("report_data", b"\x09" * 64)
    ev = build_evidence(root, tee="sgx", **kw)  # type: ignore[arg-type]
    return sgx.verify_evidence(
        ev.evidence, trust=dev, collateral=ev.collateral, now=datetime.now(timezone.utc)
    )


def test_sgx_simulated_passes_policy(root: DCAPTestRoot, dev: TrustConfig) -> None:
    c = _claims(root, dev, isv_prod_id=7, isv_svn=3)
    p = sgx.Policy(
        mr_enclave=[DEFAULT_MR_ENCLAVE],
        mr_signer=[ENCLAVE_MRSIGNER],
        isv_prod_id=7,
        min_isv_svn=3,
        report_data=b"\x09" * 64,
        accepted_tcb_statuses=["UpToDate"],
    )
    assert c.tcb_status == "UpToDate" and sgx.validate_claims(c, p) == []


def test_sgx_simulated_fails_production_trust(root: DCAPTestRoot) -> None:
    ev = build_evidence(root, tee="sgx", report_data=bytes(64))
    with pytest.raises(AttestationError, match="not allow-listed"):
        sgx.verify_evidence(ev.evidence, trust=PROD, collateral=ev.collateral, now=datetime.now(timezone.utc))


def test_sgx_debug_bit_set_refused(root: DCAPTestRoot, dev: TrustConfig) -> None:
    c = _claims(root, dev, debug=True)
    assert c.debug and c.details["attributes"].startswith("07")
    assert [v.field for v in sgx.validate_claims(c, sgx.Policy(mr_enclave=[DEFAULT_MR_ENCLAVE]))] == ["debug"]


def test_sgx_wrong_measurement_and_signer_refused(root: DCAPTestRoot, dev: TrustConfig) -> None:
    c = _claims(root, dev, measurement=b"\x01" * 32, mr_signer=b"\x02" * 32, isv_svn=1)
    p = sgx.Policy(
        mr_enclave=[DEFAULT_MR_ENCLAVE], mr_signer=[ENCLAVE_MRSIGNER], isv_prod_id=4, min_isv_svn=2
    )
    v = {x.field: x for x in sgx.validate_claims(c, p)}
    assert set(v) == {"mr_enclave", "mr_signer", "isv_prod_id", "isv_svn"}
    assert v["mr_enclave"].got == "01" * 32 and v["isv_svn"].want == ">= 2"


def test_sgx_policy_from_dict() -> None:
    p = sgx.Policy.from_dict({"mr_enclave": [MRENCLAVE], "mr_signer": MRSIGNER, "isv_prod_id": 1})
    assert p.mr_signer == frozenset({bytes.fromhex(MRSIGNER)})
    with pytest.raises(ValueError, match="32 bytes"):
        sgx.Policy(mr_enclave=["aa" * 48])
    with pytest.raises(ValueError, match="isv_prod_id"):
        sgx.Policy(mr_enclave=[MRENCLAVE], isv_prod_id=70000)
    with pytest.raises(ValueError, match="needs mr_enclave"):
        sgx.Policy.from_dict({"mr_signer": [MRSIGNER]})
