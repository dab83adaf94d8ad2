"""Evidence profiles: where the binding sits in a TEE's evidence and what its measurement covers.

A TEE kind says how evidence is signed; a profile says how it is *used* (design.md section 5, step 3).
The same SEV-SNP hardware yields a direct report (``snp-direct``: REPORT_DATA holds the binding) or,
behind Azure's paravisor, a report whose REPORT_DATA hashes runtime claims and a vTPM key
(``snp-azure-vtpm``: a different check, not yet supported). ``docs/evidence-profiles.md`` has the
full table.

    >>> get_profile("snp-direct").tee
    'sev-snp'
    >>> get_profile("nvidia-gpu").composite
    True
    >>> try:
    ...     get_profile("tdx-azure-vtpm")
    ... except ProfileNotSupportedError as exc:
    ...     print(str(exc)[:56])
    evidence profile 'tdx-azure-vtpm' is specified (docs/evi
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

BindingLocation = Literal["report_data", "nitro_user_data_and_nonce", "gpu_nonce", "azure_runtime_claims"]


class ProfileNotSupportedError(NotImplementedError):
    """The profile is specified (docs/evidence-profiles.md) but this version cannot appraise it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EvidenceProfile:
    """How one kind of evidence carries the binding and what its measurement proves.

    Attributes:
        name: profile name (``snp-direct``, ...).
        tee: TEE kind of the evidence this profile appraises (for a composite profile: the
            accompanying device, ``nvidia-gpu``; the CPU evidence uses its own direct profile).
        binding: where the binding sits: ``report_data`` (the 64 bytes equal
            ``Binding.report_data()``), ``nitro_user_data_and_nonce`` (``user_data`` equals
            ``Binding.report_data()`` and ``nonce`` equals the challenge nonce), ``gpu_nonce`` (every
            GPU's SPDM requester nonce equals ``Binding.gpu_nonce()``), ``azure_runtime_claims``.
        binding_field: the evidence field, in the vendor's words.
        measurement_covers: what the pinned measurement proves about the code.
        composite: True when the evidence is a CPU TEE's evidence plus device evidence.
        supported: False for profiles that are specified but not implemented.
    """

    name: str
    tee: str
    binding: BindingLocation
    binding_field: str
    measurement_covers: str
    composite: bool = False
    supported: bool = True


PROFILES: Final[dict[str, EvidenceProfile]] = {
    p.name: p
    for p in (
        EvidenceProfile(
            name="snp-direct",
            tee="sev-snp",
            binding="report_data",
            binding_field="ATTESTATION_REPORT.REPORT_DATA (64 bytes, SEV-SNP ABI spec 56860 table 22)",
            measurement_covers=(
                "MEASUREMENT: the launch digest of the initial guest memory and VMSAs (firmware; with "
                "measured direct boot also the kernel, initrd and command line, and through it a "
                "dm-verity root hash). Cloud images without measured direct boot: firmware only."
            ),
        ),
        EvidenceProfile(
            name="tdx-direct",
            tee="tdx",
            binding="report_data",
            binding_field="TD quote body REPORTDATA (64 bytes, Intel TDX DCAP quote spec, TD report body)",
            measurement_covers=(
                "MRTD: the TD's initial memory (TDVF firmware); RTMR0-2 (firmware configuration, "
                "kernel and command line, replayed from the CCEL event log); RTMR3 is guest-extendable."
            ),
        ),
        EvidenceProfile(
            name="sgx-gramine",
            tee="sgx",
            binding="report_data",
            binding_field="SGX enclave report REPORTDATA (64 bytes), written via Gramine /dev/attestation",
            measurement_covers=(
                "MRENCLAVE: every page of the enclave (Gramine LibOS, manifest, trusted files by hash); "
                "MRSIGNER: the key that signed the enclave."
            ),
        ),
        EvidenceProfile(
            name="nitro",
            tee="nitro",
            binding="nitro_user_data_and_nonce",
            binding_field="attestation document user_data (64 bytes) and nonce (the 32-byte challenge)",
            measurement_covers=(
                "PCR0: the enclave image file (kernel, init, application); PCR1: kernel and bootstrap; "
                "PCR2: the application; PCR8: the signing certificate of the image, when signed."
            ),
        ),
        EvidenceProfile(
            name="nvidia-gpu",
            tee="nvidia-gpu",
            binding="gpu_nonce",
            binding_field=(
                "SPDM GET_MEASUREMENTS requester nonce (32 bytes) = SHA-256(gpu-nonce context || binding); "
                "the CPU evidence carries the binding under its own direct profile"
            ),
            measurement_covers=(
                "The GPU's firmware measurements (VBIOS, driver-loaded microcode), comparable with "
                "NVIDIA's signed reference integrity manifests; the code runs on the CPU TEE."
            ),
            composite=True,
        ),
        EvidenceProfile(
            name="snp-azure-vtpm",
            tee="sev-snp",
            binding="azure_runtime_claims",
            binding_field=(
                "HCL report: REPORT_DATA = SHA-256 of the runtime claims JSON (vTPM key, user data); the "
                "binding goes into user data, the TPM quote signs PCRs with the vTPM key"
            ),
            measurement_covers="the paravisor (HCL) only; the OS is covered by vTPM PCRs",
            supported=False,
        ),
        EvidenceProfile(
            name="tdx-azure-vtpm",
            tee="tdx",
            binding="azure_runtime_claims",
            binding_field="TD quote REPORTDATA = SHA-256 of the runtime claims JSON, as snp-azure-vtpm",
            measurement_covers="the paravisor (HCL) only; the OS is covered by vTPM PCRs",
            supported=False,
        ),
    )
}
"""Every specified profile by name."""

DIRECT_PROFILE: Final[dict[str, str]] = {
    "sev-snp": "snp-direct",
    "tdx": "tdx-direct",
    "sgx": "sgx-gramine",
    "nitro": "nitro",
}
"""The direct profile of each CPU TEE kind (used for the CPU part of composite evidence)."""


def get_profile(name: str | EvidenceProfile) -> EvidenceProfile:
    """Look up a supported profile by name.

    Raises:
        ValueError: unknown name (the message lists the profiles).
        ProfileNotSupportedError: the profile is specified but not implemented yet.
    """
    if isinstance(name, EvidenceProfile):
        name = name.name
    try:
        profile = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown evidence profile {name!r}; profiles: {', '.join(PROFILES)}") from None
    if not profile.supported:
        raise ProfileNotSupportedError(
            f"evidence profile {name!r} is specified (docs/evidence-profiles.md) but not yet supported: "
            f"its binding sits in {profile.binding_field}"
        )
    return profile


__all__ = ["DIRECT_PROFILE", "PROFILES", "EvidenceProfile", "ProfileNotSupportedError", "get_profile"]
