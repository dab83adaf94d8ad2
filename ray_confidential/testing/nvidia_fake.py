"""Simulated NVIDIA H100 attestation reports, in the real SPDM 1.1 format, under a run-time test root.

A P-384 hierarchy (root -> intermediate -> attestation leaf, like NVIDIA's Device Identity CA ->
... -> GSP FMC leaf) is generated at run time; the leaf carries the FWID extension and reports are
signed as the GPU signs them. Reports verify under ``TrustConfig.development([root.root_certificate])``
and fail under ``TrustConfig.production()``.

    >>> from datetime import datetime, timezone
    >>> from ray_confidential.attestation import nvidia
    >>> from ray_confidential.attestation.trust import TrustConfig
    >>> root = NVIDIATestRoot.generate()
    >>> fake = build_evidence(root, report_data=bytes(32))
    >>> trust = TrustConfig.development([root.root_certificate])
    >>> claims = nvidia.verify_evidence(fake.evidence, certs=fake.certs, trust=trust,
    ...                                 now=datetime.now(timezone.utc))
    >>> claims.report_data == bytes(32)
    True

Break hooks (keyword arguments of :func:`build_evidence`, each breaks one property):
``bad_signature``, ``tamper_measurement``, ``untrusted_root``, ``foreign_leaf``,
``drop_intermediate``, ``expired_leaf``, ``wrong_fwid``, ``unsigned_request``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from ray_confidential.attestation.nvidia.abi import (
    OPAQUE_DRIVER_VERSION,
    OPAQUE_FWID,
    OPAQUE_VBIOS_VERSION,
    GPUAttestationReport,
    MeasurementBlock,
    OpaqueField,
    parse_report,
)
from ray_confidential.attestation.nvidia.rim import ReferenceManifest, RIMMeasurement
from ray_confidential.attestation.nvidia.verify import OID_NVIDIA_FWID_EXTENSION
from ray_confidential.testing.evidence import FakeEvidence
from ray_confidential.testing.x509_fake import ThreeLevelPKI, issue, key_usage

TEE = "nvidia-gpu"
DEFAULT_MEASUREMENT = hashlib.sha384(b"ray_confidential simulated H100 firmware").digest()
DEFAULT_DRIVER_VERSION = "550.90.07"
DEFAULT_VBIOS_VERSION = "96.00.9f.00.01"
NUM_BLOCKS = 64
DRIVER_INDICES = frozenset(range(10, 20))  # simulated split between driver and VBIOS RIMs (SPDM indices)
_BREAKS = frozenset(
    {
        "bad_signature",
        "tamper_measurement",
        "untrusted_root",
        "foreign_leaf",
        "drop_intermediate",
        "expired_leaf",
        "wrong_fwid",
        "unsigned_request",
    }
)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ray_confidential test"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _fwid_extension(key: ec.EllipticCurvePrivateKey, fwid: bytes) -> x509.UnrecognizedExtension:
    """Shaped like NVIDIA's: SEQUENCE { ..., SEQUENCE { OID sha384, OCTET STRING fwid } } (DER)."""
    sha384_oid = bytes.fromhex("0609608648016503040202")
    inner = sha384_oid + bytes([0x04, len(fwid)]) + fwid
    digest_seq = bytes([0x30, len(inner)]) + inner
    spki_hash = hashlib.sha384(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).digest()
    body = bytes([0x02, 0x01, 0x01, 0x04, len(spki_hash)]) + spki_hash + digest_seq
    return x509.UnrecognizedExtension(OID_NVIDIA_FWID_EXTENSION, bytes([0x30, len(body)]) + body)


