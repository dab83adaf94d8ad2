"""Intel SGX PCK certificate extensions (OID 1.2.840.113741.1.13.1): FMSPC, PCE-ID, TCB components.

Spec: "Intel SGX PCK Certificate and Certificate Revocation List Profile Specification", section 1.5
("Intel SGX PCK Certificate extensions"). The extension value is a DER SEQUENCE of
SEQUENCE { OID, value } pairs; the TCB entry is itself a SEQUENCE of 18 such pairs (component SVNs
01..16, PCESVN, CPUSVN).

    >>> ext = encode_sgx_extension(ppid=bytes(16), cpu_svn=bytes(range(16)), pce_svn=13,
    ...                            pce_id=bytes(2), fmspc=bytes.fromhex("00a067110000"))
    >>> parse_sgx_extension(ext).fmspc.hex()
    '00a067110000'

This module does NOT check the certificate's signature or chain (see :mod:`.verify`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cryptography import x509

from ray_confidential.errors import EvidenceFormatError

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_PPID = SGX_EXTENSION_OID + ".1"
_TCB = SGX_EXTENSION_OID + ".2"
_PCESVN = _TCB + ".17"
_CPUSVN = _TCB + ".18"
_PCEID = SGX_EXTENSION_OID + ".3"
_FMSPC = SGX_EXTENSION_OID + ".4"
_SGX_TYPE = SGX_EXTENSION_OID + ".5"

_TAG_INTEGER = 0x02
_TAG_OCTET_STRING = 0x04
_TAG_OID = 0x06
_TAG_ENUMERATED = 0x0A
_TAG_SEQUENCE = 0x30
_MAX_DEPTH = 4


def _read_tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """One DER TLV at ``pos``: (tag, value, next position). Definite lengths only."""
    if pos + 2 > len(data):
        raise EvidenceFormatError("SGX extension: truncated DER")
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise EvidenceFormatError("SGX extension: bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise EvidenceFormatError("SGX extension: truncated DER value")
    return tag, data[pos : pos + length], pos + length


def _decode_oid(value: bytes) -> str:
    if not value:
        raise EvidenceFormatError("SGX extension: empty OID")
    parts = [value[0] // 40, value[0] % 40] if value[0] < 80 else [2, value[0] - 80]
    acc = 0
    for b in value[1:]:
        acc = (acc << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(acc)
            acc = 0
    if value[-1] & 0x80:
        raise EvidenceFormatError("SGX extension: bad OID encoding")
    return ".".join(str(p) for p in parts)


def _pairs(seq_value: bytes, depth: int) -> dict[str, tuple[int, bytes]]:
    """SEQUENCE OF SEQUENCE {OID, value} -> {oid: (tag, value)}; duplicates are malformed."""
    if depth > _MAX_DEPTH:
        raise EvidenceFormatError("SGX extension: nested too deeply")
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while pos < len(seq_value):
        tag, item, pos = _read_tlv(seq_value, pos)
        if tag != _TAG_SEQUENCE:
            raise EvidenceFormatError("SGX extension: entry is not a SEQUENCE")
        otag, oid_raw, ipos = _read_tlv(item, 0)
        if otag != _TAG_OID:
            raise EvidenceFormatError("SGX extension: entry does not start with an OID")
        vtag, value, ipos = _read_tlv(item, ipos)
        if ipos != len(item):
            raise EvidenceFormatError("SGX extension: trailing bytes in entry")
        oid = _decode_oid(oid_raw)
        if oid in out:
            raise EvidenceFormatError(f"SGX extension: duplicate {oid}")
        out[oid] = (vtag, value)
    return out


def _get(pairs: dict[str, tuple[int, bytes]], oid: str, tag: int, size: int | None = None) -> bytes:
    if oid not in pairs:
        raise EvidenceFormatError(f"SGX extension: missing {oid}")
    got_tag, value = pairs[oid]
    if got_tag != tag or (size is not None and len(value) != size):
        raise EvidenceFormatError(f"SGX extension: malformed {oid}")
    return value


def _int(value: bytes, what: str) -> int:
    if not value or len(value) > 3 or value[0] & 0x80:
        raise EvidenceFormatError(f"SGX extension: bad INTEGER for {what}")
    return int.from_bytes(value, "big")


@dataclass(frozen=True, slots=True, kw_only=True)
class PCKExtension:
    """The SGX extension of a PCK leaf certificate.

    Attributes:
        ppid: 16 bytes. cpu_svn: 16 bytes (TCB .18). tcb_components: the 16 component SVNs (.1-.16).
        pce_svn: PCESVN (u16). pce_id: 2 bytes. fmspc: 6 bytes. sgx_type: 0 Standard, 1 Scalable, ...
    """

    ppid: bytes
    cpu_svn: bytes
    tcb_components: tuple[int, ...]
    pce_svn: int
    pce_id: bytes
    fmspc: bytes
    sgx_type: int


def parse_sgx_extension(ext_value: bytes) -> PCKExtension:
    """Parse the DER value of the SGX extension. Raises :class:`EvidenceFormatError`."""
    tag, top, end = _read_tlv(ext_value, 0)
    if tag != _TAG_SEQUENCE or end != len(ext_value):
        raise EvidenceFormatError("SGX extension: not a single SEQUENCE")
    pairs = _pairs(top, 1)
    tcb = _pairs(_get(pairs, _TCB, _TAG_SEQUENCE), 2)
    comps = tuple(_int(_get(tcb, f"{_TCB}.{i}", _TAG_INTEGER), f"comp {i}") for i in range(1, 17))
    if any(c > 255 for c in comps):
        raise EvidenceFormatError("SGX extension: component SVN out of range")
    pce_svn = _int(_get(tcb, _PCESVN, _TAG_INTEGER), "PCESVN")
    if pce_svn > 0xFFFF:
        raise EvidenceFormatError("SGX extension: PCESVN out of range")
    return PCKExtension(
        ppid=_get(pairs, _PPID, _TAG_OCTET_STRING, 16),
        cpu_svn=_get(tcb, _CPUSVN, _TAG_OCTET_STRING, 16),
        tcb_components=comps,
        pce_svn=pce_svn,
        pce_id=_get(pairs, _PCEID, _TAG_OCTET_STRING, 2),
        fmspc=_get(pairs, _FMSPC, _TAG_OCTET_STRING, 6),
        sgx_type=_int(_get(pairs, _SGX_TYPE, _TAG_ENUMERATED), "SGX type"),
    )


def pck_extension(cert: x509.Certificate) -> PCKExtension:
    """The SGX extension of a PCK certificate. Raises :class:`EvidenceFormatError` when absent."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID))
    except (x509.ExtensionNotFound, ValueError) as e:
        raise EvidenceFormatError("PCK certificate has no SGX extension") from e
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise EvidenceFormatError("PCK certificate SGX extension is not raw DER")
    return _parse_sgx_extension_cached(value.value)


