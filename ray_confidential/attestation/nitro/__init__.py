"""AWS Nitro Enclaves attestation documents (TEE kind ``"nitro"``).

Backend contract: :data:`TEE`, :func:`verify_evidence`, :class:`Policy`, :func:`validate_claims`.
``abi`` parses the COSE_Sign1 document, ``verify`` checks chain and signature, ``validate`` compares
claims with reference values. Reference: aws-nitro-enclaves-nsm-api ``docs/attestation_process.md``.

``VerifiedClaims`` produced here: ``report_data`` = ``user_data`` (b"" when absent);
``measurements`` = ``{"pcr0": ..., "pcr1": ..., ...}`` (48 bytes each, every PCR in the document);
``debug`` = PCR0 all zeros; ``details`` = ``module_id`` (str), ``digest`` ("SHA384"), ``timestamp``
(int, ms since epoch), ``nonce`` (bytes or None), ``public_key`` (bytes or None),
``user_data_present`` (bool), ``leaf_fingerprint`` (hex).
"""

from ray_confidential.attestation.nitro.abi import AttestationDocument, NitroDocument, parse_document
from ray_confidential.attestation.nitro.validate import Policy, validate_claims
from ray_confidential.attestation.nitro.verify import TEE, verify_evidence

__all__ = [
    "TEE",
    "AttestationDocument",
    "NitroDocument",
    "Policy",
    "parse_document",
    "validate_claims",
    "verify_evidence",
]
