"""Guest-side evidence collection: ask the TEE of this machine for evidence binding 64 bytes.

    >>> from ray_confidential.attestation.collect import available_interfaces
    >>> isinstance(available_interfaces(), list)
    True

Interfaces (``docs/collectors.md`` says which cloud exposes which):

- :func:`~ray_confidential.attestation.collect.configfs_tsm.collect_configfs_tsm`: Linux configfs-tsm
  (``/sys/kernel/config/tsm/report``; SEV-SNP and TDX guests, kernel >= 6.7).
- :func:`~ray_confidential.attestation.collect.sev_guest.collect_sev_guest`: ``/dev/sev-guest``
  ``SNP_GET_REPORT`` ioctl (older SNP kernels).
- :func:`~ray_confidential.attestation.collect.gramine.collect_gramine`: Gramine's
  ``/dev/attestation`` pseudo-files (SGX enclaves).
- :func:`~ray_confidential.attestation.collect.nsm.collect_nsm`: ``/dev/nsm`` (AWS Nitro Enclaves).

Every collector takes the path of its interface (and an injectable file or ioctl layer) so tests
run against fake trees. Only the executor may reach these interfaces: any process that can will get
genuine evidence for report data of its choice (threat model, A6).
"""

from __future__ import annotations

from pathlib import Path


class CollectionError(RuntimeError):
    """The TEE interface refused or produced unusable output (firmware error, concurrent writer, ...)."""


def available_interfaces(root: Path = Path("/")) -> list[str]:
    """Names of the attestation interfaces present under ``root`` (``configfs-tsm``, ``sev-guest``,
    ``gramine``, ``nsm``), in the order a collector should prefer them."""
    found = []
    if (root / "sys/kernel/config/tsm/report").is_dir():
        found.append("configfs-tsm")
    if (root / "dev/sev-guest").exists():
        found.append("sev-guest")
    if (root / "dev/attestation/quote").exists():
        found.append("gramine")
    if (root / "dev/nsm").exists():
        found.append("nsm")
    return found


__all__ = ["CollectionError", "available_interfaces"]
