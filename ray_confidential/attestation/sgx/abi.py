"""SGX quote records (v3), re-exported from the DCAP layer.

    >>> from ray_confidential.attestation.sgx.abi import SGX_REPORT_BODY_SIZE
    >>> SGX_REPORT_BODY_SIZE
    384

Layout: "Intel SGX ECDSA Quote Library API" A.4. Parsing only; this module does NOT verify anything.
"""

from ray_confidential.attestation.dcap.abi import (
    SGX_ATTRIBUTES_DEBUG,
    SGX_REPORT_BODY_SIZE,
    Quote,
    SGXReportBody,
)

__all__ = ["SGX_ATTRIBUTES_DEBUG", "SGX_REPORT_BODY_SIZE", "Quote", "SGXReportBody"]
