"""`ray-confidential evidence verify`: exit codes 0/1/2, JSON keys, input forms, on genuine vectors."""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ray_confidential.attestation import cli, registry

AVAILABLE = set(registry.available())
COMMON_KEYS = {"tee", "verdict", "violations", "debug", "report_data", "tcb_status", "advisories"}
REPO = Path(__file__).resolve().parents[2]


def run(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="ray-confidential")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def run_json(*argv: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(*argv, "--json")
    return code, json.loads(out)


def need(tee: str) -> None:
    if tee not in AVAILABLE:
        pytest.skip(f"{tee} backend not built")


@pytest.fixture()
def snp(vectors: Path) -> list[str]:
    need("sev-snp")
    base = vectors / "sev-snp" / "virtee-sev"
    return ["evidence", "verify", "--tee", "sev-snp", str(base / "report_milan.hex"),
            "--cert", str(base / "vcek_milan.der"), "--cert", str(base / "cert_chain_milan"),
            "--at", "2024-06-01T00:00:00Z"]  # fmt: skip


def test_snp_milan_sample_verifies_exit_0(snp: list[str]) -> None:
    code, report = run_json(*snp)
    assert code == 0
    assert COMMON_KEYS | {"measurement"} <= set(report)
    assert report["tee"] == "sev-snp" and report["verdict"] == "accepted" and report["violations"] == []
    assert report["debug"] is False
    assert report["tcb_status"] == "unknown"  # no --collateral
    assert report["advisories"] == []
    assert report["measurement"] == (
        "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"
    )
    assert (
        report["report_data"].startswith("d447b55d197491bf")
        and report["report_data"] == report["report_data"].lower()
    )
    assert report["root"] == "amd-ark-milan"


def test_snp_table_output(snp: list[str]) -> None:
    code, out, _ = run(*snp)
    assert code == 0
    assert out.splitlines()[0].startswith("verdict") and "ACCEPTED" in out and "ANY measurement" in out
    assert "7a1e5c266c0108db" in out


def test_snp_raw_report_and_offset_time(snp: list[str], tmp_path: Path) -> None:
    raw = tmp_path / "report.bin"
    raw.write_bytes(bytes.fromhex(Path(snp[4]).read_text().strip()))
    argv = snp.copy()
    argv[4] = str(raw)
    argv[-1] = "2024-06-01T02:00:00+02:00"
    code, report = run_json(*argv)
    assert code == 0 and report["at"] == "2024-06-01T00:00:00Z"


def test_snp_pem_bundle_of_all_certs(snp: list[str], tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    vcek = x509.load_der_x509_certificate(Path(snp[6]).read_bytes())
    bundle = tmp_path / "bundle.pem"  # ASK, ARK and the VCEK in one PEM file, any order
    bundle.write_bytes(Path(snp[8]).read_bytes() + vcek.public_bytes(Encoding.PEM))
    code, _ = run_json(*snp[:5], "--cert", str(bundle), "--at", "2024-06-01T00:00:00Z")
    assert code == 0


def test_snp_debug_sample_exit_1_with_reason(vectors: Path) -> None:
    need("sev-snp")
    base = vectors / "sev-snp" / "go-sev-guest"
    code, report = run_json("evidence", "verify", "--tee", "sev-snp", str(base / "attestation.bin"),
                            "--cert", str(base / "vcek.testcer"), "--cert", str(base / "milan.testcer"),
                            "--at", "2022-09-24T01:00:00Z")  # fmt: skip
    assert code == 1 and report["verdict"] == "rejected" and report["debug"] is True
    assert [v["field"] for v in report["violations"]] == ["debug"]


def test_snp_tampered_report_exit_1(snp: list[str], tmp_path: Path) -> None:
    data = bytearray(bytes.fromhex(Path(snp[4]).read_text().strip()))
    data[0x50] ^= 0x01  # inside REPORT_DATA: signed bytes
    bad = tmp_path / "tampered.bin"
    bad.write_bytes(bytes(data))
    argv = snp.copy()
    argv[4] = str(bad)
    code, report = run_json(*argv)
    assert code == 1 and report["verdict"] == "rejected" and "verification failed" in report["error"]


def test_snp_policy_file_pins_another_measurement_exit_1(snp: list[str], tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nname: strict\ntees:\n  sev-snp:\n    measurements: ['" + "00" * 48 + "']\n"
    )
    code, report = run_json(*snp, "--policy", str(policy))
    assert code == 1 and report["policy"] == "strict"
    (v,) = report["violations"]
    assert v["field"] == "measurement" and v["got"].startswith("7a1e5c26") and "00" * 48 in v["want"]


def test_snp_policy_file_accepts_exit_0(snp: list[str]) -> None:
    code, report = run_json(*snp, "--policy", str(REPO / "docs" / "policy-example.yaml"))
    assert code == 0 and report["policy"] == "example-prod"


def test_policy_example_file_matches_the_docs() -> None:
    import re

    (block,) = re.findall(r"```yaml\n(.*?)```", (REPO / "docs/attestation-policy.md").read_text(), re.DOTALL)
    example = (REPO / "docs/policy-example.yaml").read_text()
    assert example.split("\n", 1)[1] == block


def test_expired_vcek_exit_1(snp: list[str]) -> None:
    code, report = run_json(*snp[:-1], "2099-01-01T00:00:00Z")
    assert code == 1 and report["verdict"] == "rejected"


def test_tdx_with_collateral(vectors: Path) -> None:
    need("tdx")
    base = vectors / "tdx" / "dcap-qvl"
    code, report = run_json("evidence", "verify", "--tee", "tdx", str(base / "tdx_quote"),
                            "--collateral", str(base / "tdx_quote_collateral.json"), "--at", "2025-07-01T00:00:00Z")  # fmt: skip
    assert code == 0
    assert COMMON_KEYS | {"mr_td", "rtmrs"} <= set(report)
    assert report["tcb_status"] == "UpToDate" and report["advisories"] == []
    assert report["mr_td"].startswith("91eb2b44d141d4ec") and len(report["rtmrs"]) == 4
    assert report["rtmrs"][0].startswith("44c0197b")


def test_tdx_hex_quote_without_collateral_is_tcb_unknown(vectors: Path) -> None:
    need("tdx")
    code, report = run_json("evidence", "verify", "--tee", "tdx", str(vectors / "tdx/dcap-qvl/quote-from-tappd.hex"),
                            "--at", "2025-01-01T00:00:00Z")  # fmt: skip
    assert code == 0 and report["tcb_status"] == "unknown"
    assert report["mr_td"].startswith("c68518a0ebb42136")


def test_sgx_with_collateral(vectors: Path) -> None:
    need("sgx")
    base = vectors / "sgx-dcap" / "dcap-qvl"
    code, report = run_json("evidence", "verify", "--tee", "sgx", str(base / "sgx_quote"),
                            "--collateral", str(base / "sgx_quote_collateral.json"), "--at", "2025-07-01T00:00:00Z")  # fmt: skip
    assert code == 0  # the inspection policy does not check the TCB
    assert COMMON_KEYS | {"mr_enclave", "mr_signer"} <= set(report)
    assert report["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert report["advisories"] == ["INTEL-SA-00289", "INTEL-SA-00615"]
    assert report["mr_enclave"] == "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    assert report["mr_signer"] == "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"


@pytest.mark.parametrize("encoding", ["base64", "raw"])
def test_nitro_debug_document_exit_1_with_pcrs(vectors: Path, tmp_path: Path, encoding: str) -> None:
    need("nitro")
    path = vectors / "nitro/EternisAI-remote-attestation-verifier/example_attestation"
    if encoding == "raw":
        raw = tmp_path / "doc.cbor"
        raw.write_bytes(base64.b64decode(path.read_bytes()))
        path = raw
    code, report = run_json("evidence", "verify", "--tee", "nitro", str(path), "--at", "2024-09-06T05:00:00Z")
    assert code == 1 and report["debug"] is True
    assert "debug" in [v["field"] for v in report["violations"]]
    assert COMMON_KEYS | {"pcrs"} <= set(report)
    assert report["pcrs"]["0"] == "00" * 48 and report["pcrs"]["3"].startswith("671ca1e3")


def test_nvidia_report(vectors: Path) -> None:
    need("nvidia-gpu")
    base = vectors / "nvidia-gpu/nvtrust"
    code, report = run_json("evidence", "verify", "--tee", "nvidia-gpu", str(base / "hopperAttestationReport.txt"),
                            "--cert", str(base / "hopperCertChain.txt"), "--at", "2024-06-01T00:00:00Z")  # fmt: skip
    assert code == 0 and report["root"] == "nvidia-device-identity-ca"
    assert report["report_data"] == "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb"


def test_simulated_evidence_is_refused_by_the_cli(tmp_path: Path) -> None:
    """The CLI trusts vendor roots only: a simulated TEE's report fails (exit 1)."""
    from ray_confidential.attestation.binding import Binding
    from ray_confidential.testing.simulated import SimulatedTEE, available_kinds

    kind = next(k for k in ("sev-snp", "nitro", "tdx", "sgx") if k in AVAILABLE and k in available_kinds())
    ev = SimulatedTEE(kind).evidence(Binding(nonce=bytes(32), executor_public_key=b"k", hpke_suite="s",
                                             cluster_id="c", bundle_digest=bytes(32)))  # fmt: skip
    (tmp_path / "ev").write_bytes(ev.evidence)
    certs = []
    for i, c in enumerate(ev.certs):
        (tmp_path / f"c{i}").write_bytes(c)
        certs += ["--cert", str(tmp_path / f"c{i}")]
    code, report = run_json("evidence", "verify", "--tee", kind, str(tmp_path / "ev"), *certs)
    assert code == 1 and report["verdict"] == "rejected"


# ---- unusable input: exit 2 --------------------------------------------------------------------------


def test_tee_mismatch_exit_2(snp: list[str]) -> None:
    for other in ("tdx", "nitro"):
        argv = snp.copy()
        argv[3] = other
        code, report = run_json(*argv)
        assert code == 2 and report["verdict"] == "unusable" and "looks like sev-snp" in report["error"]


@pytest.mark.parametrize("at", ["2024-06-01T00:00:00", "yesterday", "2024-13-01T00:00:00Z"])
def test_bad_time_exit_2(snp: list[str], at: str) -> None:
    code, _, err = run(*snp[:-1], at)
    assert code == 2 and "--at" in err


def test_missing_and_malformed_files_exit_2(snp: list[str], tmp_path: Path) -> None:
    argv = snp.copy()
    argv[4] = str(tmp_path / "missing")
    assert run(*argv)[0] == 2
    (tmp_path / "junk").write_bytes(b"\x00\x01garbage")
    argv[4] = str(tmp_path / "junk")
    code, report = run_json(*argv)
    assert code == 2 and "malformed" in report["error"]
    truncated = tmp_path / "short.hex"
    truncated.write_text(Path(snp[4]).read_text().strip()[:1000])
    argv[4] = str(truncated)
    assert run(*argv)[0] == 2
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    argv[4] = str(empty)
    assert run(*argv)[0] == 2


def test_bad_cert_file_exit_2(snp: list[str], tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate")
    code, _, err = run(*snp, "--cert", str(tmp_path / "bad.pem"))
    assert code == 2 and "neither DER nor PEM" in err


@pytest.mark.parametrize(
    "text", ["version: 1\ntees: {}\n", "tees: [unclosed", "version: 1\ntees:\n  sev-snp: {}\n"]
)
def test_bad_policy_file_exit_2(snp: list[str], tmp_path: Path, text: str) -> None:
    (tmp_path / "p.yaml").write_text(text)
    code, report = run_json(*snp, "--policy", str(tmp_path / "p.yaml"))
    assert code == 2 and report["verdict"] == "unusable"


def test_argument_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        run("evidence", "verify", "--tee", "sev", "x")
    assert info.value.code == 2


def test_module_entry_point_subprocess_and_light_imports(snp: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "ray_confidential.attestation.cli", *snp, "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verdict"] == "accepted"
    assert proc.stderr == ""  # no warnings on stderr (the VCEK serial-0 warning is silenced narrowly)
    probe = ("import sys, runpy; sys.argv = ['x'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('ray_confidential.attestation.cli', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print(sorted(m for m in ('ray', 'torch', 'numpy') if m in sys.modules))")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", probe, *snp], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