@functools.lru_cache(maxsize=256)
def _parse_sgx_extension_cached(ext_value: bytes) -> PCKExtension:
    """Parsing is a pure function of the extension bytes, so equal bytes share one parse."""
    return parse_sgx_extension(ext_value)


# --- DER encoding (used by the simulator in ray_confidential.testing.dcap_fake) -------------------


def _tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    lb = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(lb)]) + lb + value


def _encode_oid(oid: str) -> bytes:
    nums = [int(x) for x in oid.split(".")]
    out = bytearray([nums[0] * 40 + nums[1]])
    for n in nums[2:]:
        chunk = [n & 0x7F]
        n >>= 7
        while n:
            chunk.append(0x80 | (n & 0x7F))
            n >>= 7
        out += bytes(reversed(chunk))
    return _tlv(_TAG_OID, bytes(out))


def _der_int(n: int) -> bytes:
    raw = n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big")
    return raw


def _pair(oid: str, tag: int, value: bytes) -> bytes:
    return _tlv(_TAG_SEQUENCE, _encode_oid(oid) + _tlv(tag, value))


def encode_sgx_extension(
    *,
    ppid: bytes,
    cpu_svn: bytes,
    pce_svn: int,
    pce_id: bytes,
    fmspc: bytes,
    tcb_components: tuple[int, ...] | None = None,
    sgx_type: int = 0,
) -> bytes:
    """DER value of an SGX extension (component SVNs default to the bytes of ``cpu_svn``)."""
    comps = tcb_components if tcb_components is not None else tuple(cpu_svn)
    tcb = b"".join(_pair(f"{_TCB}.{i + 1}", _TAG_INTEGER, _der_int(c)) for i, c in enumerate(comps))
    tcb += _pair(_PCESVN, _TAG_INTEGER, _der_int(pce_svn)) + _pair(_CPUSVN, _TAG_OCTET_STRING, cpu_svn)
    body = (
        _pair(_PPID, _TAG_OCTET_STRING, ppid)
        + _tlv(_TAG_SEQUENCE, _encode_oid(_TCB) + _tlv(_TAG_SEQUENCE, tcb))
        + _pair(_PCEID, _TAG_OCTET_STRING, pce_id)
        + _pair(_FMSPC, _TAG_OCTET_STRING, fmspc)
        + _pair(_SGX_TYPE, _TAG_ENUMERATED, _der_int(sgx_type))
    )
    return _tlv(_TAG_SEQUENCE, body)
