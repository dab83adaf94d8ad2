"""Intel DCAP ECDSA quotes (SGX v3, TDX v4 and v5): bytes <-> frozen records, and back.

Layouts: "Intel SGX ECDSA Quote Library API" (quote v3, appendix A.4) and "Intel TDX DCAP Quote
Generation Library and Quote Verification Library" (quote v4, A.3; quote v5 with a body descriptor,
A.3.x). All integers are little-endian.

    >>> h = QuoteHeader(version=4, attestation_key_type=2, tee_type=TEE_TYPE_TDX, qe_svn=0, pce_svn=0,
    ...                 qe_vendor_id=INTEL_QE_VENDOR_ID, user_data=bytes(20))
    >>> QuoteHeader.from_bytes(h.to_bytes()) == h
    True

This module only parses and re-encodes. It does NOT check any signature, certificate, or policy
(see :mod:`.verify`); it does check sizes, versions, type codes and internal length fields.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ray_confidential.errors import EvidenceFormatError

# --- Header (SGX ECDSA Quote Library API A.4.3 / TDX DCAP A.3.1), 48 bytes ------------------------
HEADER_SIZE = 48
VERSION_SGX_V3 = 3
VERSION_TDX_V4 = 4
VERSION_V5 = 5
SUPPORTED_VERSIONS = (VERSION_SGX_V3, VERSION_TDX_V4, VERSION_V5)
ATTESTATION_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
_HEADER_FMT = "<HHIHH16s20s"

# --- Report bodies --------------------------------------------------------------------------------
SGX_REPORT_BODY_SIZE = 384  # SGX ECDSA Quote Library API A.4.4 (sgx_report_body_t)
TD_REPORT10_SIZE = 584  # TDX DCAP A.3.2 (TD Quote Body, TDX 1.0)
TD_REPORT15_SIZE = 648  # TDX DCAP A.3.3 (TD Quote Body, TDX 1.5: + TEE_TCB_SVN_2, MR_SERVICETD)

# Quote v5 body descriptor (TDX DCAP A.3.x "Quote Body Descriptor"): type u16, size u32.
BODY_DESCRIPTOR_SIZE = 6
BODY_TYPE_SGX = 1
BODY_TYPE_TD10 = 2
BODY_TYPE_TD15 = 3
_BODY_SIZES = {
    BODY_TYPE_SGX: SGX_REPORT_BODY_SIZE,
    BODY_TYPE_TD10: TD_REPORT10_SIZE,
    BODY_TYPE_TD15: TD_REPORT15_SIZE,
}

# --- Signature data (ECDSA 256-bit Quote Signature Data Structure, A.4.5 / A.3.8) -----------------
ECDSA_SIGNATURE_SIZE = 64  # r || s, big-endian each
ECDSA_PUBLIC_KEY_SIZE = 64  # x || y, big-endian each
CERT_DATA_TYPE_PCK_CERT_CHAIN = 5  # PEM: PCK leaf, intermediate, root (A.4.7 "Certification Data Type")
CERT_DATA_TYPE_QE_REPORT = 6  # QE Report Certification Data wrapping a type-5 chain (TDX DCAP A.3.10)
MAX_QUOTE_SIZE = 256 * 1024
"""Hard cap on the whole input (genuine quotes are ~5 KB; some producers pad them)."""
MAX_CERTIFICATION_DATA_SIZE = 64 * 1024


class _Reader:
    """Bounds-checked cursor: every short read is an :class:`EvidenceFormatError`."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise EvidenceFormatError(f"DCAP quote truncated in {what} (need {n} bytes at offset {self.pos})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos


