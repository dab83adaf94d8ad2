"""``/dev/sev-guest``: the SNP_GET_REPORT ioctl (Linux ``include/uapi/linux/sev-guest.h``).

    report = collect_sev_guest(binding.report_data(), vmpl=0)   # doctest: +SKIP

Structures (uapi ``sev-guest.h``; x86-64 layout)::

    struct snp_report_req { __u8 user_data[64]; __u32 vmpl; __u8 rsvd[28]; };            // 96 bytes
    struct snp_report_resp { __u8 data[4000]; };
    struct snp_guest_request_ioctl { __u8 msg_version; __u64 req_data; __u64 resp_data;
                                     union { __u64 exitinfo2; struct { __u32 fw_error, vmm_error; }; }; };
    #define SNP_GET_REPORT _IOWR('S', 0x0, struct snp_guest_request_ioctl)

``resp.data`` holds the firmware's MSG_REPORT_RSP (SEV-SNP ABI spec 56860, table "MSG_REPORT_RSP"):
``status u32 || report_size u32 || reserved[24] || report``.

What it does NOT do: fetch the VCEK (the extended request is deprecated in favour of configfs-tsm's
auxblob; pass the certificates as files or let the verifier's fetcher get them), or verify anything.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from ray_confidential.attestation.collect import CollectionError
from ray_confidential.attestation.evidence import Evidence

SEV_GUEST_PATH: Final = Path("/dev/sev-guest")
REPORT_DATA_SIZE: Final = 64
RESP_DATA_SIZE: Final = 4000
MSG_REPORT_RSP_HEADER: Final = 0x20
"""Offset of the report inside MSG_REPORT_RSP (status, report_size, 24 reserved bytes)."""
MAX_VMPL: Final = 3


class SNPReportReq(ctypes.Structure):
    _fields_ = [("user_data", ctypes.c_uint8 * 64), ("vmpl", ctypes.c_uint32), ("rsvd", ctypes.c_uint8 * 28)]


class SNPReportResp(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint8 * RESP_DATA_SIZE)]


class SNPGuestRequestIoctl(ctypes.Structure):
    _fields_ = [
        ("msg_version", ctypes.c_uint8),
        ("req_data", ctypes.c_uint64),
        ("resp_data", ctypes.c_uint64),
        ("exitinfo2", ctypes.c_uint64),
    ]


def _iowr(kind: int, number: int, size: int) -> int:
    """Linux ``_IOWR`` (asm-generic/ioctl.h): dir 3 << 30 | size << 16 | type << 8 | nr."""
    return (3 << 30) | (size << 16) | (kind << 8) | number


SNP_GET_REPORT: Final = _iowr(ord("S"), 0x0, ctypes.sizeof(SNPGuestRequestIoctl))
"""0xC0205300 on x86-64."""

Ioctl = Callable[[int, int, Any, bool], Any]


def collect_sev_guest(
    report_data: bytes,
    *,
    vmpl: int,
    device: Path = SEV_GUEST_PATH,
    ioctl: Ioctl = fcntl.ioctl,
    msg_version: int = 1,
) -> bytes:
    """Ask the SNP firmware for an ATTESTATION_REPORT binding ``report_data`` at ``vmpl``.

    Args:
        report_data: the 64 bytes the report signs.
        vmpl: the VMPL to request (0..3); say it deliberately (the verifier pins it).
        device: the sev-guest character device.
        ioctl: ``fcntl.ioctl`` or a test double with its signature.
        msg_version: guest message version (1).

    Returns:
        The raw report (1184 bytes for versions 2, 3 and 5).

    Raises:
        ValueError: wrong ``report_data`` size or ``vmpl``.
        CollectionError: the ioctl failed (with the firmware / VMM error codes) or the response is
            malformed.
    """
    if len(report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    if not 0 <= vmpl <= MAX_VMPL:
        raise ValueError(f"vmpl must be 0..{MAX_VMPL}, got {vmpl}")
    req = SNPReportReq()
    ctypes.memmove(req.user_data, report_data, REPORT_DATA_SIZE)
    req.vmpl = vmpl
    resp = SNPReportResp()
    msg = SNPGuestRequestIoctl(
        msg_version=msg_version, req_data=ctypes.addressof(req), resp_data=ctypes.addressof(resp), exitinfo2=0
    )
    fd = os.open(device, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        ioctl(fd, SNP_GET_REPORT, msg, True)
    except OSError as exc:
        fw_error, vmm_error = msg.exitinfo2 & 0xFFFFFFFF, msg.exitinfo2 >> 32
        raise CollectionError(
            f"SNP_GET_REPORT failed: {exc.strerror or exc} (fw_error {fw_error:#x}, vmm_error {vmm_error:#x})"
        ) from None
    finally:
        os.close(fd)
    data = bytes(resp.data)
    status, size = struct.unpack_from("<II", data)
    if status != 0:
        raise CollectionError(f"SNP_GET_REPORT: firmware status {status:#x}")
    if not 0 < size <= RESP_DATA_SIZE - MSG_REPORT_RSP_HEADER:
        raise CollectionError(f"SNP_GET_REPORT: report size {size} out of range")
    return data[MSG_REPORT_RSP_HEADER : MSG_REPORT_RSP_HEADER + size]


def collect_sev_guest_evidence(
    report_data: bytes, *, vmpl: int, certs: tuple[bytes, ...] = (), **kw: Any
) -> Evidence:
    """:func:`collect_sev_guest` wrapped as :class:`Evidence` (``certs``: VCEK and chain, if known)."""
    return Evidence(tee="sev-snp", evidence=collect_sev_guest(report_data, vmpl=vmpl, **kw), certs=certs)


__all__ = ["SNP_GET_REPORT", "collect_sev_guest", "collect_sev_guest_evidence"]
