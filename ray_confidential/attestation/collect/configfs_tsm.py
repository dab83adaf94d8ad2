"""Linux configfs-tsm: one report instance per request, ``generation`` checked, ``privlevel`` chosen.

    report = collect_configfs_tsm(binding.report_data(), privlevel=0)   # doctest: +SKIP
    evidence = report.to_evidence()

Protocol (Linux ``Documentation/ABI/testing/configfs-tsm``): ``mkdir`` a report instance under
``/sys/kernel/config/tsm/report``; write ``privlevel`` (SEV-SNP VMPL, 0..3, at least
``privlevel_floor``) when the provider has it; read ``generation``; write ``inblob`` (64 bytes);
read ``outblob`` (the report or quote) and ``auxblob`` (SNP certificate table) and ``provider``;
read ``generation`` again. Every write to the instance increments ``generation``, so anything but
exactly one more than before means another writer changed the request under us (concurrent writers
corrupt each other's reports): refuse. Finally ``rmdir`` the instance.

What it does NOT do: verify the output (that is the verifier's job), or keep other processes away
from configfs (only the executor may reach it).
"""

from __future__ import annotations

import os
import secrets
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ray_confidential.attestation.collect import CollectionError
from ray_confidential.attestation.evidence import Evidence

TSM_REPORT_PATH: Final = Path("/sys/kernel/config/tsm/report")
INBLOB_SIZE: Final = 64
"""TSM_INBLOB_MAX (include/linux/tsm.h): the report data is exactly 64 bytes."""
OUTBLOB_MAX: Final = 32 * 1024
"""TSM_OUTBLOB_MAX (include/linux/tsm.h)."""
PRIVLEVEL_MAX: Final = 3
"""TSM_PRIVLEVEL_MAX: SEV-SNP VMPL 0..3."""

PROVIDER_TEE: Final[dict[str, str]] = {"sev_guest": "sev-snp", "tdx_guest": "tdx"}
"""configfs-tsm ``provider`` -> TEE kind of its outblob."""

# SEV-SNP certificate table GUIDs (GHCB spec 56421, "SNP Extended Guest Request"; AMD KDS spec).
SNP_CERT_GUIDS: Final[dict[str, str]] = {
    "63da758d-e664-4564-adc5-f4b93be8accd": "vcek",
    "a8074bc2-a25a-483e-aae6-39c045a0b8a1": "vlek",
    "4ab7b379-bbac-4fe4-a02f-05aef327c782": "ask",
    "c0b406a4-a803-4952-9743-3fb6014cd0ae": "ark",
}
_CERT_ENTRY: Final = struct.Struct("<16sII")


