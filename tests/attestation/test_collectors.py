"""Guest-side collectors against emulated kernel interfaces (configfs-tsm, sev-guest, Gramine, NSM)."""

from __future__ import annotations

import ctypes
import struct
import uuid
from pathlib import Path
from typing import Any

import cbor2
import pytest

from ray_confidential.attestation import registry
from ray_confidential.attestation.attest import attest
from ray_confidential.attestation.binding import Binding
from ray_confidential.attestation.collect import CollectionError, available_interfaces
from ray_confidential.attestation.collect.configfs_tsm import (
    SNP_CERT_GUIDS,
    FileOps,
    collect_configfs_tsm,
    parse_snp_cert_table,
)
from ray_confidential.attestation.collect.gramine import collect_gramine
from ray_confidential.attestation.collect.nsm import NSM_IOCTL_RAW, NSMRaw, collect_nsm, collect_nsm_evidence
from ray_confidential.attestation.collect.sev_guest import (
    SNP_GET_REPORT,
    SNPGuestRequestIoctl,
    collect_sev_guest,
    collect_sev_guest_evidence,
)
from ray_confidential.attestation.evidence import Evidence
from ray_confidential.attestation.policy import AppraisalPolicy
from ray_confidential.testing.simulated import DevRootOfTrust, SimulatedTEE, available_kinds
from tests.attestation.fake_kernel import FakeTSM, snp_maker

B = Binding(nonce=b"\x31" * 32, executor_public_key=b"\x32" * 32, hpke_suite="X25519-HKDF-SHA256-AES-256-GCM",
            cluster_id="cluster", bundle_digest=b"\x33" * 32)  # fmt: skip
SNP = "sev-snp" in available_kinds() and "sev-snp" in registry.available()
NITRO = "nitro" in available_kinds() and "nitro" in registry.available()


def cert_table(certs: dict[str, bytes]) -> bytes:
    names = {v: k for k, v in SNP_CERT_GUIDS.items()}
    header = (len(certs) + 1) * 24
    entries, blobs, offset = b"", b"", header
    for name, der in certs.items():
        entries += struct.pack("<16sII", uuid.UUID(names[name]).bytes, offset, len(der))
        blobs += der
        offset += len(der)
    return entries + bytes(24) + blobs


# ---- configfs-tsm ------------------------------------------------------------------------------------


@pytest.mark.skipif(not SNP, reason="sev-snp backend or simulator not built")
def test_configfs_tsm_snp_report_attests_end_to_end(tmp_path: Path) -> None:
    dev = DevRootOfTrust.for_process()
    ops = FakeTSM("sev_guest", snp_maker(dev.root("sev-snp")))
    report = collect_configfs_tsm(B.report_data(), privlevel=0, base=tmp_path, ops=ops)
    assert report.provider == "sev_guest" and report.generation == 2 and report.privlevel == 0
    assert ("privlevel", b"0") in ops.writes and ("inblob", B.report_data()) in ops.writes
    evidence = report.to_evidence()
    assert evidence.tee == "sev-snp" and len(evidence.certs) >= 2
    claims = attest(evidence, profile="snp-direct", trust=dev.trust_config(["sev-snp"]), expected_binding=B,
                    policy=AppraisalPolicy.from_measurements({"sev-snp": [SimulatedTEE("sev-snp").measurement]}))  # fmt: skip
    assert claims.details["vmpl"] == 0
    assert ops.removed == ops.instances and not any(tmp_path.iterdir())


def _static(out: bytes = b"\x01" * 100, aux: bytes | None = None) -> Any:
    return lambda inblob, privlevel: (out, aux)


def test_configfs_tsm_concurrent_writer_refused(tmp_path: Path) -> None:
    ops = FakeTSM("tdx_guest", _static(), privlevel_floor=None, interfere=True)
    with pytest.raises(CollectionError, match="another writer"):
        collect_configfs_tsm(B.report_data(), privlevel=None, base=tmp_path, ops=ops)
    assert ops.removed == ops.instances  # the instance is removed on failure too


def test_configfs_tsm_tdx_without_privlevel(tmp_path: Path) -> None:
    ops = FakeTSM("tdx_guest", _static(b"quote"), privlevel_floor=None)
    report = collect_configfs_tsm(B.report_data(), privlevel=None, base=tmp_path, ops=ops)
    assert report.outblob == b"quote" and report.auxblob is None and report.generation == 1
    assert report.to_evidence() == Evidence(tee="tdx", evidence=b"quote")
    with pytest.raises(ValueError, match="has no privlevel"):
        collect_configfs_tsm(B.report_data(), privlevel=0, base=tmp_path, ops=ops)


