"""NVIDIA H100 attestation report: SPDM 1.1 GET_MEASUREMENTS request || MEASUREMENTS response.

Layout from DMTF DSP0274 (SPDM) 1.1.0 section 10.11 and NVIDIA/nvtrust's local GPU verifier
(``verifier/attestation/spdm_msrt_req_msg.py``, ``spdm_msrt_resp_msg.py``). All integers are
little-endian.

    >>> from ray_confidential.testing.nvidia_fake import NVIDIATestRoot, build_evidence
    >>> fake = build_evidence(NVIDIATestRoot.generate(), report_data=bytes(32))
    >>> report = parse_report(fake.evidence)
    >>> report.requester_nonce == bytes(32), len(report.blocks)
    (True, 64)
    >>> GPUAttestationReport.from_bytes(report.to_bytes()) == report
    True

Request (37 bytes)::

    0 SPDMVersion (0x11)  1 RequestResponseCode (0xE0 GET_MEASUREMENTS)  2 Param1 (bit 0: signature
    requested)  3 Param2 (measurement operation, 0xFF = all)  4 Nonce (32)  36 SlotIDParam

Response::

    0 SPDMVersion (0x11)  1 RequestResponseCode (0x60 MEASUREMENTS)  2 Param1  3 Param2
    4 NumberOfBlocks  5 MeasurementRecordLength (3)  8 MeasurementRecord (L1)  8+L1 Nonce (32)
    40+L1 OpaqueLength (2)  42+L1 OpaqueData (L2)  42+L1+L2 Signature (96: ECDSA P-384 r || s)

Measurement block (section 10.11.1): Index (1), MeasurementSpecification (1, 0x01 = DMTF),
MeasurementSize (2), then the DMTF measurement: value type (1), value size (2), value.
Opaque data (NVIDIA): a sequence of (type (2), size (2), data) fields.

Parsing is strict: every length is bounded and must match exactly, block indices are unique, the
whole input is consumed. Not checked here: the signature, the certificates, the values.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from typing import Final

from ray_confidential.errors import EvidenceFormatError

# DSP0274 1.1.0 section 10.11 (GET_MEASUREMENTS / MEASUREMENTS).
SPDM_VERSION_11: Final = 0x11
GET_MEASUREMENTS: Final = 0xE0
MEASUREMENTS: Final = 0x60
PARAM1_SIGNATURE_REQUESTED: Final = 0x01
NONCE_SIZE: Final = 32
REQUEST_SIZE: Final = 4 + NONCE_SIZE + 1  # header, nonce, SlotIDParam
RESPONSE_HEADER_SIZE: Final = 8  # version, code, param1, param2, NumberOfBlocks, record length (3)
OPAQUE_LENGTH_SIZE: Final = 2
SIGNATURE_SIZE: Final = 96  # TPM_ALG_ECDSA_ECC_NIST_P384: r || s, 48 bytes each (section 10.11)
MAX_OPAQUE_SIZE: Final = 1024  # section 10.11: OpaqueLength shall not exceed 1024
BLOCK_HEADER_SIZE: Final = 4  # Index, MeasurementSpecification, MeasurementSize (2)
DMTF_HEADER_SIZE: Final = 3  # DMTFSpecMeasurementValueType, DMTFSpecMeasurementValueSize (2)
MEASUREMENT_SPEC_DMTF: Final = 0x01
MAX_MEASUREMENT_VALUE_SIZE: Final = 128  # H100 values are SHA-384 digests (48); generous bound
MAX_RECORD_SIZE: Final = 255 * (BLOCK_HEADER_SIZE + DMTF_HEADER_SIZE + MAX_MEASUREMENT_VALUE_SIZE)
MAX_REPORT_SIZE: Final = (
    REQUEST_SIZE + RESPONSE_HEADER_SIZE + MAX_RECORD_SIZE + NONCE_SIZE + OPAQUE_LENGTH_SIZE + MAX_OPAQUE_SIZE
) + SIGNATURE_SIZE
MAX_HEX_SIZE: Final = 2 * MAX_REPORT_SIZE + 4096  # hex text, room for line breaks

# nvtrust OpaqueData.OPAQUE_DATA_TYPES.
OPAQUE_FIELD_NAMES: Final = {
    1: "cert_issuer_name",
    2: "cert_authority_key_identifier",
    3: "driver_version",
    4: "gpu_info",
    5: "sku",
    6: "vbios_version",
    7: "manufacturer_id",
    8: "tamper_detection",
    9: "smc",
    10: "vpr",
    11: "nvdec0_status",
    12: "msrscnt",
    13: "cprinfo",
    14: "board_id",
    15: "chip_sku",
    16: "chip_sku_mod",
    17: "project",
    18: "project_sku",
    19: "project_sku_mod",
    20: "fwid",
    21: "protected_pcie_status",
    22: "switch_pdi",
    23: "floorswept_ports",
    24: "position_id",
    25: "lock_switch_status",
    32: "gpu_link_conn",
}
OPAQUE_DRIVER_VERSION: Final = 3
OPAQUE_VBIOS_VERSION: Final = 6
OPAQUE_FWID: Final = 20
VBIOS_VERSION_SIZE: Final = 8
_HEX_DIGITS: Final = frozenset(string.hexdigits.encode() + string.whitespace.encode())


def _fail(msg: str) -> EvidenceFormatError:
    return EvidenceFormatError(f"nvidia-gpu: {msg}")


def _u(data: bytes, pos: int, size: int) -> int:
    return int.from_bytes(data[pos : pos + size], "little")


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasurementBlock:
    """One DMTF measurement block (DSP0274 1.1.0 section 10.11.1).

    Attributes:
        index: measurement index (1..254), unique in a report.
        value_type: DMTFSpecMeasurementValueType (bit 7: raw bit stream vs digest; bits 0-6: kind).
        value: the measurement (48-byte SHA-384 digest on H100), at most 128 bytes.
    """

    index: int
    value_type: int
    value: bytes

    def to_bytes(self) -> bytes:
        size = DMTF_HEADER_SIZE + len(self.value)
        return (
            bytes([self.index, MEASUREMENT_SPEC_DMTF])
            + size.to_bytes(2, "little")
            + bytes([self.value_type])
            + len(self.value).to_bytes(2, "little")
            + self.value
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OpaqueField:
    """One NVIDIA opaque data field: ``type`` (see :data:`OPAQUE_FIELD_NAMES`) and raw ``data``."""

    type: int
    data: bytes

    def to_bytes(self) -> bytes:
        return self.type.to_bytes(2, "little") + len(self.data).to_bytes(2, "little") + self.data


def _parse_blocks(record: bytes, count: int) -> tuple[MeasurementBlock, ...]:
    blocks: list[MeasurementBlock] = []
    seen: set[int] = set()
    pos = 0
    for _ in range(count):
        if len(record) - pos < BLOCK_HEADER_SIZE + DMTF_HEADER_SIZE:
            raise _fail("truncated measurement block")
        index, spec, size = record[pos], record[pos + 1], _u(record, pos + 2, 2)
        if spec != MEASUREMENT_SPEC_DMTF:
            raise _fail(f"measurement block {index} is not a DMTF measurement")
        if index in seen or not 1 <= index <= 254:
            raise _fail(f"measurement index {index} invalid or repeated")
        seen.add(index)
        pos += BLOCK_HEADER_SIZE
        if size > len(record) - pos:
            raise _fail("truncated measurement block")
        value_type, value_size = record[pos], _u(record, pos + 1, 2)
        if size != DMTF_HEADER_SIZE + value_size or value_size > MAX_MEASUREMENT_VALUE_SIZE:
            raise _fail(f"measurement block {index} has inconsistent sizes")
        value = record[pos + DMTF_HEADER_SIZE : pos + size]
        blocks.append(MeasurementBlock(index=index, value_type=value_type, value=value))
        pos += size
    if pos != len(record):
        raise _fail("measurement record length does not match its blocks")
    return tuple(blocks)


def _parse_opaque(data: bytes) -> tuple[OpaqueField, ...]:
    fields: list[OpaqueField] = []
    seen: set[int] = set()
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            raise _fail("truncated opaque data field")
        kind, size = _u(data, pos, 2), _u(data, pos + 2, 2)
        pos += 4
        if size > len(data) - pos:
            raise _fail("truncated opaque data field")
        if kind in seen:
            raise _fail(f"opaque data field {kind} repeated")
        seen.add(kind)
        fields.append(OpaqueField(type=kind, data=data[pos : pos + size]))
        pos += size
    return tuple(fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class GPUAttestationReport:
    """An H100 attestation report: the GET_MEASUREMENTS request and the signed MEASUREMENTS response.

    Attributes:
        request_param1: request Param1 (bit 0 must be set: signature requested).
        request_param2: request Param2 (measurement operation; 0xFF = all).
        requester_nonce: the 32-byte nonce the verifier chose (the session binding).
        slot_id_param: request SlotIDParam (certificate slot).
        response_param1, response_param2: response Param1 / Param2.
        blocks: measurement blocks in report order.
        responder_nonce: the GPU's 32-byte nonce.
        opaque: NVIDIA opaque data fields in report order.
        signature: ECDSA P-384 signature (r || s) over SHA-384 of :meth:`signed_bytes`.
    """

    request_param1: int
    request_param2: int
    requester_nonce: bytes
    slot_id_param: int
    response_param1: int
    response_param2: int
    blocks: tuple[MeasurementBlock, ...]
    responder_nonce: bytes
    opaque: tuple[OpaqueField, ...]
    signature: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> GPUAttestationReport:
        """Parse a raw report (use :func:`parse_report` for hex text).

        Raises:
            EvidenceFormatError: truncated, oversized, trailing bytes, wrong codes or inconsistent sizes.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("GPUAttestationReport.from_bytes takes bytes")
        data = bytes(data)
        if len(data) > MAX_REPORT_SIZE:
            raise _fail(f"report has {len(data)} bytes, more than {MAX_REPORT_SIZE}")
        minimum = REQUEST_SIZE + RESPONSE_HEADER_SIZE + NONCE_SIZE + OPAQUE_LENGTH_SIZE + SIGNATURE_SIZE
        if len(data) < minimum:
            raise _fail(f"report has {len(data)} bytes, fewer than {minimum}")
        req, resp = data[:REQUEST_SIZE], data[REQUEST_SIZE:]
        if req[0] != SPDM_VERSION_11 or req[1] != GET_MEASUREMENTS:
            raise _fail("request is not an SPDM 1.1 GET_MEASUREMENTS")
        if not req[2] & PARAM1_SIGNATURE_REQUESTED:
            raise _fail("request did not ask for a signed response")
        if resp[0] != SPDM_VERSION_11 or resp[1] != MEASUREMENTS:
            raise _fail("response is not an SPDM 1.1 MEASUREMENTS")
        count, record_len = resp[4], _u(resp, 5, 3)
        if count == 0:
            raise _fail("response has no measurement blocks")
        if record_len > MAX_RECORD_SIZE:
            raise _fail("measurement record too large")
        pos = RESPONSE_HEADER_SIZE
        tail = NONCE_SIZE + OPAQUE_LENGTH_SIZE + SIGNATURE_SIZE
        if record_len + tail > len(resp) - pos:
            raise _fail("truncated response")
        blocks = _parse_blocks(resp[pos : pos + record_len], count)
        pos += record_len
        responder_nonce = resp[pos : pos + NONCE_SIZE]
        pos += NONCE_SIZE
        opaque_len = _u(resp, pos, 2)
        pos += OPAQUE_LENGTH_SIZE
        if opaque_len > MAX_OPAQUE_SIZE:
            raise _fail("opaque data too large")
        if len(resp) - pos != opaque_len + SIGNATURE_SIZE:
            raise _fail("response length does not match its opaque data and signature")
        opaque = _parse_opaque(resp[pos : pos + opaque_len])
        return cls(
            request_param1=req[2],
            request_param2=req[3],
            requester_nonce=req[4 : 4 + NONCE_SIZE],
            slot_id_param=req[4 + NONCE_SIZE],
            response_param1=resp[2],
            response_param2=resp[3],
            blocks=blocks,
            responder_nonce=responder_nonce,
            opaque=opaque,
            signature=resp[pos + opaque_len :],
        )

    def measurement_record(self) -> bytes:
        return b"".join(b.to_bytes() for b in self.blocks)

    def signed_bytes(self) -> bytes:
        """Request || response without the signature: what the GPU signs (DSP0274 section 10.11; nvtrust
        ``verify_attestation_report``)."""
        record = self.measurement_record()
        opaque = b"".join(f.to_bytes() for f in self.opaque)
        return (
            bytes([SPDM_VERSION_11, GET_MEASUREMENTS, self.request_param1, self.request_param2])
            + self.requester_nonce
            + bytes([self.slot_id_param])
            + bytes([SPDM_VERSION_11, MEASUREMENTS, self.response_param1, self.response_param2])
            + bytes([len(self.blocks)])
            + len(record).to_bytes(3, "little")
            + record
            + self.responder_nonce
            + len(opaque).to_bytes(2, "little")
            + opaque
        )

    def to_bytes(self) -> bytes:
        return self.signed_bytes() + self.signature

    # ------------------------------------------------------------------ derived values

    def opaque_field(self, kind: int) -> bytes | None:
        for f in self.opaque:
            if f.type == kind:
                return f.data
        return None

    @property
    def measurements(self) -> dict[int, bytes]:
        """Measurement values by SPDM index."""
        return {b.index: b.value for b in self.blocks}

    @property
    def measurement_digest(self) -> bytes:
        """SHA-384 over the measurement record as signed: one value naming the whole firmware state,
        which a policy can pin (``measurements["measurement"]`` in the claims)."""
        return hashlib.sha384(self.measurement_record()).digest()

    @property
    def driver_version(self) -> str | None:
        """Driver version text (opaque field 3), e.g. "550.90.07"."""
        raw = self.opaque_field(OPAQUE_DRIVER_VERSION)
        if raw is None:
            return None
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")

    @property
    def vbios_version(self) -> str | None:
        """VBIOS version as nvtrust formats it (opaque field 6), e.g. "96.00.9f.00.01"."""
        raw = self.opaque_field(OPAQUE_VBIOS_VERSION)
        if raw is None or len(raw) != VBIOS_VERSION_SIZE:
            return None
        value = raw[::-1].hex()  # the field is a little-endian 64-bit integer
        half = len(value) // 2
        upper = value[half:]
        return ".".join(upper[i : i + 2] for i in range(0, len(upper), 2)) + "." + value[half - 2 : half]

    @property
    def fwid(self) -> bytes | None:
        """Firmware id (opaque field 20): must equal the FWID in the leaf certificate."""
        return self.opaque_field(OPAQUE_FWID)


