"""TDX CCEL event log: ACPI CCEL table, TCG crypto-agile event log, and RTMR replay.

Formats: ACPI 6.5 section 5.2.35 "Confidential Computing Event Log Table (CCEL)"; TCG PC Client Platform
Firmware Profile 2.0, section 10.2 (TCG_PCR_EVENT / TCG_PCR_EVENT2, "Spec ID Event03"); UEFI 2.10
section 38.4 (EFI_CC_MEASUREMENT_PROTOCOL: MR index 0 = MRTD, 1..4 = RTMR0..RTMR3). RTMR[i] starts at
48 zero bytes and each extension is RTMR[i] = SHA-384(RTMR[i] || digest) (TDX module ABI, TDG.MR.RTMR.EXTEND).

    >>> log = build_event_log([(1, 0x80000001, b"firmware blob")])
    >>> rtmrs = replay_rtmrs(parse_event_log(log))
    >>> rtmrs[0] == hashlib.sha384(bytes(48) + hashlib.sha384(b"firmware blob").digest()).digest()
    True

The log is untrusted input: only its replay, compared with the RTMRs of a verified quote
(:func:`check_rtmrs`), makes its digests meaningful. This module does NOT check that event data hashes
to the event digests (for many event types the digest is over other data), nor interpret events.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ray_confidential.errors import AttestationError, EvidenceFormatError

CCEL_TABLE_SIZE = 56  # ACPI header (36) + CC type, subtype, reserved (4) + LAML (8) + LASA (8)
CC_TYPE_TDX = 2
EV_NO_ACTION = 0x00000003
TPM_ALG_SHA384 = 0x000C
SHA384_SIZE = 48
MAX_EVENT_LOG_SIZE = 8 * 1024 * 1024
MAX_EVENTS = 65536
MAX_EVENT_DATA_SIZE = 1024 * 1024
_SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"


@dataclass(frozen=True, slots=True, kw_only=True)
class CCELTable:
    """The ACPI CCEL table: where the firmware put the event log and how large the area is."""

    cc_type: int
    cc_subtype: int
    log_area_minimum_length: int
    log_area_start_address: int
    oem_id: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> CCELTable:
        if len(data) < CCEL_TABLE_SIZE or data[:4] != b"CCEL":
            raise EvidenceFormatError("not an ACPI CCEL table")
        (length,) = struct.unpack_from("<I", data, 4)
        if length != len(data) or length != CCEL_TABLE_SIZE:
            raise EvidenceFormatError("CCEL table length mismatch")
        if sum(data) & 0xFF:
            raise EvidenceFormatError("CCEL table checksum mismatch")
        cc_type, cc_subtype = data[36], data[37]
        laml, lasa = struct.unpack_from("<QQ", data, 40)
        if cc_type != CC_TYPE_TDX:
            raise EvidenceFormatError(f"CCEL table CC type {cc_type}, want {CC_TYPE_TDX} (TDX)")
        return cls(
            cc_type=cc_type,
            cc_subtype=cc_subtype,
            log_area_minimum_length=laml,
            log_area_start_address=lasa,
            oem_id=data[10:16],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CCEvent:
    """One TCG_PCR_EVENT2 record. ``mr_index``: 0 MRTD, 1..4 RTMR0..3. ``digest``: its SHA-384."""

    mr_index: int
    event_type: int
    digest: bytes
    data: bytes


def _fmt(msg: str) -> EvidenceFormatError:
    return EvidenceFormatError(f"CCEL event log: {msg}")


def parse_event_log(data: bytes) -> tuple[CCEvent, ...]:
    """Parse a crypto-agile event log (the CCEL log area). Stops at the 0xFF / zero padding.

    Raises:
        EvidenceFormatError: malformed header, unknown digest algorithm, truncated event, too large.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise _fmt("must be bytes")
    data = bytes(data)
    if len(data) > MAX_EVENT_LOG_SIZE:
        raise _fmt("too large")
    # First record: legacy TCG_PCR_EVENT holding the Spec ID event (SHA-1 digest field, unused).
    if len(data) < 32:
        raise _fmt("truncated header")
    _, ev_type = struct.unpack_from("<II", data, 0)
    (size,) = struct.unpack_from("<I", data, 28)
    spec = data[32 : 32 + size]
    if ev_type != EV_NO_ACTION or len(spec) != size or size < 29 or spec[:16] != _SPEC_ID_SIGNATURE:
        raise _fmt("first event is not a Spec ID Event03")
    (n_algs,) = struct.unpack_from("<I", spec, 24)
    if n_algs == 0 or 28 + 4 * n_algs > size:
        raise _fmt("bad algorithm table")
    sizes: dict[int, int] = {}
    for i in range(n_algs):
        alg, dsize = struct.unpack_from("<HH", spec, 28 + 4 * i)
        sizes[alg] = dsize
    if sizes.get(TPM_ALG_SHA384) != SHA384_SIZE:
        raise _fmt("log has no SHA-384 digests")
    pos = 32 + size
    events: list[CCEvent] = []
    while pos + 8 <= len(data):
        mr_index, ev_type = struct.unpack_from("<II", data, pos)
        if mr_index == 0xFFFFFFFF or (mr_index == 0 and ev_type == 0):
            rest = data[pos:]
            if rest.strip(b"\xff") and rest.strip(b"\x00"):
                raise _fmt("garbage after the end of the log")
            break
        if len(events) >= MAX_EVENTS:
            raise _fmt("too many events")
        p = pos + 8
        if p + 4 > len(data):
            raise _fmt("truncated digest count")
        (count,) = struct.unpack_from("<I", data, p)
        p += 4
        if count == 0 or count > len(sizes):
            raise _fmt("bad digest count")
        digest = None
        for _ in range(count):
            if p + 2 > len(data):
                raise _fmt("truncated digest")
            (alg,) = struct.unpack_from("<H", data, p)
            if alg not in sizes:
                raise _fmt(f"digest algorithm {alg:#x} not declared in the Spec ID event")
            value = data[p + 2 : p + 2 + sizes[alg]]
            if len(value) != sizes[alg]:
                raise _fmt("truncated digest")
            if alg == TPM_ALG_SHA384:
                digest = value
            p += 2 + sizes[alg]
        if p + 4 > len(data):
            raise _fmt("truncated event size")
        (ev_size,) = struct.unpack_from("<I", data, p)
        if ev_size > MAX_EVENT_DATA_SIZE or p + 4 + ev_size > len(data):
            raise _fmt("truncated event data")
        if digest is None:
            raise _fmt("event without a SHA-384 digest")
        events.append(
            CCEvent(mr_index=mr_index, event_type=ev_type, digest=digest, data=data[p + 4 : p + 4 + ev_size])
        )
        pos = p + 4 + ev_size
    return tuple(events)


