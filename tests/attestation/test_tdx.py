"""TDX backend: genuine quotes v4/v5 at their own time, CCEL replay, policy, simulated TDs."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_confidential.attestation import tdx
from ray_confidential.attestation.claims import VerifiedClaims
from ray_confidential.attestation.dcap import verify as dcap_verify
from ray_confidential.attestation.reference import UNSAFE_ANY_MEASUREMENT, measurement_pins
from ray_confidential.attestation.tdx.ccel import CCELTable, build_event_log, parse_event_log, replay_rtmrs
from ray_confidential.attestation.trust import VENDOR_ROOT_FINGERPRINTS, TrustConfig
from ray_confidential.errors import AttestationError, EvidenceFormatError
from ray_confidential.testing.dcap_fake import DEFAULT_MR_TD, DCAPTestRoot, build_evidence

PROD = TrustConfig.production()
GO = "tdx/go-tdx-guest/"
QVL = "tdx/dcap-qvl/"


def T(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


@pytest.fixture(autouse=True)
def _fresh_caches() -> None:
    dcap_verify.clear_caches()


@pytest.fixture(scope="module")
def root() -> DCAPTestRoot:
    return DCAPTestRoot.generate()


@pytest.fixture(scope="module")
def dev(root: DCAPTestRoot) -> TrustConfig:
    return TrustConfig.development([root.root_certificate])


def test_tdx_dcap_qvl_quote_up_to_date(vectors: Path) -> None:
    c = tdx.verify_evidence(
        (vectors / QVL / "tdx_quote").read_bytes(),
        trust=PROD,
        collateral=(vectors / QVL / "tdx_quote_collateral.json").read_bytes(),
        now=T("2025-06-19T11:00:00Z"),
    )
    assert c.tee == "tdx" and not c.debug
    assert c.tcb_status == "UpToDate" and c.advisories == ()
    assert c.root_fingerprint == VENDOR_ROOT_FINGERPRINTS["intel-sgx-root-ca"]
    assert c.measurements["mr_td"].hex() == (
        "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
    )
    assert c.report_data.hex().startswith("9a9d48e7") and c.report_data.hex().endswith("2b523f20")
    assert c.measurements["rtmr0"].hex().startswith("44c0197b") and c.measurements["rtmr0"].hex().endswith(
        "9bc9c0"
    )
    assert c.details["td_attributes"] == "0000001000000000"
    assert set(c.measurements) == {
        "mr_td",
        "rtmr0",
        "rtmr1",
        "rtmr2",
        "rtmr3",
        "mr_config_id",
        "mr_owner",
        "mr_owner_config",
    }


def test_tdx_outdated_quote_v5_has_no_matching_tcb_level(vectors: Path) -> None:
    quote = (vectors / QVL / "tdx_quote_outdated").read_bytes()
    now = T("2026-02-18T12:00:00Z")
    c = tdx.verify_evidence(quote, trust=PROD, now=now)
    assert c.details["quote_version"] == 5 and c.details["body"] == "td1.5" and c.tcb_status == "unknown"
    with pytest.raises(AttestationError, match="no matching TCB level"):
        tdx.verify_evidence(
            quote,
            trust=PROD,
            collateral=(vectors / QVL / "tdx_quote_outdated_collateral.json").read_bytes(),
            now=now,
        )


def test_tdx_go_tdx_guest_spr_e4_at_2023_07_01(vectors: Path) -> None:
    c = tdx.verify_evidence(
        (vectors / GO / "tdx_prod_quote_SPR_E4.dat").read_bytes(), trust=PROD, now=T("2023-07-01T01:00:00Z")
    )
    assert c.measurements["mr_td"].hex() == (
        "6363b8043668a3ad953278e10389574d326c6749fb78aa810ecd9336923db86f22fc00b8dcd404bc10d5e119d7215cbb"
    )
    assert c.details["tee_tcb_svn"] == "03000400000000000000000000000000"
    assert c.details["td_attributes"] == "0000004000000000" and not c.debug
    assert c.details["fmspc"] == "50806f000000"


def test_tdx_go_tdx_guest_spr_e4_collateral_no_matching_level(vectors: Path) -> None:
    with pytest.raises(AttestationError, match="no matching TCB level"):
        tdx.verify_evidence(
            (vectors / GO / "tdx_prod_quote_SPR_E4.dat").read_bytes(),
            trust=PROD,
            collateral=(vectors / GO / "collateral_SPR_E4.assembled.json").read_bytes(),
            now=T("2023-07-01T01:00:00Z"),
        )


def test_tdx_go_tdx_guest_expired_at_2053(vectors: Path) -> None:
    with pytest.raises(AttestationError, match="not valid at 2053"):
        tdx.verify_evidence(
            (vectors / GO / "tdx_prod_quote_SPR_E4.dat").read_bytes(),
            trust=PROD,
            now=T("2053-07-01T01:00:00Z"),
        )


def test_tdx_quote_v5_sample(vectors: Path) -> None:
    c = tdx.verify_evidence(
        (vectors / GO / "quote_v5_sample.dat").read_bytes(), trust=PROD, now=T("2026-02-03T01:00:00Z")
    )
    assert c.details["quote_version"] == 5 and c.details["fmspc"] == "90c06f000000"
    assert c.measurements["mr_td"].hex() == (
        "7348651a34b2d2d3462822e3a750ec6110125f36757c78480bbfc69cc0d21fb001a1ced3ee19747dda8f750c3bc8f876"
    )


def test_tdx_tappd_hex_quote(vectors: Path) -> None:
    raw = bytes.fromhex((vectors / QVL / "quote-from-tappd.hex").read_text().strip())
    c = tdx.verify_evidence(raw, trust=PROD, now=T("2025-01-01T00:00:00Z"))
    assert c.measurements["mr_td"].hex() == (
        "c68518a0ebb42136c12b2275164f8c72f25fa9a34392228687ed6e9caeb9c0f1dbd895e9cf475121c029dc47e70e91fd"
    )


# --- CCEL ---------------------------------------------------------------------------------------------------


def test_tdx_cos_quote_ccel_replay_matches_rtmrs(vectors: Path) -> None:
    log = (vectors / GO / "ccel_data.dat").read_bytes()
    table = CCELTable.from_bytes((vectors / GO / "ccel_table.dat").read_bytes())
    assert table.log_area_minimum_length == len(log)
    c = tdx.verify_evidence(
        (vectors / GO / "cos-113-tdx-quote.dat").read_bytes(),
        trust=PROD,
        now=T("2024-08-01T00:00:00Z"),
        event_log=log,
    )
    assert c.details["event_log_replayed"] is True and c.details["event_count"] == 43
    assert c.report_data == bytes(64)
    assert c.measurements["mr_td"].hex() == (
        "dae67181d3d65e073ad8f95b7907d5e927bfe9761c9ff3e9b89734a45d8954dba41394c7717cb2735396c1d04231f94a"
    )
    assert replay_rtmrs(parse_event_log(log))[:3] == (
        c.measurements["rtmr0"],
        c.measurements["rtmr1"],
        c.measurements["rtmr2"],
    )


def test_tdx_tampered_event_log_refused(vectors: Path) -> None:
    log = bytearray((vectors / GO / "ccel_data.dat").read_bytes())
    events = parse_event_log(bytes(log))
    # flip one byte of the first RTMR2 event's digest
    target = next(e for e in events if e.mr_index == 3)
    pos = bytes(log).index(target.digest)
    log[pos] ^= 0x01
    with pytest.raises(AttestationError, match="rtmr2"):
        tdx.verify_evidence(
            (vectors / GO / "cos-113-tdx-quote.dat").read_bytes(),
            trust=PROD,
            now=T("2024-08-01T00:00:00Z"),
            event_log=bytes(log),
        )


def test_tdx_event_log_for_other_quote_refused(vectors: Path) -> None:
    with pytest.raises(AttestationError, match="rtmr0"):
        tdx.verify_evidence(
            (vectors / QVL / "tdx_quote").read_bytes(),
            trust=PROD,
            now=T("2025-06-19T11:00:00Z"),
            event_log=(vectors / GO / "ccel_data.dat").read_bytes(),
        )


def test_tdx_ccel_table_bad_checksum(vectors: Path) -> None:
    t = bytearray((vectors / GO / "ccel_table.dat").read_bytes())
    t[20] ^= 1
    with pytest.raises(EvidenceFormatError, match="checksum"):
        CCELTable.from_bytes(bytes(t))


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(0, 20000), pos=st.integers(0, 19999), x=st.integers(1, 255))
def test_tdx_fuzz_event_log_raises_only_format_error(cut: int, pos: int, x: int) -> None:
    from tests.attestation.conftest import VECTORS

    path = VECTORS / GO / "ccel_data.dat"
    base = path.read_bytes()[:20000] if path.exists() else build_event_log([(1, 1, b"x" * 100)] * 50)
    data = bytearray(base[:cut])
    if pos < len(data):
        data[pos] ^= x
    try:
        replay_rtmrs(parse_event_log(bytes(data)))
    except EvidenceFormatError:
        pass


# --- simulated TDs and policy -------------------------------------------------------------------------


def _claims(root: DCAPTestRoot, dev: TrustConfig, **kw: object) -> VerifiedClaims:
    kw.setdefault("report_data", b"\x07" * 64)
    ev = build_evidence(root, tee="tdx", **kw)  # type: ignore[arg-type]
    return tdx.verify_evidence(
        ev.evidence, trust=dev, collateral=ev.collateral, now=datetime.now(timezone.utc)
    )


def test_tdx_simulated_passes_policy(root: DCAPTestRoot, dev: TrustConfig) -> None:
    c = _claims(root, dev)
    policy = tdx.Policy(
        mr_td=measurement_pins([DEFAULT_MR_TD]),
        rtmr0=[bytes(48)],
        report_data=b"\x07" * 64,
        accepted_tcb_statuses={"UpToDate"},
    )
    assert tdx.validate_claims(c, policy) == []


def test_tdx_simulated_v5_td15(root: DCAPTestRoot, dev: TrustConfig) -> None:
    c = _claims(root, dev, quote_version=5)
    assert c.details["body"] == "td1.5" and c.tcb_status == "UpToDate"
    assert tdx.validate_claims(c, tdx.Policy(mr_td=[DEFAULT_MR_TD])) == []


def test_tdx_simulated_fails_production_trust(root: DCAPTestRoot) -> None:
    ev = build_evidence(root, tee="tdx", report_data=bytes(64))
    with pytest.raises(AttestationError, match="not allow-listed"):
        tdx.verify_evidence(ev.evidence, trust=PROD, collateral=ev.collateral, now=datetime.now(timezone.utc))


def test_tdx_debug_bit_set_refused(root: DCAPTestRoot, dev: TrustConfig) -> None:
    c = _claims(root, dev, debug=True)
    assert c.debug
    v = tdx.validate_claims(c, tdx.Policy(mr_td=[DEFAULT_MR_TD]))
    assert [x.field for x in v] == ["debug"]
    assert tdx.validate_claims(c, tdx.Policy(mr_td=[DEFAULT_MR_TD], allow_debug=True)) == []


def test_tdx_wrong_mrtd_refused(root: DCAPTestRoot, dev: TrustConfig) -> None:
    c = _claims(root, dev, measurement=hashlib.sha384(b"other image").digest())
    v = tdx.validate_claims(c, tdx.Policy(mr_td=[DEFAULT_MR_TD]))
    assert len(v) == 1 and v[0].field == "mr_td" and DEFAULT_MR_TD.hex() in v[0].want


def test_tdx_same_mrtd_different_rtmr_refused(root: DCAPTestRoot, dev: TrustConfig) -> None:
    events = [(1, 0x80000001, b"firmware"), (2, 0x0D, b"kernel"), (3, 0x0D, b"initrd")]
    good = replay_rtmrs(parse_event_log(build_event_log(events)))
    evil = replay_rtmrs(parse_event_log(build_event_log([*events[:1], (2, 0x0D, b"evil kernel"), events[2]])))
    policy = tdx.Policy(mr_td=[DEFAULT_MR_TD], rtmr1=[good[1]], rtmr2=[good[2]])
    assert tdx.validate_claims(_claims(root, dev, rtmrs=good), policy) == []
    v = tdx.validate_claims(_claims(root, dev, rtmrs=evil), policy)
    assert [x.field for x in v] == ["rtmr1"] and v[0].got == evil[1].hex()


def test_tdx_simulated_event_log_replays(root: DCAPTestRoot, dev: TrustConfig) -> None:
    log = build_event_log([(1, 0x80000001, b"fw"), (3, 0x0D, b"cmdline")])
    rtmrs = replay_rtmrs(parse_event_log(log))
    ev = build_evidence(root, tee="tdx", report_data=bytes(64), rtmrs=rtmrs)
    now = datetime.now(timezone.utc)
    c = tdx.verify_evidence(ev.evidence, trust=dev, now=now, event_log=log)
    assert c.details["event_log_replayed"] is True
    with pytest.raises(AttestationError, match="rtmr2"):
        tdx.verify_evidence(
            ev.evidence, trust=dev, now=now, event_log=build_event_log([(1, 0x80000001, b"fw")])
        )


def test_tdx_report_data_binding_another_key_refused(root: DCAPTestRoot, dev: TrustConfig) -> None:
    c = _claims(root, dev, report_data=b"\x01" * 64)
    v = tdx.validate_claims(c, tdx.Policy(mr_td=[DEFAULT_MR_TD], report_data=b"\x02" * 64))
    assert [x.field for x in v] == ["report_data"]


def test_tdx_unknown_tcb_fails_only_policy_with_minimum(root: DCAPTestRoot, dev: TrustConfig) -> None:
    ev = build_evidence(root, tee="tdx", report_data=bytes(64))
    c = tdx.verify_evidence(ev.evidence, trust=dev, now=datetime.now(timezone.utc))
    assert c.tcb_status == "unknown"
    assert tdx.validate_claims(c, tdx.Policy(mr_td=[DEFAULT_MR_TD])) == []
    v = tdx.validate_claims(c, tdx.Policy(mr_td=[DEFAULT_MR_TD], accepted_tcb_statuses=["UpToDate"]))
    assert [x.field for x in v] == ["tcb_status"]


def test_tdx_out_of_date_tcb_refused_by_policy(root: DCAPTestRoot, dev: TrustConfig) -> None:
    c = _claims(root, dev, tcb_status="OutOfDate", advisories=["INTEL-SA-00837"])
    assert c.tcb_status == "OutOfDate" and c.advisories == ("INTEL-SA-00837",)
    v = tdx.validate_claims(
        c, tdx.Policy(mr_td=[DEFAULT_MR_TD], accepted_tcb_statuses={"UpToDate", "SWHardeningNeeded"})
    )
    assert [x.field for x in v] == ["tcb_status"]


def test_tdx_policy_collects_every_violation(root: DCAPTestRoot, dev: TrustConfig) -> None:
    c = _claims(root, dev, debug=True, mr_config_id=b"\x05" * 48)
    policy = tdx.Policy(
        mr_td=["ab" * 48],
        rtmr3=["cd" * 48],
        mr_config_id="00" * 48,
        mr_owner="11" * 48,
        report_data=bytes(64),
    )
    fields = {v.field for v in tdx.validate_claims(c, policy)}
    assert fields == {"debug", "mr_td", "rtmr3", "mr_config_id", "mr_owner", "report_data"}


def test_tdx_sgx_quote_refused_by_tdx_backend(root: DCAPTestRoot, dev: TrustConfig) -> None:
    ev = build_evidence(root, tee="sgx", report_data=bytes(64))
    with pytest.raises(AttestationError, match="not a TDX quote"):
        tdx.verify_evidence(ev.evidence, trust=dev, now=datetime.now(timezone.utc))


def test_tdx_policy_from_dict_and_pins() -> None:
    p = tdx.Policy.from_dict(
        {"mr_td": ["aa" * 48], "rtmr0": ["bb" * 48], "accepted_tcb_statuses": ["UpToDate"]}
    )
    assert p.mr_td == frozenset({bytes.fromhex("aa" * 48)}) and p.rtmr0 == frozenset(
        {bytes.fromhex("bb" * 48)}
    )
    with pytest.raises(ValueError, match="empty measurement allow-list"):
        tdx.Policy(mr_td=[])
    with pytest.raises(ValueError, match="48 bytes"):
        tdx.Policy(mr_td=["aa" * 32])
    with pytest.raises(ValueError, match="unknown policy keys"):
        tdx.Policy.from_dict({"mr_td": ["aa" * 48], "mrtd": "x"})
    with pytest.raises(ValueError, match="needs mr_td"):
        tdx.Policy.from_dict({})
    with pytest.raises(ValueError, match="accepted_tcb_statuses"):
        tdx.Policy(mr_td=["aa" * 48], accepted_tcb_statuses=["Fine"])
    with pytest.warns(UserWarning, match="UNSAFE_ANY_MEASUREMENT"):
        assert tdx.Policy.from_dict({"mr_td": "UNSAFE_ANY"}).mr_td is UNSAFE_ANY_MEASUREMENT