def decode_evidence(evidence: bytes) -> bytes:
    """Raw report bytes from raw input or hex text (as nvtrust's samples and tools store it).

    A raw report starts with 0x11 (SPDM 1.1), which is not a hex digit, so the forms cannot be confused.

    Raises:
        EvidenceFormatError: empty, oversized, or invalid hex.
    """
    if not isinstance(evidence, bytes | bytearray | memoryview):
        raise TypeError("NVIDIA evidence must be bytes (the raw report or its hex text)")
    evidence = bytes(evidence)
    if not evidence:
        raise _fail("empty evidence")
    if evidence[0] == SPDM_VERSION_11:
        return evidence
    if len(evidence) > MAX_HEX_SIZE:
        raise _fail(f"hex evidence has {len(evidence)} bytes, more than {MAX_HEX_SIZE}")
    text = evidence.strip()
    if text[:2] in (b"0x", b"0X"):
        text = text[2:]
    if not set(text) <= _HEX_DIGITS:
        raise _fail("evidence is neither a raw SPDM report nor hex")
    try:
        return bytes.fromhex(text.decode("ascii"))
    except ValueError as exc:
        raise _fail("evidence is neither a raw SPDM report nor hex") from exc


def parse_report(evidence: bytes) -> GPUAttestationReport:
    """Parse an H100 attestation report given raw or as hex text.

    Raises:
        EvidenceFormatError: the bytes are not a well-formed report.
    """
    return GPUAttestationReport.from_bytes(decode_evidence(evidence))