def test_configfs_tsm_privlevel_must_be_chosen_deliberately(tmp_path: Path) -> None:
    ops = FakeTSM("sev_guest", _static())
    with pytest.raises(ValueError, match="deliberately"):
        collect_configfs_tsm(B.report_data(), privlevel=None, base=tmp_path, ops=ops)
    ops = FakeTSM("sev_guest", _static(), privlevel_floor=2)
    with pytest.raises(ValueError, match="below privlevel_floor 2"):
        collect_configfs_tsm(B.report_data(), privlevel=1, base=tmp_path, ops=ops)
    with pytest.raises(ValueError, match=r"privlevel must be 0\.\.3"):
        collect_configfs_tsm(B.report_data(), privlevel=4, base=tmp_path, ops=ops)
    assert ops.removed == ops.instances


def test_configfs_tsm_one_instance_per_request(tmp_path: Path) -> None:
    ops = FakeTSM("tdx_guest", _static(), privlevel_floor=None)
    for _ in range(3):
        collect_configfs_tsm(B.report_data(), privlevel=None, base=tmp_path, ops=ops)
    assert len(set(ops.instances)) == 3 and ops.removed == ops.instances


@pytest.mark.parametrize("out", [b"", b"\x00" * (32 * 1024 + 1)])
def test_configfs_tsm_bad_outblob_refused(tmp_path: Path, out: bytes) -> None:
    ops = FakeTSM("tdx_guest", _static(out), privlevel_floor=None)
    with pytest.raises(CollectionError, match="outblob"):
        collect_configfs_tsm(B.report_data(), privlevel=None, base=tmp_path, ops=ops)


def test_configfs_tsm_real_file_ops_on_a_plain_tree(tmp_path: Path) -> None:
    # The real FileOps against a tree the kernel would populate: mkdir works, provider is missing.
    with pytest.raises(FileNotFoundError):
        collect_configfs_tsm(B.report_data(), privlevel=None, base=tmp_path)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="64 bytes"):
        collect_configfs_tsm(b"short", privlevel=None, base=tmp_path)


def test_snp_cert_table_parsing() -> None:
    table = cert_table({"vcek": b"V" * 10, "ask": b"A" * 5, "ark": b"R" * 7})
    assert parse_snp_cert_table(table) == {"vcek": b"V" * 10, "ask": b"A" * 5, "ark": b"R" * 7}
    with pytest.raises(CollectionError, match="terminating"):
        parse_snp_cert_table(table[:23])
    bad = struct.pack("<16sII", uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes, 48, 1000) + bytes(24)
    with pytest.raises(CollectionError, match="out of range"):
        parse_snp_cert_table(bad)


# ---- /dev/sev-guest ----------------------------------------------------------------------------------


def _sev_ioctl(report: bytes, status: int = 0, seen: dict[str, Any] | None = None) -> Any:
    def ioctl(fd: int, request: int, arg: Any, mutate: bool) -> int:
        assert request == SNP_GET_REPORT == 0xC0205300 and mutate
        msg = SNPGuestRequestIoctl.from_buffer_copy(bytes(arg))
        req = ctypes.string_at(msg.req_data, 96)
        if seen is not None:
            seen.update(
                user_data=req[:64], vmpl=struct.unpack_from("<I", req, 64)[0], version=msg.msg_version
            )
        resp = struct.pack("<II", status, len(report)) + bytes(24) + report
        ctypes.memmove(msg.resp_data, resp, len(resp))
        return 0

    return ioctl


def test_sev_guest_ioctl_layout_and_report(tmp_path: Path) -> None:
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    seen: dict[str, Any] = {}
    report = collect_sev_guest(
        B.report_data(), vmpl=2, device=device, ioctl=_sev_ioctl(b"R" * 1184, seen=seen)
    )
    assert report == b"R" * 1184
    assert seen == {"user_data": B.report_data(), "vmpl": 2, "version": 1}


def test_sev_guest_errors(tmp_path: Path) -> None:
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    with pytest.raises(CollectionError, match="firmware status 0x16"):
        collect_sev_guest(B.report_data(), vmpl=0, device=device, ioctl=_sev_ioctl(b"R", status=0x16))

    def failing(fd: int, request: int, arg: Any, mutate: bool) -> int:
        raise OSError(5, "Input/output error")

    with pytest.raises(CollectionError, match="SNP_GET_REPORT failed"):
        collect_sev_guest(B.report_data(), vmpl=0, device=device, ioctl=failing)
    with pytest.raises(ValueError, match="vmpl"):
        collect_sev_guest(B.report_data(), vmpl=4, device=device)
    with pytest.raises(CollectionError, match="failed"):  # a regular file is no sev-guest device
        collect_sev_guest(B.report_data(), vmpl=0, device=device)


