"""NVIDIA H100 GPU attestation (TEE kind ``"nvidia-gpu"``), composite evidence next to a CPU TEE.

Backend contract: :data:`TEE`, :func:`verify_evidence`, :class:`Policy`, :func:`validate_claims`.
``abi`` parses the SPDM report, ``verify`` checks the device chain, FWID and signature, ``rim``
parses and verifies NVIDIA reference integrity manifests, ``validate`` compares claims with
reference values. Reference: NVIDIA/nvtrust local GPU verifier; DMTF DSP0274 (SPDM) 1.1.

Evidence: the report (GET_MEASUREMENTS request || MEASUREMENTS response) raw or as hex text; the
device certificate chain comes as ``certs`` (DER or PEM, any order). ``collateral`` is unused.

``VerifiedClaims`` produced here: ``report_data`` = the 32-byte SPDM requester nonce (the attest
layer derives it from the CPU session and checks it; ``Policy.expected_nonce`` does the same);
``measurements`` = ``{"measurement_<index>": value}`` for every block plus ``"measurement"`` =
SHA-384 of the measurement record (the value ``Policy.measurements`` pins); ``debug`` = False (not
in the report); ``details`` = ``responder_nonce`` (bytes), ``driver_version`` (str),
``vbios_version`` (str, nvtrust format), ``fwid`` (bytes or None), ``hw_model`` (CN of the
certificate above the leaf), ``ueid`` (leaf serial number, decimal str), ``leaf_fingerprint`` (hex).
"""

from ray_confidential.attestation.nvidia.abi import GPUAttestationReport, parse_report
from ray_confidential.attestation.nvidia.rim import ReferenceManifest, parse_rim, verify_rim_signature
from ray_confidential.attestation.nvidia.validate import Policy, validate_claims
from ray_confidential.attestation.nvidia.verify import TEE, verify_evidence

__all__ = [
    "TEE",
    "GPUAttestationReport",
    "Policy",
    "ReferenceManifest",
    "parse_report",
    "parse_rim",
    "validate_claims",
    "verify_evidence",
    "verify_rim_signature",
]
