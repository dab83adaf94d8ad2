"""SEV-SNP ATTESTATION_REPORT: bytes <-> frozen record (AMD doc 56860, SNP Firmware ABI, "ATTESTATION_REPORT
Structure"), the TCB_VERSION layouts, and the GHCB certificate table of the extended report.

    >>> from ray_confidential.attestation.snp.abi import TCBVersion
    >>> TCBVersion.decode(0x4400000000000002, product="Milan")
    TCBVersion(bl=2, tee=0, snp=0, ucode=68, fmc=None)
    >>> TCBVersion.decode(0x0900000000000000, product="Turin").ucode
    9

Parsing checks the length, the must-be-zero ranges, the reserved bits of the guest policy, the signer
info and the platform info, then reads the fields (after go-sev-guest ``abi.ReportToProto``). Every
failure is an :class:`~ray_confidential.errors.EvidenceFormatError`.

What this module does NOT check: the signature, the certificates, and whether any value is acceptable
(see ``verify`` and ``validate``).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from ray_confidential.errors import EvidenceFormatError

# --- ATTESTATION_REPORT layout (56860, Table "ATTESTATION_REPORT Structure") -------------------------
REPORT_SIZE = 0x4A0
"""Size of ATTESTATION_REPORT in bytes (1184)."""
SUPPORTED_VERSIONS = frozenset({2, 3, 4, 5})
"""VERSION values parsed. v3 adds CPUID_FAM_ID/MOD_ID/STEP; v5 adds LAUNCH/CURRENT_MIT_VECTOR.
v4 has the v3 layout (as virtee/sev reads it)."""

OFF_VERSION = 0x000
OFF_GUEST_SVN = 0x004
OFF_POLICY = 0x008
OFF_FAMILY_ID = 0x010
OFF_IMAGE_ID = 0x020
OFF_VMPL = 0x030
OFF_SIGNATURE_ALGO = 0x034
OFF_CURRENT_TCB = 0x038
OFF_PLATFORM_INFO = 0x040
OFF_SIGNER_INFO = 0x048  # AUTHOR_KEY_EN bit 0, MASK_CHIP_KEY bit 1, SIGNING_KEY bits 4:2
OFF_RESERVED_04C = 0x04C
OFF_REPORT_DATA = 0x050
OFF_MEASUREMENT = 0x090
OFF_HOST_DATA = 0x0C0
OFF_ID_KEY_DIGEST = 0x0E0
OFF_AUTHOR_KEY_DIGEST = 0x110
OFF_REPORT_ID = 0x140
OFF_REPORT_ID_MA = 0x160
OFF_REPORTED_TCB = 0x180
OFF_CPUID_FAM_ID = 0x188  # v3+
OFF_CPUID_MOD_ID = 0x189  # v3+
OFF_CPUID_STEP = 0x18A  # v3+
OFF_RESERVED_18B = 0x18B
OFF_CHIP_ID = 0x1A0
OFF_COMMITTED_TCB = 0x1E0
OFF_CURRENT_BUILD = 0x1E8
OFF_CURRENT_MINOR = 0x1E9
OFF_CURRENT_MAJOR = 0x1EA
OFF_RESERVED_1EB = 0x1EB
OFF_COMMITTED_BUILD = 0x1EC
OFF_COMMITTED_MINOR = 0x1ED
OFF_COMMITTED_MAJOR = 0x1EE
OFF_RESERVED_1EF = 0x1EF
OFF_LAUNCH_TCB = 0x1F0
OFF_LAUNCH_MIT_VECTOR = 0x1F8  # v5+
OFF_CURRENT_MIT_VECTOR = 0x200  # v5+
OFF_RESERVED_208 = 0x208
OFF_SIGNATURE = 0x2A0
SIGNED_SIZE = OFF_SIGNATURE
"""The signature covers bytes 0x000..0x29F."""

FAMILY_ID_SIZE = 16
IMAGE_ID_SIZE = 16
REPORT_DATA_SIZE = 64
MEASUREMENT_SIZE = 48
HOST_DATA_SIZE = 32
ID_KEY_DIGEST_SIZE = 48
REPORT_ID_SIZE = 32
CHIP_ID_SIZE = 64
SIGNATURE_SIZE = REPORT_SIZE - OFF_SIGNATURE  # 512

# 56860 "ECDSA P-384 with SHA-384 Signature": R at 0x00 and S at 0x48, 72-byte little-endian fields.
SIG_ALGO_ECDSA_P384_SHA384 = 1
ECDSA_COMPONENT_SIZE = 72
ECDSA_SIG_SIZE = 2 * ECDSA_COMPONENT_SIZE

# 56860 "GUEST_POLICY Structure".
POLICY_ABI_MINOR_MASK = 0xFF
POLICY_ABI_MAJOR_SHIFT = 8
POLICY_SMT_BIT = 16
POLICY_RESERVED_MUST_BE_ONE_BIT = 17
POLICY_MIGRATE_MA_BIT = 18
POLICY_DEBUG_BIT = 19
POLICY_SINGLE_SOCKET_BIT = 20
POLICY_CXL_ALLOW_BIT = 21
POLICY_MEM_AES_256_XTS_BIT = 22
POLICY_RAPL_DIS_BIT = 23
POLICY_CIPHERTEXT_HIDING_BIT = 24
POLICY_PAGE_SWAP_DISABLE_BIT = 25
POLICY_MBZ_LOWEST_BIT = 26  # bits 63:26 reserved, must be zero

# 56860 "PLATFORM_INFO": bits 0..5 and 7 defined, bit 6 and 63:8 reserved (as go-sev-guest).
PLATFORM_INFO_SMT_EN_BIT = 0
PLATFORM_INFO_RESERVED_MASK = ~((1 << 8) - 1) | (1 << 6)

# SIGNING_KEY values (56860 Table "ATTESTATION_REPORT Structure", bits 4:2 at 0x48).
SIGNING_KEY_VCEK = 0
SIGNING_KEY_VLEK = 1
SIGNING_KEY_NONE = 7

# --- GHCB extended guest request certificate table (AMD doc 56421, "SNP Extended Guest Request") ----
GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")  # also used for the ASVK
GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
CERT_TABLE_ENTRY_SIZE = 24  # GUID (16, RFC 4122 byte order), offset u32 LE, length u32 LE
CERT_TABLE_MAX_SIZE = 0x10000
"""Largest certificate blob accepted after the report (64 KiB; the kernel passes at most a few pages)."""
CERT_TABLE_MAX_ENTRIES = 16

PRODUCTS = ("Milan", "Genoa", "Turin")


def _mbz(data: bytes, lo: int, hi: int) -> None:
    if any(data[lo:hi]):
        raise EvidenceFormatError(f"SEV-SNP report: must-be-zero range [0x{lo:x}:0x{hi:x}] is not zero")


def _u32(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", data, off)[0])


def _u64(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", data, off)[0])


def product_from_cpuid(family: int, model: int) -> str | None:
    """Product line from the report's CPUID_FAM_ID / CPUID_MOD_ID (v3+), None when not a known SNP part.

    Family 0x19 models 0x00-0x0F are Milan, 0x10-0x1F and 0xA0-0xAF Genoa; family 0x1A models 0x00-0x11
    Turin (as virtee/sev ``Generation::identify_cpu``).
    """
    if family == 0x19:
        if model <= 0x0F:
            return "Milan"
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return "Genoa"
    if family == 0x1A and model <= 0x11:
        return "Turin"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class TCBVersion:
    """A decoded TCB_VERSION (56860 "TCB_VERSION Structure"); each field is a security patch level.

    Milan and Genoa: byte 0 BOOT_LOADER, 1 TEE, 2..5 reserved, 6 SNP, 7 MICROCODE. Turin: byte 0 FMC,
    1 BOOT_LOADER, 2 TEE, 3 SNP, 4..6 reserved, 7 MICROCODE. ``fmc`` is None before Turin.
    """

    bl: int
    tee: int
    snp: int
    ucode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: int, *, product: str) -> TCBVersion:
        """Decode the little-endian u64 ``raw`` with the layout of ``product`` ("Milan"/"Genoa"/"Turin")."""
        b = raw.to_bytes(8, "little")
        if product == "Turin":
            return cls(fmc=b[0], bl=b[1], tee=b[2], snp=b[3], ucode=b[7])
        if product in ("Milan", "Genoa"):
            return cls(bl=b[0], tee=b[1], snp=b[6], ucode=b[7])
        raise ValueError(f"unknown SEV-SNP product {product!r}; use one of {', '.join(PRODUCTS)}")

    def encode(self, *, product: str) -> int:
        """The u64 TCB_VERSION of these levels in the layout of ``product`` (reserved bytes zero)."""
        if product == "Turin":
            b = bytes([self.fmc or 0, self.bl, self.tee, self.snp, 0, 0, 0, self.ucode])
        elif product in ("Milan", "Genoa"):
            b = bytes([self.bl, self.tee, 0, 0, 0, 0, self.snp, self.ucode])
        else:
            raise ValueError(f"unknown SEV-SNP product {product!r}; use one of {', '.join(PRODUCTS)}")
        return int.from_bytes(b, "little")

    def as_dict(self) -> dict[str, int]:
        """``{"bl", "tee", "snp", "ucode"}`` plus ``"fmc"`` on Turin."""
        d = {"bl": self.bl, "tee": self.tee, "snp": self.snp, "ucode": self.ucode}
        if self.fmc is not None:
            d["fmc"] = self.fmc
        return d

    @classmethod
    def from_mapping(cls, d: Mapping[str, int]) -> TCBVersion:
        """Inverse of :meth:`as_dict` (missing components are 0; unknown keys are a ``ValueError``)."""
        unknown = set(d) - {"bl", "tee", "snp", "ucode", "fmc"}
        if unknown:
            raise ValueError(f"unknown TCB component(s) {sorted(unknown)}; use bl, tee, snp, ucode, fmc")
        for k, v in d.items():
            if not isinstance(v, int) or not 0 <= v <= 255:
                raise ValueError(f"TCB component {k} must be an integer 0..255, got {v!r}")
        fmc = d.get("fmc")
        return cls(
            bl=d.get("bl", 0), tee=d.get("tee", 0), snp=d.get("snp", 0), ucode=d.get("ucode", 0), fmc=fmc
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SNPReport:
    """One ATTESTATION_REPORT (56860). TCB fields are kept as raw u64 (their layout depends on the
    product, known from the VCEK; decode them with :class:`TCBVersion`). ``cpuid_*`` are None before v3,
    ``*_mit_vector`` None before v5."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    signer_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: int
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: int
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature: bytes

    # --- derived views ------------------------------------------------------------------------------
    @property
    def debug(self) -> bool:
        """POLICY.DEBUG (bit 19): the host may decrypt and read guest memory."""
        return bool(self.policy >> POLICY_DEBUG_BIT & 1)

    @property
    def smt_allowed(self) -> bool:
        """POLICY.SMT (bit 16): the guest may run with simultaneous multithreading enabled."""
        return bool(self.policy >> POLICY_SMT_BIT & 1)

    @property
    def migrate_ma(self) -> bool:
        """POLICY.MIGRATE_MA (bit 18): a migration agent may be associated with the guest."""
        return bool(self.policy >> POLICY_MIGRATE_MA_BIT & 1)

    @property
    def signing_key(self) -> int:
        """SIGNING_KEY: 0 VCEK, 1 VLEK, 7 none."""
        return self.signer_info >> 2 & 0x7

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.signer_info >> 1 & 1)

    @property
    def author_key_en(self) -> bool:
        return bool(self.signer_info & 1)

    @property
    def cpuid_product(self) -> str | None:
        """Product line from the CPUID fields (v3+), or None."""
        if self.cpuid_fam_id is None or self.cpuid_mod_id is None:
            return None
        return product_from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    @property
    def signature_r(self) -> int:
        return int.from_bytes(self.signature[:ECDSA_COMPONENT_SIZE], "little")

    @property
    def signature_s(self) -> int:
        return int.from_bytes(self.signature[ECDSA_COMPONENT_SIZE:ECDSA_SIG_SIZE], "little")

    # --- codec ----------------------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes) -> SNPReport:
        """Parse exactly :data:`REPORT_SIZE` bytes.

        Raises:
            EvidenceFormatError: wrong length, unsupported version or signature algorithm, non-zero
                reserved bytes or bits, reserved SIGNING_KEY value.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"SNPReport.from_bytes takes bytes, not {type(data).__name__}")
        data = bytes(data)
        if len(data) != REPORT_SIZE:
            raise EvidenceFormatError(
                f"SEV-SNP report must be {REPORT_SIZE} bytes (0x{REPORT_SIZE:x}), got {len(data)}"
            )
        version = _u32(data, OFF_VERSION)
        if version not in SUPPORTED_VERSIONS:
            raise EvidenceFormatError(f"unsupported SEV-SNP report version {version} (supported: 2..5)")
        sig_algo = _u32(data, OFF_SIGNATURE_ALGO)
        if sig_algo != SIG_ALGO_ECDSA_P384_SHA384:
            raise EvidenceFormatError(f"unsupported SEV-SNP signature algorithm {sig_algo} (want 1)")
        # Must-be-zero ranges, by version.
        _mbz(data, OFF_RESERVED_04C, OFF_REPORT_DATA)
        _mbz(data, OFF_CPUID_FAM_ID if version < 3 else OFF_RESERVED_18B, OFF_CHIP_ID)
        _mbz(data, OFF_RESERVED_1EB, OFF_COMMITTED_BUILD)
        _mbz(data, OFF_RESERVED_1EF, OFF_LAUNCH_TCB)
        _mbz(data, OFF_LAUNCH_MIT_VECTOR if version < 5 else OFF_RESERVED_208, OFF_SIGNATURE)
        _mbz(data, OFF_SIGNATURE + ECDSA_SIG_SIZE, REPORT_SIZE)
        # Reserved bits.
        policy = _u64(data, OFF_POLICY)
        if not policy >> POLICY_RESERVED_MUST_BE_ONE_BIT & 1:
            raise EvidenceFormatError("SEV-SNP report: guest policy bit 17 is reserved and must be 1")
        if policy >> POLICY_MBZ_LOWEST_BIT:
            raise EvidenceFormatError(f"SEV-SNP report: reserved guest policy bits 63:26 set (0x{policy:x})")
        signer_info = _u32(data, OFF_SIGNER_INFO)
        if signer_info >> 5:
            raise EvidenceFormatError(
                f"SEV-SNP report: reserved signer info bits 31:5 set (0x{signer_info:x})"
            )
        if (signer_info >> 2 & 7) not in (SIGNING_KEY_VCEK, SIGNING_KEY_VLEK, SIGNING_KEY_NONE):
            raise EvidenceFormatError(f"SEV-SNP report: reserved SIGNING_KEY value {signer_info >> 2 & 7}")
        platform_info = _u64(data, OFF_PLATFORM_INFO)
        if platform_info & PLATFORM_INFO_RESERVED_MASK:
            raise EvidenceFormatError(
                f"SEV-SNP report: reserved platform info bits set (0x{platform_info:x})"
            )
        has_cpuid = version >= 3
        has_mit = version >= 5
        return cls(
            version=version,
            guest_svn=_u32(data, OFF_GUEST_SVN),
            policy=policy,
            family_id=data[OFF_FAMILY_ID : OFF_FAMILY_ID + FAMILY_ID_SIZE],
            image_id=data[OFF_IMAGE_ID : OFF_IMAGE_ID + IMAGE_ID_SIZE],
            vmpl=_u32(data, OFF_VMPL),
            signature_algo=sig_algo,
            current_tcb=_u64(data, OFF_CURRENT_TCB),
            platform_info=platform_info,
            signer_info=signer_info,
            report_data=data[OFF_REPORT_DATA : OFF_REPORT_DATA + REPORT_DATA_SIZE],
            measurement=data[OFF_MEASUREMENT : OFF_MEASUREMENT + MEASUREMENT_SIZE],
            host_data=data[OFF_HOST_DATA : OFF_HOST_DATA + HOST_DATA_SIZE],
            id_key_digest=data[OFF_ID_KEY_DIGEST : OFF_ID_KEY_DIGEST + ID_KEY_DIGEST_SIZE],
            author_key_digest=data[OFF_AUTHOR_KEY_DIGEST : OFF_AUTHOR_KEY_DIGEST + ID_KEY_DIGEST_SIZE],
            report_id=data[OFF_REPORT_ID : OFF_REPORT_ID + REPORT_ID_SIZE],
            report_id_ma=data[OFF_REPORT_ID_MA : OFF_REPORT_ID_MA + REPORT_ID_SIZE],
            reported_tcb=_u64(data, OFF_REPORTED_TCB),
            cpuid_fam_id=data[OFF_CPUID_FAM_ID] if has_cpuid else None,
            cpuid_mod_id=data[OFF_CPUID_MOD_ID] if has_cpuid else None,
            cpuid_step=data[OFF_CPUID_STEP] if has_cpuid else None,
            chip_id=data[OFF_CHIP_ID : OFF_CHIP_ID + CHIP_ID_SIZE],
            committed_tcb=_u64(data, OFF_COMMITTED_TCB),
            current_build=data[OFF_CURRENT_BUILD],
            current_minor=data[OFF_CURRENT_MINOR],
            current_major=data[OFF_CURRENT_MAJOR],
            committed_build=data[OFF_COMMITTED_BUILD],
            committed_minor=data[OFF_COMMITTED_MINOR],
            committed_major=data[OFF_COMMITTED_MAJOR],
            launch_tcb=_u64(data, OFF_LAUNCH_TCB),
            launch_mit_vector=_u64(data, OFF_LAUNCH_MIT_VECTOR) if has_mit else None,
            current_mit_vector=_u64(data, OFF_CURRENT_MIT_VECTOR) if has_mit else None,
            signature=data[OFF_SIGNATURE:REPORT_SIZE],
        )

    def to_bytes(self) -> bytes:
        """Serialise to the 1184-byte ABI form (fields absent in this version are written as zero).

        Raises:
            ValueError: a field has the wrong size or range (the record was built by hand).
        """
        sizes = {
            "family_id": FAMILY_ID_SIZE,
            "image_id": IMAGE_ID_SIZE,
            "report_data": REPORT_DATA_SIZE,
            "measurement": MEASUREMENT_SIZE,
            "host_data": HOST_DATA_SIZE,
            "id_key_digest": ID_KEY_DIGEST_SIZE,
            "author_key_digest": ID_KEY_DIGEST_SIZE,
            "report_id": REPORT_ID_SIZE,
            "report_id_ma": REPORT_ID_SIZE,
            "chip_id": CHIP_ID_SIZE,
            "signature": SIGNATURE_SIZE,
        }
        for name, size in sizes.items():
            if len(getattr(self, name)) != size:
                raise ValueError(f"SNPReport.{name} must be {size} bytes, got {len(getattr(self, name))}")
        out = bytearray(REPORT_SIZE)
        try:
            struct.pack_into("<IIQ", out, OFF_VERSION, self.version, self.guest_svn, self.policy)
            struct.pack_into("<II", out, OFF_VMPL, self.vmpl, self.signature_algo)
            struct.pack_into(
                "<QQI", out, OFF_CURRENT_TCB, self.current_tcb, self.platform_info, self.signer_info
            )
            struct.pack_into("<Q", out, OFF_REPORTED_TCB, self.reported_tcb)
            struct.pack_into("<Q", out, OFF_COMMITTED_TCB, self.committed_tcb)
            struct.pack_into("<Q", out, OFF_LAUNCH_TCB, self.launch_tcb)
            struct.pack_into("<Q", out, OFF_LAUNCH_MIT_VECTOR, self.launch_mit_vector or 0)
            struct.pack_into("<Q", out, OFF_CURRENT_MIT_VECTOR, self.current_mit_vector or 0)
            out[OFF_CURRENT_BUILD : OFF_CURRENT_MAJOR + 1] = bytes(
                [self.current_build, self.current_minor, self.current_major]
            )
            out[OFF_COMMITTED_BUILD : OFF_COMMITTED_MAJOR + 1] = bytes(
                [self.committed_build, self.committed_minor, self.committed_major]
            )
            out[OFF_CPUID_FAM_ID : OFF_CPUID_STEP + 1] = bytes(
                [self.cpuid_fam_id or 0, self.cpuid_mod_id or 0, self.cpuid_step or 0]
            )
        except (struct.error, ValueError) as exc:
            raise ValueError(f"SNPReport field out of range: {exc}") from None
        out[OFF_FAMILY_ID : OFF_FAMILY_ID + FAMILY_ID_SIZE] = self.family_id
        out[OFF_IMAGE_ID : OFF_IMAGE_ID + IMAGE_ID_SIZE] = self.image_id
        out[OFF_REPORT_DATA : OFF_REPORT_DATA + REPORT_DATA_SIZE] = self.report_data
        out[OFF_MEASUREMENT : OFF_MEASUREMENT + MEASUREMENT_SIZE] = self.measurement
        out[OFF_HOST_DATA : OFF_HOST_DATA + HOST_DATA_SIZE] = self.host_data
        out[OFF_ID_KEY_DIGEST : OFF_ID_KEY_DIGEST + ID_KEY_DIGEST_SIZE] = self.id_key_digest
        out[OFF_AUTHOR_KEY_DIGEST : OFF_AUTHOR_KEY_DIGEST + ID_KEY_DIGEST_SIZE] = self.author_key_digest
        out[OFF_REPORT_ID : OFF_REPORT_ID + REPORT_ID_SIZE] = self.report_id
        out[OFF_REPORT_ID_MA : OFF_REPORT_ID_MA + REPORT_ID_SIZE] = self.report_id_ma
        out[OFF_CHIP_ID : OFF_CHIP_ID + CHIP_ID_SIZE] = self.chip_id
        out[OFF_SIGNATURE:REPORT_SIZE] = self.signature
        return bytes(out)

    def signed_bytes(self) -> bytes:
        """The signed component: bytes 0x000..0x29F of :meth:`to_bytes`."""
        return self.to_bytes()[:SIGNED_SIZE]


def parse_cert_table(blob: bytes) -> list[tuple[uuid.UUID, bytes]]:
    """Parse the certificate table an extended guest request returns (GHCB spec 56421, "SNP Extended
    Guest Request"): entries ``GUID (16) || offset (u32 LE) || length (u32 LE)`` ended by an all-zero
    entry, offsets relative to the start of ``blob``.

    Raises:
        EvidenceFormatError: oversized blob, too many entries, no terminator, an entry that points into
            the table or past the end of the blob, or an empty entry.
    """
    if len(blob) > CERT_TABLE_MAX_SIZE:
        raise EvidenceFormatError(f"SEV-SNP certificate table larger than {CERT_TABLE_MAX_SIZE} bytes")
    entries: list[tuple[uuid.UUID, int, int]] = []
    pos = 0
    while True:
        if pos + CERT_TABLE_ENTRY_SIZE > len(blob):
            raise EvidenceFormatError("SEV-SNP certificate table is truncated (no all-zero terminator entry)")
        raw = blob[pos : pos + CERT_TABLE_ENTRY_SIZE]
        pos += CERT_TABLE_ENTRY_SIZE
        if not any(raw):
            break
        if len(entries) == CERT_TABLE_MAX_ENTRIES:
            raise EvidenceFormatError(
                f"SEV-SNP certificate table has more than {CERT_TABLE_MAX_ENTRIES} entries"
            )
        offset, length = struct.unpack_from("<II", raw, 16)
        entries.append((uuid.UUID(bytes=raw[:16]), offset, length))
    out: list[tuple[uuid.UUID, bytes]] = []
    for guid, offset, length in entries:
        if length == 0 or offset < pos or offset + length > len(blob):
            raise EvidenceFormatError(
                f"SEV-SNP certificate table entry {guid}: bad range (offset {offset}, length {length})"
            )
        out.append((guid, blob[offset : offset + length]))
    return out


def build_cert_table(entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    """Inverse of :func:`parse_cert_table` (certificates packed after the table, in order)."""
    header = CERT_TABLE_ENTRY_SIZE * (len(entries) + 1)
    table = bytearray()
    body = bytearray()
    for guid, cert in entries:
        table += guid.bytes + struct.pack("<II", header + len(body), len(cert))
        body += cert
    return bytes(table + bytes(CERT_TABLE_ENTRY_SIZE) + body)


def split_evidence(evidence: bytes) -> tuple[SNPReport, list[tuple[uuid.UUID, bytes]]]:
    """Split this package's SNP evidence container: the 1184-byte report, optionally followed by the
    certificate table of the extended report (what ``/dev/sev-guest`` SNP_GET_EXT_REPORT or configfs-tsm
    ``auxblob`` return).

    Raises:
        EvidenceFormatError: see :meth:`SNPReport.from_bytes` and :func:`parse_cert_table`.
    """
    if not isinstance(evidence, bytes | bytearray | memoryview):
        raise TypeError(f"SEV-SNP evidence must be bytes, not {type(evidence).__name__}")
    evidence = bytes(evidence)
    if len(evidence) < REPORT_SIZE:
        raise EvidenceFormatError(f"SEV-SNP evidence is truncated: {len(evidence)} < {REPORT_SIZE} bytes")
    report = SNPReport.from_bytes(evidence[:REPORT_SIZE])
    rest = evidence[REPORT_SIZE:]
    return report, (parse_cert_table(rest) if rest else [])
