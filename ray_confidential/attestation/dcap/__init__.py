"""Intel DCAP quote machinery shared by the TDX and SGX backends (quote v3/v4/v5, PCK, collateral).

>>> from ray_confidential.attestation.dcap import Quote, verify_quote
>>> callable(verify_quote) and hasattr(Quote, "from_bytes")
True
"""

from .abi import Quote, QuoteHeader, SGXReportBody, TDReport10, TDReport15, parse_quote
from .collateral import QEIdentity, QuoteCollateralV3, TcbInfo
from .pck import PCKExtension, pck_extension
from .verify import (
    DCAPVerification,
    VerifiedCollateral,
    cache_stats,
    clear_caches,
    load_certificates,
    verify_collateral,
    verify_quote,
)

__all__ = [
    "DCAPVerification",
    "PCKExtension",
    "QEIdentity",
    "Quote",
    "QuoteCollateralV3",
    "QuoteHeader",
    "SGXReportBody",
    "TDReport10",
    "TDReport15",
    "TcbInfo",
    "VerifiedCollateral",
    "cache_stats",
    "clear_caches",
    "load_certificates",
    "parse_quote",
    "pck_extension",
    "verify_collateral",
    "verify_quote",
]