class FileOps:
    """The file operations the collectors use; tests substitute an emulation of the kernel side."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def exists(self, path: Path) -> bool:
        return path.exists()

    def read(self, path: Path) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def write(self, path: Path, data: bytes) -> None:
        # One write(2): configfs attributes take their value from a single write.
        fd = os.open(path, os.O_WRONLY)
        try:
            if os.write(fd, data) != len(data):
                raise CollectionError(f"short write to {path}")
        finally:
            os.close(fd)


@dataclass(frozen=True, slots=True, kw_only=True)
class TSMReport:
    """What one configfs-tsm request returned.

    Attributes:
        provider: ``sev_guest``, ``tdx_guest``, ...
        outblob: the report (SNP ATTESTATION_REPORT) or quote (TDX DCAP quote).
        auxblob: SNP certificate table (VCEK/VLEK, ASK, ARK), or None when the provider has none.
        generation: ``generation`` after the request.
        privlevel: the privlevel written, or None.
    """

    provider: str
    outblob: bytes
    auxblob: bytes | None
    generation: int
    privlevel: int | None

    def to_evidence(self) -> Evidence:
        """The :class:`Evidence` record (SNP: certificates from the auxblob's table)."""
        try:
            tee = PROVIDER_TEE[self.provider]
        except KeyError:
            raise CollectionError(f"configfs-tsm provider {self.provider!r} has no TEE backend") from None
        certs = parse_snp_cert_table(self.auxblob) if tee == "sev-snp" and self.auxblob else ()
        return Evidence(tee=tee, evidence=self.outblob, certs=tuple(certs.values()) if certs else ())


def parse_snp_cert_table(table: bytes) -> dict[str, bytes]:
    """Certificates of an SNP extended-report certificate table, by name (``vcek``, ``ask``, ...).

    Layout (GHCB spec, SNP_GET_EXT_REPORT): entries ``{GUID (16, RFC 4122 byte order, as go-sev-guest
    and virtee write it), offset u32, length u32}`` up to an all-zero entry; offsets from the start of
    the table.

    Raises:
        CollectionError: malformed table (unterminated, out-of-range entry).
    """
    certs: dict[str, bytes] = {}
    pos = 0
    while True:
        if pos + _CERT_ENTRY.size > len(table):
            raise CollectionError("SNP certificate table: no terminating zero entry")
        raw_guid, offset, length = _CERT_ENTRY.unpack_from(table, pos)
        pos += _CERT_ENTRY.size
        if raw_guid == bytes(16) and offset == 0 and length == 0:
            return certs
        if offset + length > len(table) or offset < pos:
            raise CollectionError("SNP certificate table: entry out of range")
        name = SNP_CERT_GUIDS.get(str(uuid.UUID(bytes=raw_guid)))
        if name is not None:
            certs[name] = table[offset : offset + length]


def collect_configfs_tsm(
    report_data: bytes,
    *,
    privlevel: int | None,
    base: Path = TSM_REPORT_PATH,
    ops: FileOps | None = None,
) -> TSMReport:
    """Request one report binding ``report_data`` through configfs-tsm.

    Args:
        report_data: the 64 bytes the report signs (``Binding.report_data()``).
        privlevel: the privilege level to request (SEV-SNP: VMPL 0..3). Required for providers that
            have ``privlevel`` (say 0 unless the executor runs at another VMPL); None for providers
            without it (TDX).
        base: the ``tsm/report`` directory.
        ops: file operations (default: the real file system).

    Raises:
        ValueError: wrong ``report_data`` size, or a ``privlevel`` out of range, below
            ``privlevel_floor``, missing where the provider needs it, or given where it has none.
        CollectionError: the instance exists already, another writer changed it, or the output is
            empty or too large.
    """
    if len(report_data) != INBLOB_SIZE:
        raise ValueError(f"report_data must be {INBLOB_SIZE} bytes, got {len(report_data)}")
    if privlevel is not None and not 0 <= privlevel <= PRIVLEVEL_MAX:
        raise ValueError(f"privlevel must be 0..{PRIVLEVEL_MAX}, got {privlevel}")
    ops = ops or FileOps()
    instance = base / f"ray-confidential-{os.getpid()}-{secrets.token_hex(8)}"
    try:
        ops.mkdir(instance)
    except FileExistsError:
        raise CollectionError(f"configfs-tsm instance {instance} exists already") from None
    try:
        provider = ops.read(instance / "provider").decode("ascii", "replace").strip()
        has_privlevel = ops.exists(instance / "privlevel")
        if privlevel is None and has_privlevel:
            raise ValueError(
                f"provider {provider} takes a privlevel: pass privlevel= deliberately (0 = VMPL0)"
            )
        if privlevel is not None:
            if not has_privlevel:
                raise ValueError(f"provider {provider} has no privlevel; pass privlevel=None")
            if ops.exists(instance / "privlevel_floor"):
                floor = _read_int(ops, instance / "privlevel_floor")
                if privlevel < floor:
                    raise ValueError(f"privlevel {privlevel} is below privlevel_floor {floor}")
            ops.write(instance / "privlevel", str(privlevel).encode("ascii"))
        before = _read_int(ops, instance / "generation")
        ops.write(instance / "inblob", report_data)
        outblob = ops.read(instance / "outblob")
        auxblob = ops.read(instance / "auxblob") if ops.exists(instance / "auxblob") else None
        after = _read_int(ops, instance / "generation")
        if after != before + 1:
            raise CollectionError(
                f"configfs-tsm generation went from {before} to {after}: another writer changed the "
                "request; refusing the report"
            )
        if not outblob or len(outblob) > OUTBLOB_MAX:
            raise CollectionError(f"configfs-tsm outblob has {len(outblob)} bytes")
        return TSMReport(provider=provider, outblob=outblob, auxblob=auxblob or None, generation=after,
                         privlevel=privlevel)  # fmt: skip
    finally:
        ops.rmdir(instance)


def _read_int(ops: FileOps, path: Path) -> int:
    text = ops.read(path).strip()
    if not text.isdigit():
        raise CollectionError(f"{path.name}: expected a decimal number, got {text[:20]!r}")
    return int(text)


__all__ = ["FileOps", "TSMReport", "collect_configfs_tsm", "parse_snp_cert_table"]
