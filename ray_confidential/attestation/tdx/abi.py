"""TDX quote records (v4: TD 1.0 body; v5: body type 2 TD 1.0 or 3 TD 1.5), re-exported from the DCAP layer.

    >>> from ray_confidential.attestation.tdx.abi import TD_REPORT10_SIZE, TD_REPORT15_SIZE
    >>> (TD_REPORT10_SIZE, TD_REPORT15_SIZE)
    (584, 648)

Layouts: "Intel TDX DCAP Quote Generation Library and Quote Verification Library", A.3. Parsing only;
this module does NOT verify anything.
"""

from ray_confidential.attestation.dcap.abi import (
    BODY_TYPE_TD10,
    BODY_TYPE_TD15,
    TD_ATTRIBUTES_DEBUG,
    TD_REPORT10_SIZE,
    TD_REPORT15_SIZE,
    Quote,
    TDReport10,
    TDReport15,
    parse_quote,
)

TD_ATTRIBUTES_SEPT_VE_DISABLE_BYTE = 3
TD_ATTRIBUTES_SEPT_VE_DISABLE_BIT = 0x10  # TDATTRIBUTES bit 28 (TDX module ABI "TD Attributes")

__all__ = [
    "BODY_TYPE_TD10",
    "BODY_TYPE_TD15",
    "TD_ATTRIBUTES_DEBUG",
    "TD_ATTRIBUTES_SEPT_VE_DISABLE_BIT",
    "TD_ATTRIBUTES_SEPT_VE_DISABLE_BYTE",
    "TD_REPORT10_SIZE",
    "TD_REPORT15_SIZE",
    "Quote",
    "TDReport10",
    "TDReport15",
    "parse_quote",
]
