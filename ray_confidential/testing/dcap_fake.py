"""Simulated Intel DCAP platform: a run-time test root, PCK chain, QE, and signed collateral.

Emits TDX (quote v4, or v5 with a TD 1.5 body) and SGX (quote v3) quotes in the real binary format, and
QuoteCollateralV3 JSON signed by a test TCB signing key, so the simulated platform gets a real TCB
status. Nothing here is a fixed key: every :class:`DCAPTestRoot` is generated at run time.

    >>> from datetime import datetime, timezone
    >>> from ray_confidential.attestation import tdx
    >>> from ray_confidential.attestation.trust import TrustConfig
    >>> root = DCAPTestRoot.generate()
    >>> ev = build_evidence(root, tee="tdx", report_data=b"\\x01" * 64)
    >>> claims = tdx.verify_evidence(ev.evidence, trust=TrustConfig.development([root.root_certificate]),
    ...                              collateral=ev.collateral, now=datetime.now(timezone.utc))
    >>> claims.tcb_status, claims.report_data[:1]
    ('UpToDate', b'\\x01')

Break hooks (keyword arguments of :func:`build_evidence`, each True to break one property):
``bad_quote_signature``, ``bad_qe_report_signature``, ``bad_qe_binding`` (QE report data does not bind
the attestation key), ``untrusted_root`` (chain to a different, non-allow-listed root), ``revoked_pck``
(PCK serial in the PCK CRL), ``expired_collateral`` (TCB info / QE identity past ``nextUpdate``),
``bad_tcb_info_signature``, ``bad_qe_identity_signature``, ``no_matching_tcb`` (every TCB level above the
platform), ``wrong_fmspc``. Value hooks: ``tcb_status`` / ``advisories`` (the matching level's),
``quote_version`` (TDX: 4 or 5), ``mr_config_id``, ``mr_owner``, ``isv_prod_id``, ``isv_svn``,
``mr_signer``, ``now`` (collateral issue time).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from ray_confidential.attestation.dcap.abi import (
    ATTESTATION_KEY_TYPE_ECDSA_P256,
    BODY_TYPE_SGX,
    BODY_TYPE_TD10,
    BODY_TYPE_TD15,
    CERT_DATA_TYPE_PCK_CERT_CHAIN,
    INTEL_QE_VENDOR_ID,
    TEE_TYPE_SGX,
    TEE_TYPE_TDX,
    CertificationData,
    ECDSA256QuoteSignatureData,
    QEReportCertificationData,
    Quote,
    QuoteHeader,
    ReportBody,
    SGXReportBody,
    TDReport10,
    TDReport15,
)
from ray_confidential.attestation.dcap.pck import SGX_EXTENSION_OID, encode_sgx_extension

from .evidence import FakeEvidence
from .x509_fake import issue, key_pem, key_usage

FMSPC = bytes.fromhex("00906ed50000")
PCE_ID = bytes(2)
PCE_SVN = 13
CPU_SVN = bytes([4, 4, 2, 2, 4, 1, 0, 5] + [0] * 8)
TEE_TCB_SVN = bytes([5, 3, 2] + [0] * 13)  # TDX module ISVSVN 5, module version 3 -> identity TDX_03
QE_MRSIGNER = hashlib.sha256(b"ray_confidential simulated quoting enclave").digest()
ENCLAVE_MRSIGNER = hashlib.sha256(b"ray_confidential simulated enclave signer").digest()
DEFAULT_MR_TD = hashlib.sha384(b"ray_confidential simulated TD").digest()
DEFAULT_MR_ENCLAVE = hashlib.sha256(b"ray_confidential simulated enclave").digest()
QE_ISV_SVN = 8
_TD_ATTRIBUTES = bytes([0, 0, 0, 0x10, 0, 0, 0, 0])  # SEPT_VE_DISABLE (bit 28)
_SGX_ATTRIBUTES = bytes.fromhex("0500000000000000e700000000000000")  # INIT | MODE64BIT, XFRM
_QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
_BREAKS = frozenset(
    {
        "bad_quote_signature",
        "bad_qe_report_signature",
        "bad_qe_binding",
        "untrusted_root",
        "revoked_pck",
        "expired_collateral",
        "bad_tcb_info_signature",
        "bad_qe_identity_signature",
        "no_matching_tcb",
        "wrong_fmspc",
    }
)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ray_confidential test"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    path_length: int | None,
    start: datetime,
    years: int,
    extensions: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    exts: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), True),
        (key_usage(ca=ca, digital_signature=not ca, content_commitment=not ca), True),
        (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
    ]
    if issuer is not None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
        exts.append((aki, False))
    exts.extend((ext, False) for ext in extensions)
    return issue(
        _name(subject),
        key,
        issuer,
        issuer_key,
        not_before=start,
        not_after=start + timedelta(days=365 * years),
        extensions=exts,
        algorithm=hashes.SHA256(),
    )


def _crl(
    issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, now: datetime, revoked: Sequence[int] = ()
) -> x509.CertificateRevocationList:
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now - timedelta(hours=1))
        .next_update(now + timedelta(days=30))
        .add_extension(x509.CRLNumber(1), critical=False)
    )
    for serial in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - timedelta(hours=1))
            .build()
        )
    return b.sign(key, hashes.SHA256())


def _sign_rs(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )[1:]


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


_ORDER = ("root", "platform_ca", "pck", "tcb_signing")


@dataclass(frozen=True, slots=True, kw_only=True)
class DCAPTestRoot:
    """A simulated Intel hierarchy: root CA -> PCK platform CA -> PCK leaf; root -> TCB signing cert.

    Also holds the QE attestation key. Hand it to another process with :meth:`to_pem` /
    :meth:`from_pem` (launch data; it contains private keys of this test hierarchy only).
    """

    root_certificate: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    platform_ca_certificate: x509.Certificate
    platform_ca_key: ec.EllipticCurvePrivateKey
    pck_certificate: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    tcb_signing_certificate: x509.Certificate
    tcb_signing_key: ec.EllipticCurvePrivateKey
    attestation_key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, *, not_before: datetime | None = None, years: int = 7) -> DCAPTestRoot:
        """Fresh keys and certificates, valid from ``not_before`` (default: a day ago) for ``years``."""
        start = (not_before or datetime.now(timezone.utc)) - timedelta(days=1)
        keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(5)]
        root = _cert(
            "DCAP Test Root CA", keys[0], None, keys[0], ca=True, path_length=1, start=start, years=years + 3
        )
        platform = _cert(
            "DCAP Test PCK Platform CA",
            keys[1],
            root,
            keys[0],
            ca=True,
            path_length=0,
            start=start,
            years=years + 1,
        )
        sgx_ext = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(SGX_EXTENSION_OID),
            encode_sgx_extension(
                ppid=hashlib.sha256(_raw_point(keys[2])).digest()[:16],
                cpu_svn=CPU_SVN,
                pce_svn=PCE_SVN,
                pce_id=PCE_ID,
                fmspc=FMSPC,
            ),
        )
        pck = _cert(
            "DCAP Test PCK Certificate",
            keys[2],
            platform,
            keys[1],
            ca=False,
            path_length=None,
            start=start,
            years=years,
            extensions=[sgx_ext],
        )
        tcb = _cert(
            "DCAP Test TCB Signing",
            keys[3],
            root,
            keys[0],
            ca=False,
            path_length=None,
            start=start,
            years=years,
        )
        return cls(
            root_certificate=root,
            root_key=keys[0],
            platform_ca_certificate=platform,
            platform_ca_key=keys[1],
            pck_certificate=pck,
            pck_key=keys[2],
            tcb_signing_certificate=tcb,
            tcb_signing_key=keys[3],
            attestation_key=keys[4],
        )

    def to_pem(self) -> bytes:
        """Certificates and keys as PEM blocks in a fixed order (root, platform CA, PCK, TCB signing, AK)."""
        out = b""
        for name in _ORDER:
            out += _pem(getattr(self, f"{name}_certificate")) + key_pem(getattr(self, f"{name}_key"))
        return out + key_pem(self.attestation_key)

    @classmethod
    def from_pem(cls, data: bytes) -> DCAPTestRoot:
        pems = [
            m.group(0)
            for m in re.finditer(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", data, flags=re.S)
        ]
        if len(pems) != 2 * len(_ORDER) + 1:
            raise ValueError(
                "not a DCAPTestRoot PEM bundle (want 4 certificate/key pairs and an attestation key)"
            )
        args: dict[str, Any] = {}
        for i, name in enumerate(_ORDER):
            args[f"{name}_certificate"] = x509.load_pem_x509_certificate(pems[2 * i])
            args[f"{name}_key"] = serialization.load_pem_private_key(pems[2 * i + 1], password=None)
        args["attestation_key"] = serialization.load_pem_private_key(pems[-1], password=None)
        return cls(**args)


def _tcb_level(status: str, advisories: Sequence[str], tdx: bool, sgx: bytes, pce: int) -> dict[str, Any]:
    tcb: dict[str, Any] = {"sgxtcbcomponents": [{"svn": s} for s in sgx], "pcesvn": pce}
    if tdx:
        tcb["tdxtcbcomponents"] = [{"svn": s} for s in TEE_TCB_SVN]
    level: dict[str, Any] = {"tcb": tcb, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": status}
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_collateral(
    root: DCAPTestRoot,
    *,
    tee: str,
    now: datetime | None = None,
    tcb_status: str = "UpToDate",
    advisories: Sequence[str] = (),
    **breaks: bool,
) -> bytes:
    """QuoteCollateralV3 JSON for the simulated platform, signed by ``root``'s TCB signing key."""
    tdx = tee == "tdx"
    now = now or datetime.now(timezone.utc)
    issue = now - timedelta(hours=1)
    if breaks.get("expired_collateral"):
        issue = now - timedelta(days=40)
    nxt = issue + timedelta(days=30)
    sgx = bytes(CPU_SVN)
    pce = PCE_SVN
    if breaks.get("no_matching_tcb"):
        sgx = bytes(min(255, c + 1) for c in CPU_SVN)
    levels = [
        _tcb_level(tcb_status, advisories, tdx, sgx, pce),
        _tcb_level("OutOfDate", ["INTEL-SA-00000"], tdx, bytes(16), 0),
    ]
    if breaks.get("no_matching_tcb"):
        levels = levels[:1]
    info: dict[str, Any] = {
        "id": "TDX" if tdx else "SGX",
        "version": 3,
        "issueDate": _iso(issue),
        "nextUpdate": _iso(nxt),
        "fmspc": (bytes(6) if breaks.get("wrong_fmspc") else FMSPC).hex().upper(),
        "pceId": PCE_ID.hex().upper(),
        "tcbType": 0,
        "tcbEvaluationDataNumber": 17,
    }
    if tdx:
        module = {"mrsigner": "00" * 48, "attributes": "00" * 8, "attributesMask": "FF" * 8}
        info["tdxModule"] = module
        info["tdxModuleIdentities"] = [
            dict(
                module,
                id="TDX_03",
                tcbLevels=[
                    {"tcb": {"isvsvn": 5}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"}
                ],
            )
        ]
    info["tcbLevels"] = levels
    qe = {
        "id": "TD_QE" if tdx else "QE",
        "version": 2,
        "issueDate": _iso(issue),
        "nextUpdate": _iso(nxt),
        "tcbEvaluationDataNumber": 17,
        "miscselect": "00000000",
        "miscselectMask": "FFFFFFFF",
        "attributes": _QE_ATTRIBUTES.hex().upper(),
        "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
        "mrsigner": QE_MRSIGNER.hex().upper(),
        "isvprodid": 2 if tdx else 1,
        "tcbLevels": [
            {"tcb": {"isvsvn": QE_ISV_SVN}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"}
        ],
    }
    tcb_text = json.dumps(info, separators=(",", ":"))
    qe_text = json.dumps(qe, separators=(",", ":"))
    tcb_sig = bytearray(_sign_rs(root.tcb_signing_key, tcb_text.encode()))
    qe_sig = bytearray(_sign_rs(root.tcb_signing_key, qe_text.encode()))
    if breaks.get("bad_tcb_info_signature"):
        tcb_sig[5] ^= 1
    if breaks.get("bad_qe_identity_signature"):
        qe_sig[5] ^= 1
    revoked = [root.pck_certificate.serial_number] if breaks.get("revoked_pck") else []
    signing_chain = (_pem(root.tcb_signing_certificate) + _pem(root.root_certificate)).decode()
    return json.dumps(
        {
            "pck_crl_issuer_chain": (
                _pem(root.platform_ca_certificate) + _pem(root.root_certificate)
            ).decode(),
            "root_ca_crl": _crl(root.root_certificate, root.root_key, now)
            .public_bytes(serialization.Encoding.DER)
            .hex(),
            "pck_crl": _crl(root.platform_ca_certificate, root.platform_ca_key, now, revoked)
            .public_bytes(serialization.Encoding.DER)
            .hex(),
            "tcb_info_issuer_chain": signing_chain,
            "tcb_info": tcb_text,
            "tcb_info_signature": bytes(tcb_sig).hex(),
            "qe_identity_issuer_chain": signing_chain,
            "qe_identity": qe_text,
            "qe_identity_signature": bytes(qe_sig).hex(),
        }
    ).encode()


def _qe_report(tdx: bool, report_data: bytes) -> SGXReportBody:
    return SGXReportBody(
        cpu_svn=CPU_SVN,
        misc_select=0,
        reserved1=bytes(12),
        isv_ext_prod_id=bytes(16),
        attributes=_QE_ATTRIBUTES,
        mr_enclave=hashlib.sha256(b"ray_confidential simulated QE").digest(),
        reserved2=bytes(32),
        mr_signer=QE_MRSIGNER,
        reserved3=bytes(32),
        config_id=bytes(64),
        isv_prod_id=2 if tdx else 1,
        isv_svn=QE_ISV_SVN,
        config_svn=0,
        reserved4=bytes(42),
        isv_family_id=bytes(16),
        report_data=report_data,
    )


def build_evidence(
    root: DCAPTestRoot,
    *,
    tee: str = "tdx",
    report_data: bytes,
    measurement: bytes | None = None,
    debug: bool = False,
    rtmrs: Sequence[bytes] | None = None,
    **hooks: Any,
) -> FakeEvidence:
    """A signed quote in the real format plus its collateral (see the module docstring for hooks).

    Args:
        tee: "tdx" (quote v4; ``quote_version=5`` gives a v5 quote with a TD 1.5 body) or "sgx" (v3).
        report_data: 64 bytes of REPORTDATA.
        measurement: MRTD (48 bytes) for TDX, MRENCLAVE (32 bytes) for SGX.
        debug: set the TD / enclave DEBUG attribute.
        rtmrs: four 48-byte RTMR values (TDX; default all zero).
    """
    if tee not in ("tdx", "sgx"):
        raise ValueError('tee must be "tdx" or "sgx"')
    if len(report_data) != 64:
        raise ValueError("report_data must be 64 bytes")
    values = {
        "tcb_status",
        "advisories",
        "quote_version",
        "mr_config_id",
        "mr_owner",
        "isv_prod_id",
        "isv_svn",
        "mr_signer",
        "now",
    }
    unknown = set(hooks) - _BREAKS - values
    if unknown:
        raise TypeError(
            f"unknown build_evidence hooks {sorted(unknown)}; "
            f"breaks: {sorted(_BREAKS)}; values: {sorted(values)}"
        )
    breaks = {k: bool(v) for k, v in hooks.items() if k in _BREAKS}
    if breaks.pop("untrusted_root", False):
        return build_evidence(
            DCAPTestRoot.generate(),
            tee=tee,
            report_data=report_data,
            measurement=measurement,
            debug=debug,
            rtmrs=rtmrs,
            **{k: v for k, v in hooks.items() if k != "untrusted_root"},
        )
    tdx = tee == "tdx"
    now = hooks.get("now") or datetime.now(timezone.utc)
    version = int(hooks.get("quote_version") or (4 if tdx else 3))
    body: ReportBody
    body_type = None
    if tdx:
        mr_td = measurement if measurement is not None else DEFAULT_MR_TD
        rt = list(rtmrs) if rtmrs is not None else [bytes(48)] * 4
        if len(mr_td) != 48 or len(rt) != 4 or any(len(r) != 48 for r in rt):
            raise ValueError("TDX measurement and each RTMR must be 48 bytes (four RTMRs)")
        attrs = bytearray(_TD_ATTRIBUTES)
        if debug:
            attrs[0] |= 0x01
        td = TDReport10(
            tee_tcb_svn=TEE_TCB_SVN,
            mr_seam=hashlib.sha384(b"ray_confidential simulated TDX module").digest(),
            mr_signer_seam=bytes(48),
            seam_attributes=bytes(8),
            td_attributes=bytes(attrs),
            xfam=bytes.fromhex("e702060000000000"),
            mr_td=mr_td,
            mr_config_id=hooks.get("mr_config_id") or bytes(48),
            mr_owner=hooks.get("mr_owner") or bytes(48),
            mr_owner_config=bytes(48),
            rtmr0=rt[0],
            rtmr1=rt[1],
            rtmr2=rt[2],
            rtmr3=rt[3],
            report_data=report_data,
        )
        if version == 5:
            body = TDReport15(
                **{f: getattr(td, f) for f in TDReport10.__dataclass_fields__},
                tee_tcb_svn2=TEE_TCB_SVN,
                mr_service_td=bytes(48),
            )
            body_type = BODY_TYPE_TD15
        elif version == 4:
            body = td
        else:
            raise ValueError("TDX quote_version must be 4 or 5")
    else:
        if version != 3:
            raise ValueError("SGX quote_version must be 3")
        mr = measurement if measurement is not None else DEFAULT_MR_ENCLAVE
        if len(mr) != 32:
            raise ValueError("SGX measurement (MRENCLAVE) must be 32 bytes")
        attrs = bytearray(_SGX_ATTRIBUTES)
        if debug:
            attrs[0] |= 0x02
        body = replace(
            _qe_report(False, report_data),
            attributes=bytes(attrs),
            mr_enclave=mr,
            mr_signer=hooks.get("mr_signer") or ENCLAVE_MRSIGNER,
            isv_prod_id=int(hooks.get("isv_prod_id") or 0),
            isv_svn=int(hooks.get("isv_svn") or 0),
        )
    header = QuoteHeader(
        version=version,
        attestation_key_type=ATTESTATION_KEY_TYPE_ECDSA_P256,
        tee_type=TEE_TYPE_TDX if tdx else TEE_TYPE_SGX,
        qe_svn=QE_ISV_SVN if not tdx else 0,
        pce_svn=PCE_SVN if not tdx else 0,
        qe_vendor_id=INTEL_QE_VENDOR_ID,
        user_data=hashlib.sha256(_raw_point(root.attestation_key)).digest()[:20],
    )
    att_key = _raw_point(root.attestation_key)
    auth = hashlib.sha256(b"qe auth " + att_key).digest()
    binding = hashlib.sha256(att_key + auth).digest() + bytes(32)
    if breaks.get("bad_qe_binding"):
        binding = bytes(64)
    qe_report = _qe_report(tdx, binding)
    qe_sig = bytearray(_sign_rs(root.pck_key, qe_report.to_bytes()))
    if breaks.get("bad_qe_report_signature"):
        qe_sig[7] ^= 0x40
    chain = (
        _pem(root.pck_certificate) + _pem(root.platform_ca_certificate) + _pem(root.root_certificate) + b"\0"
    )
    qe = QEReportCertificationData(
        qe_report=qe_report,
        qe_report_signature=bytes(qe_sig),
        qe_auth_data=auth,
        certification_data=CertificationData(cert_type=CERT_DATA_TYPE_PCK_CERT_CHAIN, data=chain),
    )
    if body_type is None and version == 5:
        body_type = BODY_TYPE_TD10 if tdx else BODY_TYPE_SGX
    unsigned = Quote(
        header=header,
        body_type=body_type,
        body=body,
        signature_data=ECDSA256QuoteSignatureData(
            signature=bytes(64), attestation_key=att_key, qe=qe, wrapped=version != 3
        ),
    )
    sig = bytearray(_sign_rs(root.attestation_key, unsigned.signed_bytes()))
    if breaks.get("bad_quote_signature"):
        sig[3] ^= 0x01
    quote = replace(unsigned, signature_data=replace(unsigned.signature_data, signature=bytes(sig)))
    collateral = build_collateral(
        root,
        tee=tee,
        now=now,
        tcb_status=str(hooks.get("tcb_status") or "UpToDate"),
        advisories=tuple(hooks.get("advisories") or ()),
        **breaks,
    )
    return FakeEvidence(tee=tee, evidence=quote.to_bytes(), certs=(), collateral=collateral)
