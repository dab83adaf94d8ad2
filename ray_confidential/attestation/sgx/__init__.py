"""Intel SGX DCAP backend (TEE = "sgx"): quote v3 verification and appraisal policy.

    >>> from ray_confidential.attestation import sgx
    >>> sgx.TEE
    'sgx'

Contract (used by ``attest()``): :func:`verify_evidence`, :class:`Policy`, :func:`validate_claims`.
"""

from .validate import Policy, validate_claims
from .verify import TEE, verify_evidence

__all__ = ["TEE", "Policy", "validate_claims", "verify_evidence"]
