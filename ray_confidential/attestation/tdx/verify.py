"""Verify a TDX quote (v4, v5) into :class:`VerifiedClaims`, optionally replaying a CCEL event log.

    >>> from ray_confidential.testing.dcap_fake import DCAPTestRoot, build_evidence
    >>> from datetime import datetime, timezone
    >>> from ray_confidential.attestation.trust import TrustConfig
    >>> root = DCAPTestRoot.generate()
    >>> ev = build_evidence(root, tee="tdx", report_data=bytes(64))
    >>> claims = verify_evidence(ev.evidence, trust=TrustConfig.development([root.root_certificate]),
    ...                          collateral=ev.collateral, now=datetime.now(timezone.utc))
    >>> claims.tee, claims.tcb_status
    ('tdx', 'UpToDate')

The signature, chain and collateral work is :func:`ray_confidential.attestation.dcap.verify_quote`.
NOT checked here: MRTD/RTMR pins, debug, TD attributes, report data binding (see :mod:`.validate`).
Without ``event_log`` the RTMRs are reported as quoted, not replayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ray_confidential.attestation.claims import VerifiedClaims
from ray_confidential.attestation.dcap.abi import TDReport10, TDReport15
from ray_confidential.attestation.dcap.verify import verify_quote
from ray_confidential.attestation.trust import TrustConfig, certificate_errors_are_format_errors
from ray_confidential.errors import AttestationError

from .ccel import check_rtmrs, parse_event_log

TEE = "tdx"


@certificate_errors_are_format_errors
def verify_evidence(
    evidence: bytes,
    *,
    trust: TrustConfig,
    certs: Sequence[bytes] = (),
    collateral: bytes | None = None,
    now: datetime,
    event_log: bytes | None = None,
) -> VerifiedClaims:
    """Verify a TDX quote at ``now``; with ``event_log`` (CCEL log area), RTMR0-3 must replay.

    ``details`` keys: quote_version, body ("td1.0" / "td1.5"), td_attributes, xfam, tee_tcb_svn, mr_seam,
    mr_signer_seam, seam_attributes, (td1.5: tee_tcb_svn2, mr_service_td), fmspc, pce_svn, cpu_svn,
    platform_tcb_status, qe_tcb_status, tcb_evaluation_data_number, collateral_expires (ISO time or
    None), event_log_replayed (bool), event_count. Byte values are lower-case hex.

    Raises:
        EvidenceFormatError: unparseable quote, certificate, collateral or event log.
        AttestationError: signature / chain / CRL / TCB failure, an SGX quote, or an RTMR mismatch.
    """
    result = verify_quote(evidence, trust=trust, certs=certs, collateral=collateral, now=now)
    body = result.quote.body
    if not result.quote.is_tdx or not isinstance(body, TDReport10):
        raise AttestationError("not a TDX quote (this is an SGX quote: use the sgx backend)")
    details: dict[str, Any] = {
        "quote_version": result.quote.header.version,
        "body": "td1.5" if isinstance(body, TDReport15) else "td1.0",
        "td_attributes": body.td_attributes.hex(),
        "xfam": body.xfam.hex(),
        "tee_tcb_svn": body.tee_tcb_svn.hex(),
        "mr_seam": body.mr_seam.hex(),
        "mr_signer_seam": body.mr_signer_seam.hex(),
        "seam_attributes": body.seam_attributes.hex(),
        "fmspc": result.pck.fmspc.hex(),
        "pce_svn": result.pck.pce_svn,
        "cpu_svn": result.pck.cpu_svn.hex(),
        "platform_tcb_status": result.platform_tcb_status,
        "qe_tcb_status": result.qe_tcb_status,
        "tcb_evaluation_data_number": result.tcb_evaluation_data_number,
        "collateral_expires": result.collateral_expires.isoformat() if result.collateral_expires else None,
        "event_log_replayed": False,
        "event_count": 0,
    }
    if isinstance(body, TDReport15):
        details["tee_tcb_svn2"] = body.tee_tcb_svn2.hex()
        details["mr_service_td"] = body.mr_service_td.hex()
    if event_log is not None:
        events = parse_event_log(event_log)
        check_rtmrs(events, body.rtmrs)
        details["event_log_replayed"] = True
        details["event_count"] = len(events)
    return VerifiedClaims(
        tee=TEE,
        debug=body.debug,
        report_data=body.report_data,
        measurements={
            "mr_td": body.mr_td,
            "rtmr0": body.rtmr0,
            "rtmr1": body.rtmr1,
            "rtmr2": body.rtmr2,
            "rtmr3": body.rtmr3,
            "mr_config_id": body.mr_config_id,
            "mr_owner": body.mr_owner,
            "mr_owner_config": body.mr_owner_config,
        },
        tcb_status=result.tcb_status,
        advisories=result.advisories,
        root_fingerprint=result.root_fingerprint,
        details=details,
    )
