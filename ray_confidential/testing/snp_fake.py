"""Simulated AMD SEV-SNP: a test ARK -> ASK/ASVK -> VCEK/VLEK hierarchy generated at run time, and
attestation reports in the real ABI format (AMD doc 56860) signed by it, with hooks to break one
property at a time (after go-sev-guest ``testing/fake_certs.go``).

    >>> from datetime import datetime, timezone
    >>> from ray_confidential.attestation.snp import verify_evidence
    >>> from ray_confidential.attestation.trust import TrustConfig
    >>> root = SNPTestRoot.generate(product="Milan")
    >>> ev = build_evidence(root, report_data=b"\\x01" * 64, measurement=b"\\xaa" * 48)
    >>> now = datetime.now(timezone.utc)
    >>> verify_evidence(ev.evidence, certs=ev.certs, now=now,
    ...                 trust=TrustConfig.development([root.root_certificate])).debug
    False

Evidence from a test root fails under ``TrustConfig.production()``: its ARK is not allow-listed.

Key material: the RSA-4096 ARK/ASK/ASVK keys (AMD's sizes; the verifier insists on them) are generated
once per process and shared by every :meth:`SNPTestRoot.generate` call unless ``fresh_keys=True``;
roots still differ in their certificates, hence fingerprints, and in their VCEK/VLEK keys. Never a
fixed key in the package. :meth:`SNPTestRoot.to_pem` exports what a simulated TEE needs (certificates
and the VCEK/VLEK private keys, as a real chip holds), never the CA keys.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import threading
from dataclasses import dataclass, replace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from ray_confidential.attestation.snp import abi
from ray_confidential.attestation.snp.abi import TCBVersion
from ray_confidential.attestation.snp.verify import (
    AMD_PSS,
    OID_BL_SPL,
    OID_CSP_ID,
    OID_FMC_SPL,
    OID_HWID,
    OID_PRODUCT_NAME,
    OID_SNP_SPL,
    OID_SPL4,
    OID_SPL5,
    OID_SPL6,
    OID_SPL7,
    OID_STRUCT_VERSION,
    OID_TEE_SPL,
    OID_UCODE_SPL,
    endorsement_extensions,
    load_certificates,
)
from ray_confidential.testing.evidence import FakeEvidence

_RSA_CACHE: dict[str, rsa.RSAPrivateKey] = {}
_RSA_LOCK = threading.Lock()

_DEFAULT_TCB: dict[str, TCBVersion] = {
    "Milan": TCBVersion(bl=4, tee=0, snp=27, ucode=222),
    "Genoa": TCBVersion(bl=9, tee=0, snp=23, ucode=72),
    "Turin": TCBVersion(fmc=1, bl=1, tee=1, snp=4, ucode=77),
}
_CPUID: dict[str, tuple[int, int, int]] = {
    "Milan": (0x19, 0x01, 1),
    "Genoa": (0x19, 0x11, 1),
    "Turin": (0x1A, 0x02, 0),
}
_PRODUCT_NAME = {"Milan": "Milan-B0", "Genoa": "Genoa-B1", "Turin": "Turin-B0"}
_TEST_OU = "ray_confidential test root (NOT AMD)"

BREAKS = frozenset(
    {
        "bad_signature",  # flip one bit of the report signature
        "tamper_signed_bytes",  # change MEASUREMENT after signing
        "wrong_chip_id",  # CHIP_ID differs from the VCEK hwID (report signed correctly)
        "tcb_mismatch",  # REPORTED_TCB differs from the VCEK TCB (report signed correctly)
        "foreign_ask",  # VCEK/VLEK issued by an impostor key under the genuine ASK name
        "expired_vcek",  # VCEK/VLEK validity ended a day before the report
        "omit_vcek",
        "omit_ask",
        "omit_ark",
        "wrong_cpuid",  # CPUID family/model of another product line (v3+)
        "unsigned",  # SIGNING_KEY = none
    }
)
"""Keyword hooks of :func:`build_evidence`; each breaks one property (pass ``name=True``)."""


def _rsa4096(slot: str, fresh: bool) -> rsa.RSAPrivateKey:
    if fresh:
        return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    with _RSA_LOCK:
        if slot not in _RSA_CACHE:
            _RSA_CACHE[slot] = rsa.generate_private_key(public_exponent=65537, key_size=4096)
        return _RSA_CACHE[slot]


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _TEST_OU),
        ]
    )


def _der_len(n: int) -> bytes:
    return bytes([n]) if n < 0x80 else bytes([0x81, n]) if n < 0x100 else bytes([0x82]) + n.to_bytes(2, "big")


def _der_u8(v: int) -> bytes:
    content = v.to_bytes(2 if v >= 0x80 else 1, "big")
    return b"\x02" + _der_len(len(content)) + content


def _der_ia5(s: str) -> bytes:
    raw = s.encode("ascii")
    return b"\x16" + _der_len(len(raw)) + raw


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _sign_cert(builder: x509.CertificateBuilder, key: rsa.RSAPrivateKey) -> x509.Certificate:
    return builder.sign(key, hashes.SHA384(), rsa_padding=AMD_PSS)


def _ca_cert(
    cn: str,
    key: rsa.RSAPrivateKey,
    issuer_cn: str,
    issuer_key: rsa.RSAPrivateKey,
    *,
    root: bool,
    not_before: _dt.datetime,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + _dt.timedelta(days=25 * 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None if root else 0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return _sign_cert(b, issuer_key)


def _endorsement_cert(
    *,
    product: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_cn: str,
    issuer_key: rsa.RSAPrivateKey,
    tcb: TCBVersion,
    hwid: bytes | None,
    csp_id: str | None,
    not_before: _dt.datetime,
    days: int = 7 * 365,
) -> x509.Certificate:
    """A VCEK (hwid) or VLEK (csp_id) with the 57230 extensions, signed RSASSA-PSS SHA-384 by the issuer."""
    exts: list[tuple[x509.ObjectIdentifier, bytes]] = [
        (OID_STRUCT_VERSION, _der_u8(1 if product == "Turin" else 0)),
        (OID_PRODUCT_NAME, _der_ia5(_PRODUCT_NAME[product])),
        (OID_BL_SPL, _der_u8(tcb.bl)),
        (OID_TEE_SPL, _der_u8(tcb.tee)),
        (OID_SNP_SPL, _der_u8(tcb.snp)),
        (OID_SPL5, _der_u8(0)),
        (OID_SPL6, _der_u8(0)),
        (OID_SPL7, _der_u8(0)),
        (OID_UCODE_SPL, _der_u8(tcb.ucode)),
    ]
    exts.append((OID_FMC_SPL, _der_u8(tcb.fmc or 0)) if product == "Turin" else (OID_SPL4, _der_u8(0)))
    if hwid is not None:
        exts.append((OID_HWID, hwid))  # bare bytes, as AMD KDS writes it
    if csp_id is not None:
        exts.append((OID_CSP_ID, _der_ia5(csp_id)))
    b = (
        x509.CertificateBuilder()
        .subject_name(_name("SEV-VCEK" if hwid is not None else "SEV-VLEK"))
        .issuer_name(_name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + _dt.timedelta(days=days))
    )
    for oid, value in exts:
        b = b.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    return _sign_cert(b, issuer_key)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class SNPTestRoot:
    """A simulated AMD hierarchy for one chip: ARK (RSA-4096, self-signed) -> ASK and ASVK (RSA-4096)
    -> VCEK (P-384, with hwID) and VLEK (P-384, with CSP_ID). ``ark_key``/``ask_key`` are None in a
    root loaded with :meth:`from_pem` (a simulated TEE holds no CA key)."""

    product: str
    chip_id: bytes
    tcb: TCBVersion
    ark: x509.Certificate
    ask: x509.Certificate
    asvk: x509.Certificate
    vcek: x509.Certificate
    vlek: x509.Certificate
    vcek_key: ec.EllipticCurvePrivateKey
    vlek_key: ec.EllipticCurvePrivateKey
    ark_key: rsa.RSAPrivateKey | None = None
    ask_key: rsa.RSAPrivateKey | None = None
    asvk_key: rsa.RSAPrivateKey | None = None

    def __repr__(self) -> str:
        return f"SNPTestRoot(product={self.product!r}, chip_id={self.chip_id[:8].hex()}..., keys=<redacted>)"

    def __reduce__(self) -> Any:
        raise TypeError("SNPTestRoot holds private keys and is not picklable; hand over to_pem() explicitly")

    @property
    def root_certificate(self) -> x509.Certificate:
        """The test ARK: what ``TrustConfig.development([...])`` must be given."""
        return self.ark

    @classmethod
    def generate(
        cls, product: str = "Milan", *, tcb: TCBVersion | None = None, fresh_keys: bool = False
    ) -> SNPTestRoot:
        """A new hierarchy for ``product`` ("Milan", "Genoa", "Turin") and a random chip.

        Args:
            tcb: the platform TCB the VCEK/VLEK certify (default: a plausible recent one).
            fresh_keys: generate new RSA-4096 CA keys instead of the per-process ones.
        """
        if product not in abi.PRODUCTS:
            raise ValueError(f"unknown product {product!r}; use one of {', '.join(abi.PRODUCTS)}")
        tcb = tcb or _DEFAULT_TCB[product]
        if product != "Turin" and tcb.fmc is not None:
            raise ValueError("fmc is a Turin TCB component; leave it None for Milan and Genoa")
        ark_key = _rsa4096("ark", fresh_keys)
        ask_key = _rsa4096("ask", fresh_keys)
        asvk_key = _rsa4096("asvk", fresh_keys)
        nb = _now() - _dt.timedelta(days=1)
        ark = _ca_cert(f"ARK-{product}", ark_key, f"ARK-{product}", ark_key, root=True, not_before=nb)
        ask = _ca_cert(f"SEV-{product}", ask_key, f"ARK-{product}", ark_key, root=False, not_before=nb)
        asvk = _ca_cert(f"SEV-VLEK-{product}", asvk_key, f"ARK-{product}", ark_key, root=False, not_before=nb)
        hwid = os.urandom(8 if product == "Turin" else 64)
        chip_id = hwid.ljust(abi.CHIP_ID_SIZE, b"\0")
        vcek_key = ec.generate_private_key(ec.SECP384R1())
        vlek_key = ec.generate_private_key(ec.SECP384R1())
        vcek = _endorsement_cert(
            product=product, key=vcek_key, issuer_cn=f"SEV-{product}", issuer_key=ask_key, tcb=tcb,
            hwid=hwid, csp_id=None, not_before=nb,
        )  # fmt: skip
        vlek = _endorsement_cert(
            product=product, key=vlek_key, issuer_cn=f"SEV-VLEK-{product}", issuer_key=asvk_key, tcb=tcb,
            hwid=None, csp_id="ray-confidential-test", not_before=nb,
        )  # fmt: skip
        return cls(
            product=product, chip_id=chip_id, tcb=tcb, ark=ark, ask=ask, asvk=asvk, vcek=vcek, vlek=vlek,
            vcek_key=vcek_key, vlek_key=vlek_key, ark_key=ark_key, ask_key=ask_key, asvk_key=asvk_key,
        )  # fmt: skip

    def to_pem(self) -> bytes:
        """Launch data for a simulated TEE: ARK, ASK, ASVK, VCEK, VLEK certificates and the VCEK/VLEK
        private keys (PKCS#8), in that order. The CA private keys are never exported."""
        out = b"".join(
            c.public_bytes(Encoding.PEM) for c in (self.ark, self.ask, self.asvk, self.vcek, self.vlek)
        )
        for key in (self.vcek_key, self.vlek_key):
            out += key.private_bytes(
                Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        return out

    @classmethod
    def from_pem(cls, data: bytes) -> SNPTestRoot:
        """Inverse of :meth:`to_pem` (without CA keys: breaks that re-issue certificates are unavailable).

        Raises:
            ValueError: not the output of :meth:`to_pem`.
        """
        certs = load_certificates([data])
        keys = [
            serialization.load_pem_private_key(m.group(0), password=None)
            for m in re.finditer(rb"-----BEGIN PRIVATE KEY-----.+?-----END PRIVATE KEY-----", data, re.DOTALL)
        ]
        if len(certs) != 5 or len(keys) != 2:
            raise ValueError("SNPTestRoot PEM must hold 5 certificates and 2 private keys (from to_pem())")
        ark, ask, asvk, vcek, vlek = certs
        vcek_key, vlek_key = keys
        if not isinstance(vcek_key, ec.EllipticCurvePrivateKey) or not isinstance(
            vlek_key, ec.EllipticCurvePrivateKey
        ):
            raise ValueError("SNPTestRoot PEM: VCEK/VLEK keys must be P-384")
        ext = endorsement_extensions(vcek)
        assert ext.hwid is not None
        return cls(
            product=ext.product, chip_id=ext.hwid.ljust(abi.CHIP_ID_SIZE, b"\0"),
            tcb=TCBVersion.decode(ext.tcb, product=ext.product),
            ark=ark, ask=ask, asvk=asvk, vcek=vcek, vlek=vlek, vcek_key=vcek_key, vlek_key=vlek_key,
        )  # fmt: skip


def _amd_signature(key: ec.EllipticCurvePrivateKey, signed: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(signed, ec.ECDSA(hashes.SHA384())))
    sig = r.to_bytes(abi.ECDSA_COMPONENT_SIZE, "little") + s.to_bytes(abi.ECDSA_COMPONENT_SIZE, "little")
    return sig.ljust(abi.SIGNATURE_SIZE, b"\0")


def build_evidence(
    root: SNPTestRoot,
    *,
    report_data: bytes,
    measurement: bytes | None = None,
    debug: bool = False,
    vmpl: int = 0,
    version: int = 3,
    signing_key: str = "vcek",
    policy: int | None = None,
    host_data: bytes = bytes(32),
    guest_svn: int = 0,
    family_id: bytes = bytes(16),
    image_id: bytes = bytes(16),
    extended: bool = False,
    **breaks: bool,
) -> FakeEvidence:
    """An ATTESTATION_REPORT in the real format signed by ``root``'s VCEK (or VLEK), plus its certificates.

    Args:
        report_data: the 64 REPORT_DATA bytes.
        measurement: 48 bytes (default: a fixed test value).
        debug: set POLICY.DEBUG (bit 19).
        version: report version 2, 3 or 5 (v3 adds CPUID fields, v5 the mitigation vectors).
        policy: the full guest POLICY (default 0x30000: SMT allowed, reserved bit 17), ``debug`` is ORed in.
        extended: put the certificates in a GHCB certificate table after the report (extended report)
            instead of ``FakeEvidence.certs``.
        **breaks: names in :data:`BREAKS` set to True, each breaking one property.

    Raises:
        TypeError: an unknown break.
        ValueError: bad field sizes, or a break that needs a CA key on a root loaded with ``from_pem``.
    """
    unknown = set(breaks) - BREAKS
    if unknown:
        raise TypeError(f"unknown break(s) {sorted(unknown)}; known: {', '.join(sorted(BREAKS))}")
    on = {k for k, v in breaks.items() if v}
    if len(report_data) != abi.REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be {abi.REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    measurement = measurement if measurement is not None else bytes.fromhex("5e" * 48)
    if len(measurement) != abi.MEASUREMENT_SIZE:
        raise ValueError(f"measurement must be {abi.MEASUREMENT_SIZE} bytes, got {len(measurement)}")
    if version not in (2, 3, 5):
        raise ValueError("version must be 2, 3 or 5")
    if signing_key not in ("vcek", "vlek"):
        raise ValueError('signing_key must be "vcek" or "vlek"')
    vlek = signing_key == "vlek"
    key = root.vlek_key if vlek else root.vcek_key
    leaf = root.vlek if vlek else root.vcek
    intermediate = root.asvk if vlek else root.ask
    intermediate_key = root.asvk_key if vlek else root.ask_key

    product = root.product
    tcb_raw = root.tcb.encode(product=product)
    reported = tcb_raw
    if "tcb_mismatch" in on:
        reported = replace(root.tcb, snp=(root.tcb.snp + 1) % 128).encode(product=product)
    chip_id = root.chip_id
    if "wrong_chip_id" in on:
        chip_id = bytes(b ^ 0xFF for b in chip_id[:8]) + chip_id[8:]
    fam, mod, step = _CPUID[product]
    if "wrong_cpuid" in on:
        fam, mod, step = _CPUID["Genoa" if product != "Genoa" else "Milan"]
    pol = 0x30000 if policy is None else policy
    if debug:
        pol |= 1 << abi.POLICY_DEBUG_BIT
    signer = (
        abi.SIGNING_KEY_NONE if "unsigned" in on else (abi.SIGNING_KEY_VLEK if vlek else abi.SIGNING_KEY_VCEK)
    )
    report = abi.SNPReport(
        version=version,
        guest_svn=guest_svn,
        policy=pol,
        family_id=family_id,
        image_id=image_id,
        vmpl=vmpl,
        signature_algo=abi.SIG_ALGO_ECDSA_P384_SHA384,
        current_tcb=tcb_raw,
        platform_info=0x25,  # SMT_EN, ECC_EN, ALIAS_CHECK_COMPLETE
        signer_info=signer << 2,
        report_data=bytes(report_data),
        measurement=bytes(measurement),
        host_data=host_data,
        id_key_digest=bytes(48),
        author_key_digest=bytes(48),
        report_id=os.urandom(32),
        report_id_ma=b"\xff" * 32,
        reported_tcb=reported,
        cpuid_fam_id=fam if version >= 3 else None,
        cpuid_mod_id=mod if version >= 3 else None,
        cpuid_step=step if version >= 3 else None,
        chip_id=chip_id,
        committed_tcb=tcb_raw,
        current_build=35,
        current_minor=55,
        current_major=1,
        committed_build=35,
        committed_minor=55,
        committed_major=1,
        launch_tcb=tcb_raw,
        launch_mit_vector=0x3 if version >= 5 else None,
        current_mit_vector=0x3 if version >= 5 else None,
        signature=bytes(abi.SIGNATURE_SIZE),
    )
    report = replace(report, signature=_amd_signature(key, report.signed_bytes()))
    raw = bytearray(report.to_bytes())
    if "bad_signature" in on:
        raw[abi.OFF_SIGNATURE + 5] ^= 0x01
    if "tamper_signed_bytes" in on:
        raw[abi.OFF_MEASUREMENT] ^= 0x01

    if "foreign_ask" in on or "expired_vcek" in on:
        if intermediate_key is None:
            raise ValueError(
                "this break re-issues the VCEK/VLEK and needs the CA keys: use SNPTestRoot.generate()"
            )
        issuer_key = _rsa4096("foreign", False) if "foreign_ask" in on else intermediate_key
        nb = _now() - (_dt.timedelta(days=10) if "expired_vcek" in on else _dt.timedelta(days=1))
        ext = endorsement_extensions(leaf)
        leaf = _endorsement_cert(
            product=product, key=key, issuer_cn=f"SEV-VLEK-{product}" if vlek else f"SEV-{product}",
            issuer_key=issuer_key, tcb=root.tcb, hwid=ext.hwid, csp_id=ext.csp_id, not_before=nb,
            days=9 if "expired_vcek" in on else 7 * 365,
        )  # fmt: skip
    chain: list[tuple[str, x509.Certificate]] = [("vcek", leaf), ("ask", intermediate), ("ark", root.ark)]
    chain = [(role, c) for role, c in chain if f"omit_{role}" not in on]
    if extended:
        guids = {"vcek": abi.GUID_VLEK if vlek else abi.GUID_VCEK, "ask": abi.GUID_ASK, "ark": abi.GUID_ARK}
        table = abi.build_cert_table([(guids[role], _der(c)) for role, c in chain])
        return FakeEvidence(tee="sev-snp", evidence=bytes(raw) + table, certs=())
    return FakeEvidence(tee="sev-snp", evidence=bytes(raw), certs=tuple(_der(c) for _, c in chain))


__all__ = ["BREAKS", "SNPTestRoot", "build_evidence"]
