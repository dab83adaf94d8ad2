"""DCAP collateral: QuoteCollateralV3 JSON, TCB info v3 and QE identity v2, and TCB evaluation.

The collateral is the JSON object that Phala-Network/dcap-qvl calls ``QuoteCollateralV3``:
``pck_crl_issuer_chain`` (PEM), ``root_ca_crl`` and ``pck_crl`` (hex DER), ``tcb_info_issuer_chain``,
``tcb_info`` (the exact signed JSON text of the ``tcbInfo`` object), ``tcb_info_signature`` (hex r||s),
``qe_identity_issuer_chain``, ``qe_identity`` (exact signed text of ``enclaveIdentity``),
``qe_identity_signature``. Formats: "Intel PCS API" v4 (TCB Info V3, Enclave Identity V2).

    >>> TcbStatus.merge(("UpToDate", ("INTEL-SA-1",)), ("OutOfDate", ("INTEL-SA-2",)))
    ('OutOfDate', ('INTEL-SA-1', 'INTEL-SA-2'))

TCB evaluation follows Intel's QVL as implemented by dcap-qvl (``verify.rs``: ``match_platform_tcb``,
``match_tdx_module_identity``, ``verify_qe_identity_policy``), the independent oracle of the tests.
This module parses and evaluates; it does NOT check signatures, certificate chains, CRLs or dates
(see :mod:`.verify`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ray_confidential.errors import AttestationError, EvidenceFormatError

from .abi import SGXReportBody, TDReport10

MAX_COLLATERAL_SIZE = 1024 * 1024

STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
"""TCB statuses in increasing severity (the order dcap-qvl's ``TcbStatus::severity`` uses)."""

StatusWithAdvisories = tuple[str, tuple[str, ...]]


class TcbStatus:
    """Helpers over status strings (severity order of :data:`STATUSES`)."""

    @staticmethod
    def severity(status: str) -> int:
        return STATUSES.index(status)

    @staticmethod
    def merge(a: StatusWithAdvisories, b: StatusWithAdvisories) -> StatusWithAdvisories:
        """The worse status; advisories of ``a`` then new ones of ``b`` (dcap-qvl ``merge``)."""
        status = b[0] if TcbStatus.severity(b[0]) > TcbStatus.severity(a[0]) else a[0]
        ids = list(a[1])
        for i in b[1]:
            if i not in ids:
                ids.append(i)
        return status, tuple(ids)


def _fmt(msg: str) -> EvidenceFormatError:
    return EvidenceFormatError(f"DCAP collateral: {msg}")


def _obj(d: Any, key: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise _fmt(f"missing field {key!r}")
    return d[key]


def _str(d: Any, key: str) -> str:
    v = _obj(d, key)
    if not isinstance(v, str):
        raise _fmt(f"{key!r} must be a string")
    return v


def _int(d: Any, key: str, hi: int) -> int:
    v = _obj(d, key)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
        raise _fmt(f"{key!r} must be an integer in [0, {hi}]")
    return v


def _hex(d: Any, key: str, size: int | None = None) -> bytes:
    try:
        v = bytes.fromhex(_str(d, key))
    except ValueError as e:
        raise _fmt(f"{key!r} is not hex") from e
    if size is not None and len(v) != size:
        raise _fmt(f"{key!r} must be {size} bytes")
    return v


def _status(d: Any) -> str:
    s = _str(d, "tcbStatus")
    if s not in STATUSES:
        raise _fmt(f"unknown tcbStatus {s!r}")
    return s


def _advisories(d: Any) -> tuple[str, ...]:
    ids = d.get("advisoryIDs", []) if isinstance(d, dict) else []
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise _fmt("advisoryIDs must be a list of strings")
    return tuple(ids)


def _list(d: Any, key: str, default: list[Any] | None = None) -> list[Any]:
    v = d.get(key, default) if isinstance(d, dict) else default
    if v is None:
        raise _fmt(f"missing field {key!r}")
    if not isinstance(v, list):
        raise _fmt(f"{key!r} must be a list")
    return v


def parse_time(s: str) -> datetime:
    """RFC 3339 time as used by Intel PCS (``2025-06-19T10:16:03Z``)."""
    try:
        t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError as e:
        raise _fmt(f"bad date {s!r}") from e
    if t.tzinfo is None:
        raise _fmt(f"date without time zone {s!r}")
    return t.astimezone(timezone.utc)


def _svns(items: list[Any], what: str) -> tuple[int, ...]:
    return tuple(_int(c, "svn", 255) for c in items)


@dataclass(frozen=True, slots=True, kw_only=True)
class TcbLevel:
    """One TCB level: SGX component SVNs, PCESVN, TDX component SVNs (TDX only), status, advisories."""

    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...]
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxModuleIdentity:
    """``tdxModule`` (id "") or one ``tdxModuleIdentities`` entry (id "TDX_03", ...)."""

    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[tuple[int, str, tuple[str, ...]], ...]  # (isvsvn, status, advisories)


@dataclass(frozen=True, slots=True, kw_only=True)
class TcbInfo:
    """TCB Info (Intel PCS API, TCB Info V2/V3)."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_evaluation_data_number: int
    tcb_levels: tuple[TcbLevel, ...]
    tdx_module: TdxModuleIdentity | None
    tdx_module_identities: tuple[TdxModuleIdentity, ...]

    @classmethod
    def from_json(cls, text: str) -> TcbInfo:
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise _fmt("tcb_info is not JSON") from e
        levels = []
        for lv in _list(d, "tcbLevels"):
            tcb = _obj(lv, "tcb")
            levels.append(
                TcbLevel(
                    sgx_components=_svns(_list(tcb, "sgxtcbcomponents"), "sgx"),
                    pce_svn=_int(tcb, "pcesvn", 0xFFFF),
                    tdx_components=_svns(_list(tcb, "tdxtcbcomponents", []), "tdx"),
                    status=_status(lv),
                    advisory_ids=_advisories(lv),
                )
            )
        module = None
        if isinstance(d, dict) and d.get("tdxModule") is not None:
            module = _module(d["tdxModule"], "")
        identities = tuple(_module(m, _str(m, "id")) for m in _list(d, "tdxModuleIdentities", []))
        return cls(
            id=_str(d, "id"),
            version=_int(d, "version", 255),
            issue_date=parse_time(_str(d, "issueDate")),
            next_update=parse_time(_str(d, "nextUpdate")),
            fmspc=_hex(d, "fmspc", 6),
            pce_id=_hex(d, "pceId", 2),
            tcb_evaluation_data_number=_int(d, "tcbEvaluationDataNumber", 2**32 - 1),
            tcb_levels=tuple(levels),
            tdx_module=module,
            tdx_module_identities=identities,
        )


def _module(m: Any, ident: str) -> TdxModuleIdentity:
    levels = tuple(
        (_int(_obj(lv, "tcb"), "isvsvn", 255), _status(lv), _advisories(lv))
        for lv in _list(m, "tcbLevels", [])
    )
    return TdxModuleIdentity(
        id=ident,
        mrsigner=_hex(m, "mrsigner", 48),
        attributes=_hex(m, "attributes", 8),
        attributes_mask=_hex(m, "attributesMask", 8),
        tcb_levels=levels,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class QEIdentity:
    """QE / TD_QE Enclave Identity (Intel PCS API, Enclave Identity V2)."""

    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    miscselect: bytes
    miscselect_mask: bytes
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isv_prod_id: int
    tcb_levels: tuple[tuple[int, str, tuple[str, ...]], ...]  # (isvsvn, status, advisories)

    @classmethod
    def from_json(cls, text: str) -> QEIdentity:
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise _fmt("qe_identity is not JSON") from e
        levels = tuple(
            (_int(_obj(lv, "tcb"), "isvsvn", 0xFFFF), _status(lv), _advisories(lv))
            for lv in _list(d, "tcbLevels")
        )
        return cls(
            id=_str(d, "id"),
            version=_int(d, "version", 255),
            issue_date=parse_time(_str(d, "issueDate")),
            next_update=parse_time(_str(d, "nextUpdate")),
            tcb_evaluation_data_number=_int(d, "tcbEvaluationDataNumber", 2**32 - 1),
            miscselect=_hex(d, "miscselect", 4),
            miscselect_mask=_hex(d, "miscselectMask", 4),
            attributes=_hex(d, "attributes", 16),
            attributes_mask=_hex(d, "attributesMask", 16),
            mrsigner=_hex(d, "mrsigner", 32),
            isv_prod_id=_int(d, "isvprodid", 0xFFFF),
            tcb_levels=levels,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class QuoteCollateralV3:
    """The collateral JSON, parsed. ``tcb_info`` / ``qe_identity`` keep the exact signed text."""

    pck_crl_issuer_chain: str
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: bytes
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> QuoteCollateralV3:
        if not isinstance(data, (bytes, bytearray)):
            raise _fmt("collateral must be bytes")
        if len(data) > MAX_COLLATERAL_SIZE:
            raise _fmt("collateral too large")
        try:
            d = json.loads(bytes(data).decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise _fmt("not UTF-8 JSON") from e
        if not isinstance(d, dict):
            raise _fmt("not a JSON object")
        return cls(
            pck_crl_issuer_chain=_str(d, "pck_crl_issuer_chain"),
            root_ca_crl=_hex(d, "root_ca_crl"),
            pck_crl=_hex(d, "pck_crl"),
            tcb_info_issuer_chain=_str(d, "tcb_info_issuer_chain"),
            tcb_info=_str(d, "tcb_info"),
            tcb_info_signature=_hex(d, "tcb_info_signature", 64),
            qe_identity_issuer_chain=_str(d, "qe_identity_issuer_chain"),
            qe_identity=_str(d, "qe_identity"),
            qe_identity_signature=_hex(d, "qe_identity_signature", 64),
        )

    def to_bytes(self) -> bytes:
        """Canonical JSON encoding (field order of dcap-qvl; CRLs and signatures as hex)."""
        return json.dumps(
            {
                "pck_crl_issuer_chain": self.pck_crl_issuer_chain,
                "root_ca_crl": self.root_ca_crl.hex(),
                "pck_crl": self.pck_crl.hex(),
                "tcb_info_issuer_chain": self.tcb_info_issuer_chain,
                "tcb_info": self.tcb_info,
                "tcb_info_signature": self.tcb_info_signature.hex(),
                "qe_identity_issuer_chain": self.qe_identity_issuer_chain,
                "qe_identity": self.qe_identity,
                "qe_identity_signature": self.qe_identity_signature.hex(),
            }
        ).encode()


# --- Evaluation -----------------------------------------------------------------------------------


def _sorted_levels(info: TcbInfo) -> list[TcbLevel]:
    """Canonical order (dcap-qvl ``canonicalize_tcb_levels``): descending SGX SVNs, PCESVN, TDX SVNs."""
    is_tdx = info.version >= 3 and info.id == "TDX"
    return sorted(
        info.tcb_levels,
        key=lambda lv: (lv.sgx_components, lv.pce_svn, lv.tdx_components if is_tdx else ()),
        reverse=True,
    )


def match_platform_tcb(
    info: TcbInfo,
    *,
    tdx: bool,
    cpu_svn: bytes,
    pce_svn: int,
    fmspc: bytes,
    pce_id: bytes,
    td: TDReport10 | None,
) -> StatusWithAdvisories:
    """Platform TCB status (+ TDX module status for TDX). Raises :class:`AttestationError`."""
    if fmspc != info.fmspc:
        raise AttestationError(f"TCB info FMSPC {info.fmspc.hex()} does not match the PCK's {fmspc.hex()}")
    if pce_id != info.pce_id:
        raise AttestationError(f"TCB info PCE-ID {info.pce_id.hex()} does not match the PCK's {pce_id.hex()}")
    if tdx and (info.version < 3 or info.id != "TDX"):
        raise AttestationError("TDX quote with non-TDX TCB info in the collateral")
    if not tdx and (info.version < 2 or info.id != "SGX"):
        raise AttestationError("SGX quote with non-SGX TCB info in the collateral")
    if tdx and td is None:
        raise AttestationError("TDX TCB evaluation needs the TD report body")
    for level in _sorted_levels(info):
        if pce_svn < level.pce_svn:
            continue
        if len(level.sgx_components) != len(cpu_svn):
            raise AttestationError("TCB info: SGX component count mismatch")
        if any(a < b for a, b in zip(cpu_svn, level.sgx_components, strict=True)):
            continue
        if td is not None and tdx:
            if len(level.tdx_components) != len(td.tee_tcb_svn):
                raise AttestationError("TCB info: TDX component count mismatch")
            if any(a < b for a, b in zip(td.tee_tcb_svn, level.tdx_components, strict=True)):
                continue
        status: StatusWithAdvisories = (level.status, level.advisory_ids)
        if td is not None and tdx:
            module = _match_tdx_module(info, td)
            if module is not None:
                status = TcbStatus.merge(status, module)
        return status
    raise AttestationError("no matching TCB level found (platform TCB is not supported by this TCB info)")


def _match_tdx_module(info: TcbInfo, td: TDReport10) -> StatusWithAdvisories | None:
    """TDX module identity (dcap-qvl ``match_tdx_module_identity``, after Intel QVL)."""
    if info.tdx_module is None:
        raise AttestationError("TDX TCB info is missing tdxModule")
    isvsvn, version = td.tee_tcb_svn[0], td.tee_tcb_svn[1]
    expected = info.tdx_module
    levels = None
    if version > 0 and info.tdx_module_identities:
        wanted = f"TDX_{version:02X}"
        found = [m for m in info.tdx_module_identities if m.id.upper() == wanted]
        if not found:
            raise AttestationError(f"no TDX module identity {wanted} in TCB info")
        expected = found[0]
        levels = expected.tcb_levels
    if td.mr_signer_seam != expected.mrsigner:
        raise AttestationError("TDX module MRSIGNER does not match TCB info")
    for want, mask, got in zip(
        expected.attributes, expected.attributes_mask, td.seam_attributes, strict=True
    ):
        if want & mask != got & mask or got & ~mask & 0xFF:
            raise AttestationError("TDX module SEAM attributes do not match TCB info")
    if levels is None:
        return None
    for lv_svn, status, ids in levels:
        if isvsvn >= lv_svn:
            return status, ids
    raise AttestationError(f"TDX module ISVSVN {isvsvn} is below every TCB level of {expected.id}")


def match_qe_identity(qe: QEIdentity, report: SGXReportBody, *, tdx: bool) -> StatusWithAdvisories:
    """QE report vs QE identity: MRSIGNER, ISVPRODID, masked MISCSELECT/ATTRIBUTES, ISVSVN level."""
    want_id, versions = ("TD_QE", (2, 3)) if tdx else ("QE", (2,))
    if qe.id != want_id or qe.version not in versions:
        raise AttestationError(
            f"QE identity {qe.id!r} v{qe.version} does not fit this quote (want {want_id})"
        )
    if report.mr_signer != qe.mrsigner:
        raise AttestationError("QE MRSIGNER does not match the QE identity")
    if report.debug:
        raise AttestationError("QE runs in debug mode")
    if report.isv_prod_id != qe.isv_prod_id:
        raise AttestationError("QE ISVPRODID does not match the QE identity")
    misc = report.misc_select.to_bytes(4, "little")
    if any(a & m != b & m for a, b, m in zip(misc, qe.miscselect, qe.miscselect_mask, strict=True)):
        raise AttestationError("QE MISCSELECT does not match the QE identity")
    if any(
        a & m != b & m for a, b, m in zip(report.attributes, qe.attributes, qe.attributes_mask, strict=True)
    ):
        raise AttestationError("QE ATTRIBUTES do not match the QE identity")
    for lv_svn, status, ids in qe.tcb_levels:
        if report.isv_svn >= lv_svn:
            return status, ids
    raise AttestationError(f"QE ISVSVN {report.isv_svn} is below every QE identity TCB level")
