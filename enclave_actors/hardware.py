"""The executor's evidence from the TEE it runs in, through the guest interface of its kind.

    evidence = hardware_evidence("sev-snp")      # configfs-tsm if present, else /dev/sev-guest
    ev = evidence(binding)                        # an Evidence record for the broker

The executor is the only process that may reach these interfaces (threat model A6): they are
root-only on the image (configfs, ``/dev/sev-guest``, ``/dev/nsm``), the executor runs as that user
and Ray workers do not. Which interface each kind uses (docs/collectors.md):

========  ==================================  ============================================
TEE       interfaces, in the order tried      binding
========  ==================================  ============================================
sev-snp   configfs-tsm (``sev_guest``),       ``REPORT_DATA`` = ``Binding.report_data()``
          ``/dev/sev-guest``                  at ``privlevel`` (VMPL, default 0)
tdx       configfs-tsm (``tdx_guest``)        ``REPORTDATA`` = ``Binding.report_data()``
sgx       Gramine ``/dev/attestation``        ``user_report_data``
nitro     ``/dev/nsm``                        ``user_data`` and the challenge nonce
========  ==================================  ============================================

SEV-SNP certificates come from configfs-tsm's certificate table when the host provides one; on
platforms without it the executor is given the VCEK/VLEK chain (``certs``). TDX and SGX collateral
is the broker's to fetch or configure (its PCS/PCCS cache), not the guest's.

What it does NOT do: verify the evidence (the broker does), or simulate a TEE (``--attestation
simulated`` serves the simulated device, ``enclave_actors/device.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from ray_confidential.attestation.binding import Binding
from ray_confidential.attestation.collect import CollectionError, available_interfaces
from ray_confidential.attestation.evidence import Evidence
from ray_confidential.errors import AttestationError

INTERFACES: Final = {
    "sev-snp": ("configfs-tsm", "sev-guest"),
    "tdx": ("configfs-tsm",),
    "sgx": ("gramine",),
    "nitro": ("nsm",),
}
"""Guest interfaces each TEE kind can use, in the order :func:`hardware_evidence` tries them."""

_PROVIDERS: Final = {"sev-snp": "sev_guest", "tdx": "tdx_guest"}


def choose_interface(tee: str, requested: str = "auto", *, root: Path = Path("/")) -> str:
    """The interface to use: ``requested`` if it serves ``tee``, else (``auto``) the first of
    :data:`INTERFACES` that this machine exposes under ``root``.

    Raises:
        ValueError: ``requested`` cannot serve ``tee``, or (``auto``) none is present, with what was
            looked for.
    """
    usable = INTERFACES.get(tee)
    if usable is None:
        raise ValueError(f"no guest attestation interface for TEE kind {tee!r}")
    if requested != "auto":
        if requested not in usable:
            raise ValueError(f"{requested} cannot attest a {tee} guest (use one of: {', '.join(usable)})")
        return requested
    present = available_interfaces(root)
    for name in usable:
        if name in present:
            return name
    raise ValueError(f"this machine exposes no attestation interface for {tee} (looked for "
                     f"{', '.join(usable)} under {root}); on a development machine use the simulated "
                     "device (launch data with dev_roots)")  # fmt: skip


def hardware_evidence(
    tee: str,
    interface: str = "auto",
    *,
    privlevel: int = 0,
    certs: tuple[bytes, ...] = (),
    root: Path = Path("/"),
    **collector_args: Any,
) -> Callable[[Binding], Evidence]:
    """``evidence(binding)`` for this node's TEE through its guest interface (module docstring).

    Args:
        tee: the node's TEE kind (``--tee``).
        interface: ``auto`` or one of :data:`INTERFACES` ``[tee]``.
        privlevel: SEV-SNP only: the VMPL to report (the executor's own; the policy pins it).
        certs: SEV-SNP only: VCEK/VLEK chain (DER or PEM) for platforms whose host provides no
            certificate table.
        root: where the interfaces are looked for (``auto``).
        collector_args: passed to the collector (tests: ``base=`` / ``device=`` and the fake file or
            ioctl layer of ``ray_confidential.attestation.collect``).

    Raises:
        ValueError: as :func:`choose_interface`. The returned function raises ``AttestationError``
            when the interface refuses or answers unusably (the broker then gets nothing).
    """
    collect = _collector(tee, choose_interface(tee, interface, root=root), privlevel, certs, collector_args)

    def evidence(binding: Binding) -> Evidence:
        try:
            return collect(binding)
        except (CollectionError, OSError, ValueError) as exc:
            raise AttestationError(f"{tee} evidence collection failed: {exc}") from exc

    return evidence


def _collector(
    tee: str, name: str, privlevel: int, certs: tuple[bytes, ...], collector_args: dict[str, Any]
) -> Callable[[Binding], Evidence]:
    if name == "configfs-tsm":
        from ray_confidential.attestation.collect.configfs_tsm import collect_configfs_tsm

        level = privlevel if tee == "sev-snp" else None

        def via_tsm(binding: Binding) -> Evidence:
            report = collect_configfs_tsm(binding.report_data(), privlevel=level, **collector_args)
            if report.provider != _PROVIDERS[tee]:
                raise ValueError(f"configfs-tsm provider {report.provider!r} is not a {tee} guest")
            ev = report.to_evidence()
            return ev if ev.certs or not certs else Evidence(tee=ev.tee, evidence=ev.evidence, certs=certs)

        return via_tsm
    if name == "sev-guest":
        from ray_confidential.attestation.collect.sev_guest import collect_sev_guest_evidence

        return lambda b: collect_sev_guest_evidence(
            b.report_data(), vmpl=privlevel, certs=certs, **collector_args
        )
    if name == "gramine":
        from ray_confidential.attestation.collect.gramine import collect_gramine

        return lambda b: collect_gramine(b.report_data(), **collector_args)
    from ray_confidential.attestation.collect.nsm import collect_nsm_evidence

    return lambda b: collect_nsm_evidence(b.report_data(), b.nonce, **collector_args)


__all__ = ["INTERFACES", "choose_interface", "hardware_evidence"]
