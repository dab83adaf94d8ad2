"""``ray-confidential evidence verify``: verify TEE evidence and appraise it, for operators.

    $ python -m ray_confidential.attestation.cli evidence verify --tee sev-snp report.hex \\
          --cert vcek.der --cert ask_ark.pem --at 2023-01-01T00:00:00Z --json

Exit status: 0 the evidence verifies and satisfies the policy; 1 it does not (reasons printed);
2 unusable input (unreadable or malformed files, a ``--tee`` that does not match the evidence, a bad
``--at`` or policy file). Without ``--policy`` the inspection policy applies (allow-listed vendor
roots, debug refused, ANY measurement, any VMPL): this is a verification tool, and a broker never
accepts an unpinned measurement. Without ``--collateral`` the TCB status is ``unknown``.

The lead's main CLI calls :func:`add_parser` and :func:`run`; this module imports nothing heavy at
start (no Ray, no torch; the attestation code on first use).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import struct
import sys
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

TEES = ("sev-snp", "tdx", "sgx", "nitro", "nvidia-gpu")

EXIT_OK, EXIT_REJECTED, EXIT_UNUSABLE = 0, 1, 2

_HEX = re.compile(rb"\A(?:0x)?[0-9a-fA-F]+\Z")
_B64 = re.compile(rb"\A[A-Za-z0-9+/_-]+={0,2}\Z")


class UnusableInput(Exception):
    """Input the tool cannot appraise (exit status 2)."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``evidence verify`` to an ``argparse`` sub-parser collection; returns the ``evidence`` parser."""
    evidence: argparse.ArgumentParser = subparsers.add_parser("evidence", help="verify TEE attestation evidence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = evidence.add_subparsers(dest="evidence_command", metavar="COMMAND")
    sub.required = True
    verify = sub.add_parser("verify", help="verify evidence and appraise it against a policy")
    verify.add_argument("--tee", required=True, choices=TEES, help="the TEE kind the evidence comes from")
    verify.add_argument("evidence", metavar="EVIDENCE", help="evidence file (raw, hex or base64)")
    verify.add_argument("--cert", action="append", default=[], metavar="FILE",
                        help="certificate file, DER or PEM (PEM may hold several); repeatable")  # fmt: skip
    verify.add_argument("--collateral", metavar="FILE", help="collateral (Intel: QuoteCollateralV3 JSON)")
    verify.add_argument("--policy", metavar="FILE", help="appraisal policy YAML (docs/attestation-policy.md)")
    verify.add_argument("--at", metavar="ISO-TIME", help="verify at this time (ISO 8601 with Z or an offset)")
    verify.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    verify.set_defaults(func=run)
    return evidence


def run(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the ``evidence`` command parsed by :func:`add_parser`; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    if getattr(args, "evidence_command", None) != "verify":
        print("error: unknown evidence command (try: evidence verify --help)", file=err)
        return EXIT_UNUSABLE
    report: dict[str, Any] = _empty_report(args.tee)
    try:
        with warnings.catch_warnings():
            # AMD VCEKs carry serial number 0 (shared/vectors/README.md); only that warning is silenced.
            warnings.filterwarnings("ignore", message="Parsed a serial number which wasn't positive")
            status, report = _verify(args, report)
    except UnusableInput as exc:
        report.update(verdict="unusable", error=str(exc))
        status = EXIT_UNUSABLE
        print(f"error: {exc}", file=err)
    if args.json:
        print(json.dumps(report, sort_keys=False), file=out)
    elif status != EXIT_UNUSABLE:
        print(_table(report), file=out)
    return status


def _empty_report(tee: str) -> dict[str, Any]:
    report: dict[str, Any] = {
        "tee": tee,
        "verdict": None,
        "violations": [],
        "error": None,
        "debug": None,
        "report_data": None,
        "tcb_status": None,
        "advisories": [],
    }
    report.update(
        {
            "sev-snp": {"measurement": None},
            "tdx": {"mr_td": None, "rtmrs": None},
            "sgx": {"mr_enclave": None, "mr_signer": None},
            "nitro": {"pcrs": None},
            "nvidia-gpu": {},
        }[tee]
    )
    report.update(measurements=None, root_fingerprint=None, root=None, policy=None, at=None, details=None)
    return report


def _verify(args: argparse.Namespace, report: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    now = _parse_time(args.at)
    raw = _decode(_read(args.evidence, "evidence"))
    seen = detect_tee(raw)
    if seen is not None and seen != args.tee:
        raise UnusableInput(f"the evidence looks like {seen} evidence, not --tee {args.tee}")
    certs = tuple(der for path in args.cert for der in _load_certs(path))
    collateral = _read(args.collateral, "collateral") if args.collateral else None

    # Imported here so that `--help` and argument errors stay instant.
    from ray_confidential.attestation import registry
    from ray_confidential.attestation.attest import appraise
    from ray_confidential.attestation.evidence import Evidence
    from ray_confidential.attestation.policy import AppraisalPolicy
    from ray_confidential.attestation.trust import VENDOR_ROOT_FINGERPRINTS, TrustConfig
    from ray_confidential.errors import AttestationError, EvidenceFormatError

    try:
        if args.policy:
            policy = AppraisalPolicy.from_yaml(Path(_path(args.policy, "policy")))
        else:
            policy = AppraisalPolicy.inspection([args.tee])
    except registry.BackendUnavailableError as exc:
        raise UnusableInput(str(exc)) from None
    except (ValueError, TypeError, OSError) as exc:
        raise UnusableInput(f"policy {args.policy or '(inspection)'}: {exc}") from None
    report.update(policy=policy.name, at=now.isoformat().replace("+00:00", "Z"))
    evidence = Evidence(tee=args.tee, evidence=raw, certs=certs, collateral=collateral)
    try:
        claims, violations = appraise(evidence, policy=policy, trust=TrustConfig.production(), now=now)
    except registry.BackendUnavailableError as exc:
        raise UnusableInput(str(exc)) from None
    except EvidenceFormatError as exc:
        raise UnusableInput(f"malformed {args.tee} evidence or collateral: {exc}") from None
    except AttestationError as exc:
        report.update(verdict="rejected", error=f"verification failed: {exc}")
        return EXIT_REJECTED, report

    names = {v: k for k, v in VENDOR_ROOT_FINGERPRINTS.items()}
    m = claims.measurements
    report.update(
        verdict="rejected" if violations else "accepted",
        violations=[{"field": v.field, "got": v.got, "want": v.want} for v in violations],
        debug=claims.debug,
        report_data=claims.report_data.hex(),
        tcb_status=claims.tcb_status,
        advisories=list(claims.advisories),
        measurements={k: _hex(v) for k, v in m.items()},
        root_fingerprint=claims.root_fingerprint,
        root=names.get(claims.root_fingerprint),
        details=_jsonable(claims.details),
    )
    if args.tee == "sev-snp":
        report["measurement"] = _hex(m.get("measurement"))
    elif args.tee == "tdx":
        report["mr_td"] = _hex(m.get("mr_td"))
        report["rtmrs"] = [_hex(m.get(f"rtmr{i}")) for i in range(4)]
    elif args.tee == "sgx":
        report["mr_enclave"] = _hex(m.get("mr_enclave"))
        report["mr_signer"] = _hex(m.get("mr_signer"))
    elif args.tee == "nitro":
        pcrs = {int(k[3:]): v for k, v in m.items() if k.startswith("pcr") and k[3:].isdigit()}
        report["pcrs"] = {str(i): pcrs[i].hex() for i in sorted(pcrs)}
    return (EXIT_REJECTED if violations else EXIT_OK), report


def detect_tee(data: bytes) -> str | None:
    """Best-effort kind of raw evidence from its header, or None when it looks like none of them.

    SNP: 1184-byte ATTESTATION_REPORT with VERSION 2..5; DCAP: quote version 3..5 with ECDSA
    attestation key type and TEE type 0 (SGX) / 0x81 (TDX); Nitro: COSE_Sign1 (CBOR array of 4,
    optionally tag 18); NVIDIA: SPDM GET_MEASUREMENTS request (code 0xE0, versions 1.0..1.3).
    """
    if len(data) == 1184 and 2 <= struct.unpack_from("<I", data)[0] <= 5:
        return "sev-snp"
    if len(data) >= 48:
        version, key_type, tee_type = struct.unpack_from("<HHI", data)
        if version in (3, 4, 5) and key_type in (2, 3):
            if tee_type == 0:
                return "sgx"
            if tee_type == 0x81:
                return "tdx"
    if data[:1] == b"\x84" or data[:2] == b"\xd2\x84":
        return "nitro"
    if len(data) >= 2 and 0x10 <= data[0] <= 0x13 and data[1] == 0xE0:
        return "nvidia-gpu"
    return None


def _path(name: str, what: str) -> str:
    if not Path(name).is_file():
        raise UnusableInput(f"{what} file not found: {name}")
    return name


def _read(name: str, what: str) -> bytes:
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise UnusableInput(f"cannot read {what} file {name}: {exc.strerror or exc}") from None


def _decode(data: bytes) -> bytes:
    """Raw bytes, or the hex / base64 text of them (whitespace ignored)."""
    text = b"".join(data.split())
    if not text:
        raise UnusableInput("the evidence file is empty")
    if _HEX.match(text) and len(text.removeprefix(b"0x")) % 2 == 0:
        return bytes.fromhex(text.removeprefix(b"0x").decode("ascii"))
    if _B64.match(text):
        try:
            altchars = b"-_" if (b"-" in text or b"_" in text) else None
            return base64.b64decode(text + b"=" * (-len(text) % 4), altchars=altchars, validate=True)
        except binascii.Error:
            pass
    return data


def _load_certs(name: str) -> list[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    data = _read(name, "certificate")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise UnusableInput(f"certificate file {name} is neither DER nor PEM certificates: {exc}") from None
    return [c.public_bytes(Encoding.DER) for c in certs]


def _parse_time(value: str | None) -> datetime:
    if value is None:
        return datetime.now(timezone.utc)
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UnusableInput(f"--at {value!r} is not ISO 8601 (e.g. 2024-05-01T12:00:00Z)") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise UnusableInput(f"--at {value!r} needs a time zone: end it with Z or an offset such as +02:00")
    return when.astimezone(timezone.utc)


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    return str(value)


def _table(report: Mapping[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    verdict = str(report["verdict"]).upper()
    if report["policy"] == "inspection":
        verdict += "  (inspection policy: vendor roots, debug refused, ANY measurement, any VMPL)"
    elif report["policy"]:
        verdict += f"  (policy: {report['policy']})"
    rows.append(("verdict", verdict))
    rows.append(("tee", report["tee"]))
    if report["at"]:
        rows.append(("verified at", report["at"]))
    if report["error"]:
        rows.append(("error", report["error"]))
    if report["debug"] is not None:
        rows.append(("debug", "YES" if report["debug"] else "no"))
        rows.append(("report_data", report["report_data"] or "(empty)"))
        measurements = report["measurements"] or {}
        blocks = [k for k in measurements if re.fullmatch(r"measurement_\d+", k)]
        for name, value in measurements.items():
            if name not in blocks:
                rows.append((name, value))
        if blocks:  # NVIDIA: 64 SPDM blocks; the table shows their digest, --json every block
            rows.append(("measurement blocks", f"{len(blocks)} (each in --json)"))
        tcb = report["tcb_status"]
        rows.append(("tcb_status", f"{tcb} (no --collateral)" if tcb == "unknown" else tcb))
        rows.append(("advisories", ", ".join(report["advisories"]) or "none"))
        root = report["root_fingerprint"]
        rows.append(("root", f"{root} ({report['root']})" if report["root"] else root))
        for key, value in (report["details"] or {}).items():
            if key not in ("nonce",) or value is not None:
                rows.append((key, json.dumps(value) if isinstance(value, (dict, list)) else str(value)))
    width = max(len(k) for k, _ in rows) + 2
    lines = [f"{k.ljust(width)}{v}" for k, v in rows]
    if report["violations"]:
        lines.append("violations:")
        lines += [f"  {v['field']}: got {v['got']}, want {v['want']}" for v in report["violations"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m ray_confidential.attestation.cli evidence verify ...``."""
    parser = argparse.ArgumentParser(
        prog="ray-confidential", description="ray_confidential attestation tools"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    add_parser(commands)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