@pytest.mark.skipif(not SNP, reason="sev-snp backend or simulator not built")
def test_sev_guest_report_attests(tmp_path: Path) -> None:
    device = tmp_path / "sev-guest"
    device.write_bytes(b"")
    sim = SimulatedTEE("sev-snp").evidence(B)
    ev = collect_sev_guest_evidence(B.report_data(), vmpl=0, device=device, ioctl=_sev_ioctl(sim.evidence),
                                    certs=sim.certs)  # fmt: skip
    attest(ev, profile="snp-direct", trust=DevRootOfTrust.for_process().trust_config(["sev-snp"]), expected_binding=B,
           policy=AppraisalPolicy.from_measurements({"sev-snp": [SimulatedTEE("sev-snp").measurement]}))  # fmt: skip


# ---- Gramine /dev/attestation ------------------------------------------------------------------------


class FakeGramine(FileOps):
    def __init__(self, kind: str = "dcap") -> None:
        self.kind = kind

    def read(self, path: Path) -> bytes:
        if path.name == "quote":
            return b"QUOTE:" + (path.parent / "user_report_data").read_bytes()
        if path.name == "attestation_type":
            return self.kind.encode() + b"\n"
        return path.read_bytes()


def test_gramine_writes_report_data_then_reads_quote(tmp_path: Path) -> None:
    (tmp_path / "user_report_data").write_bytes(b"")  # Gramine's pseudo-file exists; we only write it
    ev = collect_gramine(B.report_data(), base=tmp_path, ops=FakeGramine())
    assert ev == Evidence(tee="sgx", evidence=b"QUOTE:" + B.report_data())
    assert (tmp_path / "user_report_data").read_bytes() == B.report_data()


def test_gramine_without_dcap_refused(tmp_path: Path) -> None:
    with pytest.raises(CollectionError, match="'none'"):
        collect_gramine(B.report_data(), base=tmp_path, ops=FakeGramine("none"))
    with pytest.raises(ValueError, match="64 bytes"):
        collect_gramine(b"x", base=tmp_path, ops=FakeGramine())


# ---- /dev/nsm ----------------------------------------------------------------------------------------


def _nsm_ioctl(answer: Any) -> Any:
    def ioctl(fd: int, request: int, arg: Any, mutate: bool) -> int:
        assert request == NSM_IOCTL_RAW == 0xC0200A00
        raw = NSMRaw.from_buffer_copy(bytes(arg))
        request_msg = cbor2.loads(ctypes.string_at(raw.request.addr, raw.request.len))
        response = cbor2.dumps(answer(request_msg["Attestation"]))
        assert len(response) <= raw.response.len
        ctypes.memmove(raw.response.addr, response, len(response))
        arg.response.len = len(response)  # the driver writes the length back
        return 0

    return ioctl


@pytest.mark.skipif(not NITRO, reason="nitro backend or simulator not built")
def test_nsm_document_attests_end_to_end(tmp_path: Path) -> None:
    from ray_confidential.testing import nitro_fake

    device = tmp_path / "nsm"
    device.write_bytes(b"")
    dev = DevRootOfTrust.for_process()
    pcr0 = SimulatedTEE("nitro").measurement

    def answer(req: dict[str, Any]) -> dict[str, Any]:
        fake = nitro_fake.build_evidence(dev.root("nitro"), report_data=req["user_data"], nonce=req["nonce"],
                                         measurement=pcr0)  # fmt: skip
        return {"Attestation": {"document": fake.evidence}}

    ev = collect_nsm_evidence(B.report_data(), B.nonce, device=device, ioctl=_nsm_ioctl(answer))
    attest(ev, profile="nitro", trust=dev.trust_config(["nitro"]), expected_binding=B,
           policy=AppraisalPolicy.from_measurements({"nitro": [pcr0]}))  # fmt: skip


def test_nsm_error_and_malformed_responses(tmp_path: Path) -> None:
    device = tmp_path / "nsm"
    device.write_bytes(b"")
    with pytest.raises(CollectionError, match="InvalidArgument"):
        collect_nsm(
            user_data=b"u",
            nonce=b"n",
            device=device,
            ioctl=_nsm_ioctl(lambda r: {"Error": "InvalidArgument"}),
        )
    with pytest.raises(CollectionError, match=r"no Attestation\.document"):
        collect_nsm(
            user_data=b"u", nonce=b"n", device=device, ioctl=_nsm_ioctl(lambda r: {"Attestation": {}})
        )
    with pytest.raises(ValueError, match="user_data must be at most 512"):
        collect_nsm(user_data=b"u" * 513, nonce=None, device=device)


def test_available_interfaces(tmp_path: Path) -> None:
    assert available_interfaces(tmp_path) == []
    (tmp_path / "sys/kernel/config/tsm/report").mkdir(parents=True)
    (tmp_path / "dev/attestation").mkdir(parents=True)
    (tmp_path / "dev/attestation/quote").write_bytes(b"")
    (tmp_path / "dev/nsm").write_bytes(b"")
    assert available_interfaces(tmp_path) == ["configfs-tsm", "gramine", "nsm"]