def _issue(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    not_before: datetime,
    not_after: datetime,
    fwid: bytes | None = None,
) -> x509.Certificate:
    extensions: list[tuple[x509.ExtensionType, bool]] = [(key_usage(ca=ca, digital_signature=not ca), True)]
    if ca:
        extensions.append((x509.BasicConstraints(ca=True, path_length=None), True))
    if fwid is not None:
        extensions.append((_fwid_extension(key, fwid), False))
    return issue(
        _name(cn),
        key,
        issuer,
        issuer_key,
        not_before=not_before,
        not_after=not_after,
        extensions=extensions,
        algorithm=hashes.SHA384(),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class NVIDIATestRoot(ThreeLevelPKI):
    """A run-time generated GPU device PKI: root, intermediate, attestation leaf (with its FWID).

    Private keys never appear in ``repr``; :meth:`to_pem` / :meth:`from_pem` move it between processes.
    """

    @classmethod
    def generate(cls, *, now: datetime | None = None, fwid: bytes | None = None) -> NVIDIATestRoot:
        """Fresh P-384 keys; certificates valid from ``now`` - 1 day for 10 years (device certificates
        are long-lived); ``fwid`` (48 bytes, default random) goes into the leaf."""
        now = now or datetime.now(timezone.utc)
        start, end = now - timedelta(days=1), now + timedelta(days=3650)
        fwid = os.urandom(48) if fwid is None else fwid
        keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(3)]
        root = _issue(
            "Test NVIDIA Device Identity CA", keys[0], None, keys[0], ca=True, not_before=start, not_after=end
        )
        inter = _issue(
            "Test GH100 Provisioner ICA", keys[1], root, keys[0], ca=True, not_before=start, not_after=end
        )
        leaf = _issue("Test GH100 GSP FMC LF", keys[2], inter, keys[1], ca=False,
                      not_before=start, not_after=end, fwid=fwid)  # fmt: skip
        return cls(
            root_certificate=root,
            intermediate_certificate=inter,
            leaf_certificate=leaf,
            root_key=keys[0],
            intermediate_key=keys[1],
            leaf_key=keys[2],
        )

    @property
    def fwid(self) -> bytes:
        ext = self.leaf_certificate.extensions.get_extension_for_oid(OID_NVIDIA_FWID_EXTENSION).value
        assert isinstance(ext, x509.UnrecognizedExtension)
        return ext.value[-48:]

    def chain_der(self) -> tuple[bytes, ...]:
        """The device chain, leaf first, DER."""
        return tuple(
            c.public_bytes(serialization.Encoding.DER)
            for c in (self.leaf_certificate, self.intermediate_certificate, self.root_certificate)
        )


def _vbios_bytes(version: str) -> bytes:
    """Inverse of nvtrust's VBIOS formatting: "96.00.9f.00.01" -> the 8-byte little-endian field."""
    parts = version.split(".")
    if len(parts) != 5 or any(len(p) != 2 for p in parts):
        raise ValueError("vbios_version must look like '96.00.9f.00.01'")
    return bytes.fromhex("000000" + parts[4] + "".join(parts[:4]))[::-1]


def block_values(measurement: bytes | None = None) -> dict[int, bytes]:
    """The simulated measurement values by SPDM index, derived from ``measurement`` (48 bytes)."""
    seed = DEFAULT_MEASUREMENT if measurement is None else measurement
    return {i: hashlib.sha384(seed + bytes([i])).digest() for i in range(1, NUM_BLOCKS + 1)}


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA384())))
    return r.to_bytes(48, "big") + s.to_bytes(48, "big")


