"""Intel TDX backend (TEE = "tdx"): quote v4/v5 verification, CCEL replay, appraisal policy.

    >>> from ray_confidential.attestation import tdx
    >>> tdx.TEE
    'tdx'

Contract (used by ``attest()``): :func:`verify_evidence`, :class:`Policy`, :func:`validate_claims`.
``verify_evidence`` additionally takes ``event_log=`` (the CCEL log area) to replay RTMR0-3.
"""

from .ccel import CCELTable, CCEvent, parse_event_log, replay_rtmrs
from .validate import Policy, validate_claims
from .verify import TEE, verify_evidence

__all__ = [
    "TEE",
    "CCELTable",
    "CCEvent",
    "Policy",
    "parse_event_log",
    "replay_rtmrs",
    "validate_claims",
    "verify_evidence",
]