def replay_rtmrs(events: Sequence[CCEvent]) -> tuple[bytes, bytes, bytes, bytes]:
    """RTMR0..3 obtained by extending every event of MR index 1..4 (EV_NO_ACTION is not extended)."""
    rtmrs = [bytes(SHA384_SIZE)] * 4
    for ev in events:
        if ev.event_type == EV_NO_ACTION or not 1 <= ev.mr_index <= 4:
            continue
        i = ev.mr_index - 1
        rtmrs[i] = hashlib.sha384(rtmrs[i] + ev.digest).digest()
    return rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3]


def check_rtmrs(events: Sequence[CCEvent], quoted: Sequence[bytes]) -> None:
    """Replay must reproduce every RTMR of the (verified) quote; raise AttestationError otherwise."""
    for i, (got, want) in enumerate(zip(replay_rtmrs(events), quoted, strict=True)):
        if got != want:
            raise AttestationError(f"event log replay gives rtmr{i} {got.hex()}, the quote says {want.hex()}")


def build_event_log(events: Sequence[tuple[int, int, bytes]]) -> bytes:
    """A minimal SHA-384-only crypto-agile log of ``(mr_index, event_type, data)``, digest = SHA-384(data).

    For the simulator and tests (``ray_confidential.testing.dcap_fake``).
    """
    spec = (
        _SPEC_ID_SIGNATURE + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 1) + struct.pack("<HH", TPM_ALG_SHA384, 48)
    )
    spec += b"\x00"  # vendorInfoSize
    out = struct.pack("<II", 1, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(spec)) + spec
    for mr_index, ev_type, data in events:
        out += struct.pack("<III", mr_index, ev_type, 1) + struct.pack("<H", TPM_ALG_SHA384)
        out += hashlib.sha384(data).digest() + struct.pack("<I", len(data)) + data
    return out