def build_evidence(
    root: NVIDIATestRoot,
    *,
    report_data: bytes,
    measurement: bytes | None = None,
    debug: bool = False,
    driver_version: str = DEFAULT_DRIVER_VERSION,
    vbios_version: str = DEFAULT_VBIOS_VERSION,
    as_hex: bool = False,
    **breaks: Any,
) -> FakeEvidence:
    """A signed H100 report whose requester nonce is ``report_data`` (32 bytes).

    Args:
        root: the device hierarchy that signs.
        report_data: the 32-byte SPDM requester nonce (derived from the CPU session by the caller).
        measurement: 48-byte seed from which the 64 measurement values are derived (see
            :func:`block_values`); the claim ``measurement`` is the digest of the resulting record.
        debug: must be False: an H100 report carries no debug flag (CC devtools mode is invisible).
        driver_version, vbios_version: the opaque version fields.
        as_hex: emit hex text (as nvtrust stores reports) instead of raw bytes.
        **breaks: one or more of the hooks in the module docstring set to True.

    Returns:
        FakeEvidence with ``evidence`` = report and ``certs`` = the device chain (DER, leaf first).

    Raises:
        TypeError: an unknown break hook. ValueError: bad sizes, or ``debug=True``.
    """
    unknown = set(breaks) - _BREAKS
    if unknown:
        raise TypeError(f"unknown break hook(s) {sorted(unknown)}; known: {sorted(_BREAKS)}")
    brk = {k for k, v in breaks.items() if v}
    if debug:
        raise ValueError("an H100 SPDM report has no debug flag; debug=True cannot be simulated")
    if len(report_data) != 32:
        raise ValueError("report_data (the SPDM requester nonce) must be 32 bytes")
    if measurement is not None and len(measurement) != 48:
        raise ValueError("measurement must be 48 bytes")
    signer = NVIDIATestRoot.generate(fwid=root.fwid) if "untrusted_root" in brk else root
    leaf_key = signer.leaf_key
    chain = list(signer.chain_der())
    if "foreign_leaf" in brk:
        other = NVIDIATestRoot.generate(fwid=root.fwid)
        chain[0], leaf_key = other.chain_der()[0], other.leaf_key
    if "expired_leaf" in brk:
        past = datetime.now(timezone.utc) - timedelta(days=30)
        leaf_key = ec.generate_private_key(ec.SECP384R1())
        cert = _issue("Expired GH100 GSP FMC LF", leaf_key, signer.intermediate_certificate,
                      signer.intermediate_key, ca=False, not_before=past, not_after=past + timedelta(days=1),
                      fwid=signer.fwid)  # fmt: skip
        chain[0] = cert.public_bytes(serialization.Encoding.DER)
    if "drop_intermediate" in brk:
        del chain[1]
    fwid = os.urandom(48) if "wrong_fwid" in brk else signer.fwid
    report = GPUAttestationReport(
        request_param1=0 if "unsigned_request" in brk else 1,
        request_param2=0xFF,
        requester_nonce=bytes(report_data),
        slot_id_param=0,
        response_param1=0,
        response_param2=0,
        blocks=tuple(
            MeasurementBlock(index=i, value_type=0x01, value=v) for i, v in block_values(measurement).items()
        ),
        responder_nonce=os.urandom(32),
        opaque=(
            OpaqueField(type=OPAQUE_VBIOS_VERSION, data=_vbios_bytes(vbios_version)),
            OpaqueField(type=OPAQUE_DRIVER_VERSION, data=driver_version.encode() + b"\0"),
            OpaqueField(type=OPAQUE_FWID, data=fwid),
        ),
        signature=bytes(96),
    )
    signature = _sign(leaf_key, report.signed_bytes())
    if "bad_signature" in brk:
        signature = signature[:-1] + bytes([signature[-1] ^ 1])
    raw = report.signed_bytes() + signature
    if "tamper_measurement" in brk:
        blocks = list(report.blocks)
        blocks[0] = MeasurementBlock(index=1, value_type=0x01, value=bytes(48))
        tampered = GPUAttestationReport(
            **{**_fields(report), "blocks": tuple(blocks), "signature": signature}
        )
        raw = tampered.to_bytes()
    return FakeEvidence(tee=TEE, evidence=raw.hex().encode() if as_hex else raw, certs=tuple(chain))


def _fields(report: GPUAttestationReport) -> dict[str, Any]:
    return {name: getattr(report, name) for name in GPUAttestationReport.__dataclass_fields__}


def matching_rims(evidence: bytes) -> tuple[ReferenceManifest, ReferenceManifest]:
    """A driver RIM and a VBIOS RIM (unsigned records) that match a simulated report: the driver
    RIM covers :data:`DRIVER_INDICES`, the VBIOS RIM the other indices (RIM index = SPDM index - 1)."""
    report = parse_report(evidence)
    values = report.measurements

    def rim(version: str, indices: set[int]) -> ReferenceManifest:
        return ReferenceManifest(
            tag_id=f"simulated-{version}",
            product="GH100",
            version=version,
            measurements=tuple(
                RIMMeasurement(index=i - 1, active=i in indices, values=(values[i],)) for i in sorted(values)
            ),
            raw=b"",
        )

    driver = set(DRIVER_INDICES) & set(values)
    return (
        rim(report.driver_version or "", driver),
        rim(report.vbios_version or "", set(values) - driver),
    )
