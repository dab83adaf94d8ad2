"""``ray-confidential audit verify``: check a key broker audit log (docs/audit-log.md).

    $ ray-confidential audit verify /var/lib/ray-confidential/audit.jsonl \\
          --checkpoint owner/checkpoint-2025-06-01.json --public-key owner/audit.pub

Exit status: 0 the log verifies; 1 it was tampered with (first bad line and reason printed), or the
checkpoint does not verify under the key; 2 unusable input (unreadable log, key or checkpoint).
Without ``--public-key`` the key in ``LOG.pub`` beside the log is used, with a warning: a key stored
next to the log proves nothing to someone who could have replaced both. Without ``--checkpoint``
tail truncation is not detectable.

The lead's main CLI calls :func:`add_parser` and :func:`run`; imports are deferred to :func:`run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, TextIO

EXIT_OK, EXIT_TAMPERED, EXIT_UNUSABLE = 0, 1, 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``audit verify`` to an ``argparse`` sub-parser collection; returns the ``audit`` parser."""
    audit: argparse.ArgumentParser = subparsers.add_parser(
        "audit", help="verify a key broker audit log", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND")
    sub.required = True
    verify = sub.add_parser("verify", help="check signatures, chain, and a checkpoint")
    verify.add_argument("log", metavar="LOG", help="audit log file (JSON lines)")
    verify.add_argument(
        "--checkpoint", metavar="CP", help="signed checkpoint the owner kept (detects truncation)"
    )
    verify.add_argument(
        "--public-key", metavar="PEM", help="the broker's audit public key (default: LOG.pub)"
    )
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.set_defaults(func=run)
    return audit


def _fail(message: str, code: int, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.json:
        print(json.dumps({"ok": False, "exit": code, "error": message}), file=out)
    else:
        print(("TAMPERED: " if code == EXIT_TAMPERED else "error: ") + message, file=err)
    return code


def run(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``audit verify``; returns the exit status."""
    from ray_confidential.kbs.audit import AuditVerificationError, load_public_key, verify_log

    out = out or sys.stdout
    err = err or sys.stderr
    log = Path(args.log)
    if not log.is_file():
        return _fail(f"{log} is not a readable file", EXIT_UNUSABLE, args, out, err)
    key_path = Path(args.public_key) if args.public_key else log.with_name(log.name + ".pub")
    if not args.public_key:
        if not key_path.is_file():
            return _fail(
                f"no --public-key given and {key_path} does not exist", EXIT_UNUSABLE, args, out, err
            )
        print(
            f"warning: using {key_path} found beside the log; pin the broker's key with --public-key",
            file=err,
        )
    try:
        public_key = load_public_key(key_path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        return _fail(f"cannot load public key {key_path}: {exc}", EXIT_UNUSABLE, args, out, err)
    checkpoint = None
    if args.checkpoint:
        try:
            checkpoint = Path(args.checkpoint).read_bytes()
        except OSError as exc:
            return _fail(
                f"cannot read checkpoint {args.checkpoint}: {exc.strerror}", EXIT_UNUSABLE, args, out, err
            )
    try:
        summary = verify_log(log, public_key, checkpoint=checkpoint)
    except AuditVerificationError as exc:
        unusable = exc.line is None and exc.reason.startswith("checkpoint malformed")
        return _fail(str(exc), EXIT_UNUSABLE if unusable else EXIT_TAMPERED, args, out, err)
    except OSError as exc:
        return _fail(f"cannot read {log}: {exc.strerror}", EXIT_UNUSABLE, args, out, err)
    if args.json:
        print(json.dumps({"ok": True, "exit": EXIT_OK, **dataclasses.asdict(summary)}), file=out)
    else:
        print(
            f"ok: {summary.records} records, log {summary.log_id}, head seq {summary.last_seq} "
            f"({summary.head[:16]}...), last {summary.last_time}",
            file=out,
        )
        if summary.checkpoint_seq is not None:
            print(f"checkpoint at seq {summary.checkpoint_seq} verified", file=out)
        else:
            print("warning: no --checkpoint: tail truncation is not detectable", file=err)
        if summary.torn_tail:
            print("note: an unterminated last line (an append cut by a crash) was ignored", file=err)
    return EXIT_OK
