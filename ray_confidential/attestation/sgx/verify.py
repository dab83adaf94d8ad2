"""Verify an SGX DCAP quote (v3) into :class:`VerifiedClaims`.

    >>> from ray_confidential.testing.dcap_fake import DCAPTestRoot, build_evidence
    >>> from datetime import datetime, timezone
    >>> from ray_confidential.attestation.trust import TrustConfig
    >>> root = DCAPTestRoot.generate()
    >>> ev = build_evidence(root, tee="sgx", report_data=bytes(64))
    >>> verify_evidence(ev.evidence, trust=TrustConfig.development([root.root_certificate]),
    ...                 collateral=ev.collateral, now=datetime.now(timezone.utc)).tcb_status
    'UpToDate'

The signature, chain and collateral work is :func:`ray_confidential.attestation.dcap.verify_quote`.
NOT checked here: MRENCLAVE / MRSIGNER pins, ISV product id / SVN, debug, report data (see :mod:`.validate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from ray_confidential.attestation.claims import VerifiedClaims
from ray_confidential.attestation.dcap.abi import SGXReportBody
from ray_confidential.attestation.dcap.verify import verify_quote
from ray_confidential.attestation.trust import TrustConfig, certificate_errors_are_format_errors
from ray_confidential.errors import AttestationError

TEE = "sgx"


@certificate_errors_are_format_errors
def verify_evidence(
    evidence: bytes,
    *,
    trust: TrustConfig,
    certs: Sequence[bytes] = (),
    collateral: bytes | None = None,
    now: datetime,
) -> VerifiedClaims:
    """Verify an SGX quote at ``now``.

    ``details`` keys: quote_version, isv_prod_id, isv_svn (ints), attributes, misc_select (int), cpu_svn,
    config_id, config_svn (int), isv_ext_prod_id, isv_family_id, fmspc, pce_svn, platform_tcb_status,
    qe_tcb_status, tcb_evaluation_data_number, collateral_expires. Byte values are lower-case hex.

    Raises:
        EvidenceFormatError: unparseable quote, certificate or collateral.
        AttestationError: signature / chain / CRL / TCB failure, or a TDX quote.
    """
    result = verify_quote(evidence, trust=trust, certs=certs, collateral=collateral, now=now)
    body = result.quote.body
    if result.quote.is_tdx or not isinstance(body, SGXReportBody):
        raise AttestationError("not an SGX quote (this is a TDX quote: use the tdx backend)")
    return VerifiedClaims(
        tee=TEE,
        debug=body.debug,
        report_data=body.report_data,
        measurements={"mr_enclave": body.mr_enclave, "mr_signer": body.mr_signer},
        tcb_status=result.tcb_status,
        advisories=result.advisories,
        root_fingerprint=result.root_fingerprint,
        details={
            "quote_version": result.quote.header.version,
            "isv_prod_id": body.isv_prod_id,
            "isv_svn": body.isv_svn,
            "attributes": body.attributes.hex(),
            "misc_select": body.misc_select,
            "cpu_svn": body.cpu_svn.hex(),
            "config_id": body.config_id.hex(),
            "config_svn": body.config_svn,
            "isv_ext_prod_id": body.isv_ext_prod_id.hex(),
            "isv_family_id": body.isv_family_id.hex(),
            "fmspc": result.pck.fmspc.hex(),
            "pce_svn": result.pck.pce_svn,
            "platform_tcb_status": result.platform_tcb_status,
            "qe_tcb_status": result.qe_tcb_status,
            "tcb_evaluation_data_number": result.tcb_evaluation_data_number,
            "collateral_expires": result.collateral_expires.isoformat()
            if result.collateral_expires
            else None,
        },
    )