def _fixed(data: bytes, size: int, what: str) -> bytes:
    if not isinstance(data, (bytes, bytearray)):
        raise EvidenceFormatError(f"{what}: expected bytes")
    if len(data) != size:
        raise EvidenceFormatError(f"{what}: expected {size} bytes, got {len(data)}")
    return bytes(data)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuoteHeader:
    """Quote header (48 bytes). ``qe_svn``/``pce_svn`` are named as in v3; reserved in v4/v5."""

    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> QuoteHeader:
        data = _fixed(data, HEADER_SIZE, "quote header")
        ver, akt, tee, qe_svn, pce_svn, vendor, user = struct.unpack(_HEADER_FMT, data)
        if ver not in SUPPORTED_VERSIONS:
            raise EvidenceFormatError(
                f"unsupported DCAP quote version {ver} (want one of {SUPPORTED_VERSIONS})"
            )
        if akt != ATTESTATION_KEY_TYPE_ECDSA_P256:
            raise EvidenceFormatError(
                f"unsupported attestation key type {akt} (only 2 = ECDSA-256-with-P-256)"
            )
        if tee not in (TEE_TYPE_SGX, TEE_TYPE_TDX):
            raise EvidenceFormatError(f"unknown TEE type {tee:#x}")
        if ver == VERSION_SGX_V3 and tee != TEE_TYPE_SGX:
            raise EvidenceFormatError("quote v3 must carry an SGX enclave report")
        if ver == VERSION_TDX_V4 and tee != TEE_TYPE_TDX:
            raise EvidenceFormatError("quote v4 must carry a TD report")
        return cls(
            version=ver,
            attestation_key_type=akt,
            tee_type=tee,
            qe_svn=qe_svn,
            pce_svn=pce_svn,
            qe_vendor_id=vendor,
            user_data=user,
        )

    def to_bytes(self) -> bytes:
        return struct.pack(
            _HEADER_FMT,
            self.version,
            self.attestation_key_type,
            self.tee_type,
            self.qe_svn,
            self.pce_svn,
            _fixed(self.qe_vendor_id, 16, "qe_vendor_id"),
            _fixed(self.user_data, 20, "user_data"),
        )


# SGX REPORT BODY offsets (Intel SDM vol. 3D 38.15 "REPORT", sgx_report_body_t).
_SGX_FIELDS: tuple[tuple[str, int], ...] = (
    ("cpu_svn", 16),
    ("misc_select", 4),
    ("reserved1", 12),
    ("isv_ext_prod_id", 16),
    ("attributes", 16),
    ("mr_enclave", 32),
    ("reserved2", 32),
    ("mr_signer", 32),
    ("reserved3", 32),
    ("config_id", 64),
    ("isv_prod_id", 2),
    ("isv_svn", 2),
    ("config_svn", 2),
    ("reserved4", 42),
    ("isv_family_id", 16),
    ("report_data", 64),
)
SGX_ATTRIBUTES_DEBUG = 0x02  # ATTRIBUTES.DEBUG, bit 1 of byte 0 (SDM 38.7.1)
_INT_FIELDS = frozenset({"misc_select", "isv_prod_id", "isv_svn", "config_svn"})


def _split(data: bytes, fields: tuple[tuple[str, int], ...]) -> dict[str, bytes | int]:
    out: dict[str, bytes | int] = {}
    pos = 0
    for name, size in fields:
        chunk = data[pos : pos + size]
        out[name] = int.from_bytes(chunk, "little") if name in _INT_FIELDS else chunk
        pos += size
    return out


