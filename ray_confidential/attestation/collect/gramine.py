"""Gramine ``/dev/attestation``: write ``user_report_data``, read ``quote`` (SGX DCAP quote v3).

    evidence = collect_gramine(binding.report_data())   # doctest: +SKIP

Gramine ("Attestation and Secret Provisioning", pseudo-files): ``attestation_type`` reads ``dcap``
when DCAP quotes are available (``none`` / ``epid`` are refused: EPID is retired); writing 64
bytes to ``user_report_data`` sets REPORTDATA of the next ``quote`` read.

What it does NOT do: verify the quote, or stop other threads of the enclave writing
``user_report_data`` between our write and read (the executor is the enclave's only user).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from ray_confidential.attestation.collect import CollectionError
from ray_confidential.attestation.collect.configfs_tsm import FileOps
from ray_confidential.attestation.evidence import Evidence

GRAMINE_ATTESTATION_PATH: Final = Path("/dev/attestation")
REPORT_DATA_SIZE: Final = 64
MAX_QUOTE_SIZE: Final = 64 * 1024


def collect_gramine(
    report_data: bytes, *, base: Path = GRAMINE_ATTESTATION_PATH, ops: FileOps | None = None
) -> Evidence:
    """An SGX quote whose REPORTDATA is ``report_data``.

    Raises:
        ValueError: wrong ``report_data`` size.
        CollectionError: attestation type is not ``dcap``, or the quote is empty or too large.
    """
    if len(report_data) != REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    ops = ops or FileOps()
    kind = ops.read(base / "attestation_type").decode("ascii", "replace").strip()
    if kind != "dcap":
        raise CollectionError(
            f'Gramine attestation type is {kind!r}; sgx.remote_attestation = "dcap" is needed'
        )
    ops.write(base / "user_report_data", report_data)
    quote = ops.read(base / "quote")
    if not quote or len(quote) > MAX_QUOTE_SIZE:
        raise CollectionError(f"Gramine quote has {len(quote)} bytes")
    return Evidence(tee="sgx", evidence=quote)


__all__ = ["collect_gramine"]