def _join(obj: object, fields: tuple[tuple[str, int], ...]) -> bytes:
    parts = []
    for name, size in fields:
        value = getattr(obj, name)
        if name in _INT_FIELDS:
            parts.append(int(value).to_bytes(size, "little"))
        else:
            parts.append(_fixed(value, size, name))
    return b"".join(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class SGXReportBody:
    """SGX enclave report body (384 bytes): the ISV enclave of an SGX quote, and every QE report."""

    cpu_svn: bytes
    misc_select: int
    reserved1: bytes
    isv_ext_prod_id: bytes
    attributes: bytes
    mr_enclave: bytes
    reserved2: bytes
    mr_signer: bytes
    reserved3: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    reserved4: bytes
    isv_family_id: bytes
    report_data: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> SGXReportBody:
        data = _fixed(data, SGX_REPORT_BODY_SIZE, "SGX report body")
        return cls(**_split(data, _SGX_FIELDS))  # type: ignore[arg-type]

    def to_bytes(self) -> bytes:
        return _join(self, _SGX_FIELDS)

    @property
    def debug(self) -> bool:
        return bool(self.attributes[0] & SGX_ATTRIBUTES_DEBUG)


# TD quote body offsets (TDX DCAP A.3.2; TDX module ABI "TDREPORT_STRUCT" / TDINFO).
_TD10_FIELDS: tuple[tuple[str, int], ...] = (
    ("tee_tcb_svn", 16),
    ("mr_seam", 48),
    ("mr_signer_seam", 48),
    ("seam_attributes", 8),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mr_td", 48),
    ("mr_config_id", 48),
    ("mr_owner", 48),
    ("mr_owner_config", 48),
    ("rtmr0", 48),
    ("rtmr1", 48),
    ("rtmr2", 48),
    ("rtmr3", 48),
    ("report_data", 64),
)
_TD15_EXTRA: tuple[tuple[str, int], ...] = (("tee_tcb_svn2", 16), ("mr_service_td", 48))
TD_ATTRIBUTES_DEBUG = 0x01  # TDATTRIBUTES.DEBUG = bit 0 (TUD byte 0), TDX module ABI "TD Attributes"


@dataclass(frozen=True, slots=True, kw_only=True)
class TDReport10:
    """TD quote body for TDX 1.0 (584 bytes; quote v4, or v5 body type 2)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> TDReport10:
        data = _fixed(data, TD_REPORT10_SIZE, "TD report body (1.0)")
        return cls(**_split(data, _TD10_FIELDS))  # type: ignore[arg-type]

    def to_bytes(self) -> bytes:
        return _join(self, _TD10_FIELDS)

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes[0] & TD_ATTRIBUTES_DEBUG)

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)


@dataclass(frozen=True, slots=True, kw_only=True)
class TDReport15(TDReport10):
    """TD quote body for TDX 1.5 (648 bytes; quote v5 body type 3)."""

    tee_tcb_svn2: bytes
    mr_service_td: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> TDReport15:
        data = _fixed(data, TD_REPORT15_SIZE, "TD report body (1.5)")
        return cls(**_split(data, _TD10_FIELDS + _TD15_EXTRA))  # type: ignore[arg-type]

    def to_bytes(self) -> bytes:
        return _join(self, _TD10_FIELDS + _TD15_EXTRA)


ReportBody = SGXReportBody | TDReport10 | TDReport15


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificationData:
    """Certification data (type u16, size u32, data). Type 5 = PEM PCK chain; 6 = QE report data."""

    cert_type: int
    data: bytes

    @classmethod
    def read(cls, r: _Reader) -> CertificationData:
        cert_type = r.u16("certification data type")
        size = r.u32("certification data size")
        if size > MAX_CERTIFICATION_DATA_SIZE:
            raise EvidenceFormatError(f"certification data too large ({size} bytes)")
        return cls(cert_type=cert_type, data=r.take(size, "certification data"))

    def to_bytes(self) -> bytes:
        return struct.pack("<HI", self.cert_type, len(self.data)) + self.data


@dataclass(frozen=True, slots=True, kw_only=True)
class QEReportCertificationData:
    """QE report, its PCK signature, QE authentication data and the PCK certification data."""

    qe_report: SGXReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    certification_data: CertificationData

    @classmethod
    def read(cls, r: _Reader) -> QEReportCertificationData:
        qe_report = SGXReportBody.from_bytes(r.take(SGX_REPORT_BODY_SIZE, "QE report"))
        sig = r.take(ECDSA_SIGNATURE_SIZE, "QE report signature")
        auth = r.take(r.u16("QE auth data size"), "QE auth data")
        cert = CertificationData.read(r)
        if cert.cert_type == CERT_DATA_TYPE_QE_REPORT:
            raise EvidenceFormatError("nested QE report certification data")
        return cls(qe_report=qe_report, qe_report_signature=sig, qe_auth_data=auth, certification_data=cert)

    def to_bytes(self) -> bytes:
        return (
            self.qe_report.to_bytes()
            + _fixed(self.qe_report_signature, ECDSA_SIGNATURE_SIZE, "qe_report_signature")
            + struct.pack("<H", len(self.qe_auth_data))
            + self.qe_auth_data
            + self.certification_data.to_bytes()
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ECDSA256QuoteSignatureData:
    """Quote signature data for attestation key type 2.

    ``wrapped`` is True for v4/v5 quotes, where the QE report certification data sits inside a
    type-6 certification data record; v3 quotes carry it inline.
    """

    signature: bytes
    attestation_key: bytes
    qe: QEReportCertificationData
    wrapped: bool

    @classmethod
    def from_bytes(cls, data: bytes, *, wrapped: bool) -> ECDSA256QuoteSignatureData:
        r = _Reader(data)
        sig = r.take(ECDSA_SIGNATURE_SIZE, "quote signature")
        key = r.take(ECDSA_PUBLIC_KEY_SIZE, "attestation key")
        if wrapped:
            outer = CertificationData.read(r)
            if outer.cert_type != CERT_DATA_TYPE_QE_REPORT:
                raise EvidenceFormatError(
                    f"quote v4/v5 certification data type {outer.cert_type}, "
                    "want 6 (QE report certification data)"
                )
            inner = _Reader(outer.data)
            qe = QEReportCertificationData.read(inner)
            if inner.remaining:
                raise EvidenceFormatError("trailing bytes inside QE report certification data")
        else:
            qe = QEReportCertificationData.read(r)
        if r.remaining:
            raise EvidenceFormatError("quote signature data length does not match its contents")
        return cls(signature=sig, attestation_key=key, qe=qe, wrapped=wrapped)

    def to_bytes(self) -> bytes:
        qe = self.qe.to_bytes()
        if self.wrapped:
            qe = CertificationData(cert_type=CERT_DATA_TYPE_QE_REPORT, data=qe).to_bytes()
        return (
            _fixed(self.signature, ECDSA_SIGNATURE_SIZE, "signature")
            + _fixed(self.attestation_key, ECDSA_PUBLIC_KEY_SIZE, "attestation_key")
            + qe
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Quote:
    """A DCAP ECDSA quote (v3 SGX, v4 TDX 1.0, v5 with body descriptor).

    Attributes:
        header: the 48-byte header.
        body_type: v5 body descriptor type (1 SGX, 2 TD 1.0, 3 TD 1.5); None for v3/v4.
        body: the report body (signed together with the header and the descriptor).
        signature_data: ECDSA-256 quote signature data.
        trailing: bytes after the signature data (padding some producers append; never signed,
            never read, kept only so that :meth:`to_bytes` round-trips).
    """

    header: QuoteHeader
    body_type: int | None
    body: ReportBody
    signature_data: ECDSA256QuoteSignatureData
    trailing: bytes = b""

    @classmethod
    def from_bytes(cls, data: bytes) -> Quote:
        """Parse a quote. Raises :class:`EvidenceFormatError` on any malformed input."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise EvidenceFormatError("DCAP quote must be bytes")
        data = bytes(data)
        if len(data) > MAX_QUOTE_SIZE:
            raise EvidenceFormatError(f"DCAP quote too large ({len(data)} > {MAX_QUOTE_SIZE} bytes)")
        r = _Reader(data)
        header = QuoteHeader.from_bytes(r.take(HEADER_SIZE, "header"))
        body_type: int | None = None
        if header.version == VERSION_V5:
            body_type = r.u16("body type")
            size = r.u32("body size")
            want = _BODY_SIZES.get(body_type)
            if want is None or size != want:
                raise EvidenceFormatError(f"quote v5 body type {body_type} with size {size} is not supported")
            if (body_type == BODY_TYPE_SGX) != (header.tee_type == TEE_TYPE_SGX):
                raise EvidenceFormatError("quote v5 body type does not match the header's TEE type")
        elif header.version == VERSION_SGX_V3:
            size = SGX_REPORT_BODY_SIZE
        else:
            size = TD_REPORT10_SIZE
        raw_body = r.take(size, "report body")
        body: ReportBody
        if size == SGX_REPORT_BODY_SIZE:
            body = SGXReportBody.from_bytes(raw_body)
        elif size == TD_REPORT10_SIZE:
            body = TDReport10.from_bytes(raw_body)
        else:
            body = TDReport15.from_bytes(raw_body)
        sig_len = r.u32("signature data length")
        sig = ECDSA256QuoteSignatureData.from_bytes(
            r.take(sig_len, "signature data"), wrapped=header.version != VERSION_SGX_V3
        )
        return cls(header=header, body_type=body_type, body=body, signature_data=sig, trailing=data[r.pos :])

    def signed_bytes(self) -> bytes:
        """The bytes the attestation key signs: header (+ v5 body descriptor) + body."""
        out = self.header.to_bytes()
        body = self.body.to_bytes()
        if self.header.version == VERSION_V5:
            if self.body_type is None:
                raise EvidenceFormatError("quote v5 needs a body type")
            out += struct.pack("<HI", self.body_type, len(body))
        return out + body

    def to_bytes(self) -> bytes:
        sig = self.signature_data.to_bytes()
        return self.signed_bytes() + struct.pack("<I", len(sig)) + sig + self.trailing

    @property
    def is_tdx(self) -> bool:
        return self.header.tee_type == TEE_TYPE_TDX


def parse_quote(data: bytes) -> Quote:
    """Parse a DCAP quote (alias of :meth:`Quote.from_bytes`)."""
    return Quote.from_bytes(data)
