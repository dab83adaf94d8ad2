"""Tamper-evident audit log of the key broker: signed, hash-chained JSON lines (docs/audit-log.md).

    >>> import tempfile
    >>> from datetime import datetime, timezone
    >>> from cryptography.hazmat.primitives.asymmetric import ec
    >>> key = ec.generate_private_key(ec.SECP256R1())
    >>> clock = lambda: datetime(2025, 1, 1, tzinfo=timezone.utc)
    >>> path = tempfile.mkdtemp() + "/audit.jsonl"
    >>> with AuditLog(path, key, clock=clock) as log:
    ...     rec = log.append("release.granted", domain="hospital", key_version=1)
    ...     checkpoint = log.checkpoint()
    >>> rec.seq, rec.event, rec.fields["domain"]
    (1, 'release.granted', 'hospital')
    >>> verify_log(path, key.public_key(), checkpoint=checkpoint).records
    2

Record (one line, canonical JSON: sorted keys, no spaces, ASCII): ``seq`` (0 is the genesis record
naming ``log_id`` and ``key_id``), ``time`` (RFC 3339 UTC), ``event``, the caller's fields, ``prev``
(SHA-256 of the previous line, hex) and ``sig`` (ECDSA P-256/SHA-256 over a context string and the
canonical record without ``sig``; hex of r || s). A line's hash is SHA-256 of its bytes.

:meth:`AuditLog.append` returns only once the record is on stable storage (fsync);
:meth:`AuditLog.append_many` appends consecutive records and waits for durability once. A checkpoint is a
signed statement ``{log_id, seq, head, time, key_id}`` that the owner keeps away from the broker.

What verification does NOT prove: that nothing was removed from the tail after the last checkpoint
the verifier holds, or that the holder of the signing key did not rewrite history after that
checkpoint; nor that the events themselves are true.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, BinaryIO, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from ray_confidential.errors import ConfidentialError

FORMAT: Final = "ray-confidential/audit/v1"
CHECKPOINT_TYPE: Final = "ray-confidential/audit-checkpoint/v1"
GENESIS_EVENT: Final = "audit.genesis"
MAX_LINE: Final = 64 * 1024  # bytes per record line, newline included
RESERVED: Final = frozenset({"seq", "time", "event", "prev", "sig"})
ZERO_HASH: Final = "0" * 64

# Signature contexts: a record signature can never pass as a checkpoint signature or vice versa.
_RECORD_CONTEXT: Final = b"ray-confidential audit record v1\n"
_CHECKPOINT_CONTEXT: Final = b"ray-confidential audit checkpoint v1\n"
_EVENT_RE: Final = re.compile(r"\A[a-z0-9][a-z0-9_.:-]{0,63}\Z")
_FIELD_RE: Final = re.compile(r"\A[a-z_][a-z0-9_]{0,63}\Z")
_HASH_RE: Final = re.compile(r"\A[0-9a-f]{64}\Z")
_SIG_RE: Final = re.compile(r"\A[0-9a-f]{128}\Z")
_TIME_RE: Final = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z\Z")
_GOOD_FIELDS: set[str] = set()  # field names that passed the checks below (the broker uses ~20)
_MAX_GOOD_FIELDS: Final = 1024


class AuditLogError(ConfidentialError):
    """The audit log cannot be written (in use, foreign key, I/O failure). Appending stops for good."""


class AuditVerificationError(ConfidentialError):
    """The audit log (or checkpoint) failed verification; ``line`` is the first bad line (1-based) or None."""

    def __init__(self, reason: str, *, line: int | None = None) -> None:
        self.reason = reason
        self.line = line
        super().__init__(f"line {line}: {reason}" if line is not None else reason)


def utc_now() -> datetime:
    """The default clock of :class:`AuditLog` (system time, UTC). Tests pass their own ``clock``."""
    return datetime.now(timezone.utc)


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The one encoding records and checkpoints are signed and hashed in."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 (hex) of the public key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _format_time(when: datetime) -> str:
    """RFC 3339 UTC with microseconds (``_TIME_RE``); a UTC time skips the ``astimezone`` copy."""
    if not isinstance(when, datetime) or when.tzinfo is None:
        raise ValueError("audit times are timezone-aware datetimes, e.g. datetime.now(timezone.utc)")
    u = when if when.tzinfo is timezone.utc else when.astimezone(timezone.utc)
    return (f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}"
            f".{u.microsecond:06d}Z")  # fmt: skip


def _jsonable(name: str, value: Any, depth: int = 0) -> Any:
    """Fields are JSON values; bytes become lowercase hex. Anything else is a caller bug."""
    if depth > 8:
        raise ValueError(f"audit field {name!r} is nested too deeply")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"audit field {name!r} is not a finite number")
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (list, tuple)):
        return [_jsonable(name, v, depth + 1) for v in value]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"audit field {name!r}: mapping keys must be str")
        return {k: _jsonable(name, v, depth + 1) for k, v in value.items()}
    raise TypeError(
        f"audit field {name!r} has type {type(value).__name__}; use str, int, bytes, list or dict"
    )


_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())  # stateless: one instance for every signature


def _sign_bytes(key: ec.EllipticCurvePrivateKey, context: bytes, encoded: bytes) -> str:
    der = key.sign(context + encoded, _ECDSA_SHA256)
    r, s = decode_dss_signature(der)
    return (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()


def _sign(key: ec.EllipticCurvePrivateKey, context: bytes, body: Mapping[str, Any]) -> str:
    return _sign_bytes(key, context, canonical_json(body))


_SIG_SLOT: Final = secrets.token_hex(64)
"""Stands in for a record's signature (128 hex digits, like a real one) so that one encoding gives
both the signed body and the line (:func:`_encode_record`); random so no field value holds it."""
_SIG_ITEM: Final = b',"sig":"' + _SIG_SLOT.encode() + b'"'


def _encode_record(key: ec.EllipticCurvePrivateKey, body: Mapping[str, Any]) -> tuple[str, bytes]:
    """``(sig, line)`` of a record body: ``line == canonical_json({**body, "sig": sig})`` and ``sig``
    signs ``canonical_json(body)``, from one JSON encoding. With sorted keys the ``sig`` item is never
    the first (``event`` and ``seq`` sort before it), so the body's encoding is the full encoding less
    ``,"sig":"<slot>"``."""
    full = canonical_json({**body, "sig": _SIG_SLOT})
    at = full.find(_SIG_ITEM)
    if at < 0 or full.count(_SIG_SLOT.encode()) != 1:  # cannot happen; never guess: encode twice
        sig = _sign(key, _RECORD_CONTEXT, body)
        return sig, canonical_json({**body, "sig": sig})
    sig = _sign_bytes(key, _RECORD_CONTEXT, full[:at] + full[at + len(_SIG_ITEM) :])
    return sig, full.replace(_SIG_SLOT.encode(), sig.encode())


def _verify_sig(
    public_key: ec.EllipticCurvePublicKey, context: bytes, body: Mapping[str, Any], sig: str
) -> bool:
    raw = bytes.fromhex(sig)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public_key.verify(der, context + canonical_json(body), _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


def _check_p256(
    key: object, kind: type[ec.EllipticCurvePrivateKey] | type[ec.EllipticCurvePublicKey]
) -> None:
    if not isinstance(key, kind) or not isinstance(key.curve, ec.SECP256R1):
        raise TypeError(f"audit keys are ECDSA P-256 ({kind.__name__} on SECP256R1)")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """One record as written: ``line`` holds its exact bytes (without newline)."""

    seq: int
    time: str
    event: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    prev: str
    sig: str
    line: bytes

    @property
    def hash(self) -> str:
        """SHA-256 of the line, hex: the next record's ``prev`` and a checkpoint's ``head``."""
        return hashlib.sha256(self.line).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """A signed statement that the log ``log_id`` had record ``seq`` with hash ``head`` at ``time``."""

    log_id: str
    seq: int
    head: str
    time: str
    key_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditSummary:
    """What :func:`verify_log` established."""

    log_id: str
    key_id: str
    records: int  # genesis included
    last_seq: int
    head: str
    last_time: str
    checkpoint_seq: int | None  # the checkpoint verified against, if any
    torn_tail: bool  # an unterminated final line (an append cut by a crash; never acknowledged)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse_canonical(line: bytes) -> dict[str, Any]:
    """Parse one line of canonical JSON. Raises ValueError for anything else (including re-encodings)."""
    try:
        obj = json.loads(
            line.decode("ascii"), object_pairs_hook=_reject_duplicates, parse_constant=_no_constant
        )
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"not ASCII JSON: {type(exc).__name__}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if canonical_json(obj) != line:
        raise ValueError("not in canonical form (sorted keys, no spaces, ASCII)")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_record(line: bytes) -> AuditRecord:
    """Parse one record line (without newline) and check its shape; signature and chain are not checked.

    Raises:
        ValueError: malformed, non-canonical, or missing/invalid reserved fields.
    """
    if len(line) >= MAX_LINE:
        raise ValueError(f"record longer than {MAX_LINE} bytes")
    obj = _parse_canonical(line)
    seq, when, event, prev, sig = (obj.get(k) for k in ("seq", "time", "event", "prev", "sig"))
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError("seq is not a non-negative integer")
    if not isinstance(when, str) or not _TIME_RE.match(when):
        raise ValueError("time is not RFC 3339 UTC with microseconds")
    if not isinstance(event, str) or not _EVENT_RE.match(event):
        raise ValueError("event name is invalid")
    if not isinstance(prev, str) or not _HASH_RE.match(prev):
        raise ValueError("prev is not a SHA-256 hex digest")
    if not isinstance(sig, str) or not _SIG_RE.match(sig):
        raise ValueError("sig is not 64 bytes of lowercase hex")
    fields = {k: v for k, v in obj.items() if k not in RESERVED}
    return AuditRecord(
        seq=seq, time=when, event=event, fields=MappingProxyType(fields), prev=prev, sig=sig, line=line
    )


def _record_body(rec: AuditRecord) -> dict[str, Any]:
    return {**rec.fields, "seq": rec.seq, "time": rec.time, "event": rec.event, "prev": rec.prev}


def parse_checkpoint(data: bytes, public_key: ec.EllipticCurvePublicKey) -> Checkpoint:
    """Parse and verify a checkpoint (as :meth:`AuditLog.checkpoint` returns it).

    Raises:
        AuditVerificationError: malformed, signed by another key, or signature invalid.
    """
    try:
        obj = _parse_canonical(data.strip())
        if obj.get("type") != CHECKPOINT_TYPE or set(obj) != {
            "type",
            "log_id",
            "seq",
            "head",
            "time",
            "key_id",
            "sig",
        }:
            raise ValueError(f"not a {CHECKPOINT_TYPE} statement")
        seq, head, sig = obj["seq"], obj["head"], obj["sig"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ValueError("seq is not a non-negative integer")
        if not all(isinstance(obj[k], str) and _HASH_RE.match(obj[k]) for k in ("head", "key_id")):
            raise ValueError("head/key_id are not SHA-256 hex digests")
        if (
            not isinstance(obj["log_id"], str)
            or not isinstance(obj["time"], str)
            or not _TIME_RE.match(obj["time"])
        ):
            raise ValueError("log_id/time malformed")
        if not isinstance(sig, str) or not _SIG_RE.match(sig):
            raise ValueError("sig is not 64 bytes of lowercase hex")
    except ValueError as exc:
        raise AuditVerificationError(f"checkpoint malformed: {exc}") from None
    if obj["key_id"] != key_id(public_key):
        raise AuditVerificationError("checkpoint was signed by another key than the one given")
    body = {k: v for k, v in obj.items() if k != "sig"}
    if not _verify_sig(public_key, _CHECKPOINT_CONTEXT, body, sig):
        raise AuditVerificationError("checkpoint signature invalid")
    return Checkpoint(log_id=obj["log_id"], seq=seq, head=head, time=obj["time"], key_id=obj["key_id"])


def _lines(f: BinaryIO) -> Iterator[tuple[bytes, bool]]:
    """(line without newline, terminated?) pairs; an overlong line is returned cut, so it fails parsing."""
    while True:
        line = f.readline(MAX_LINE)
        if not line:
            return
        if line.endswith(b"\n"):
            yield line[:-1], True
        else:
            yield line, False


def verify_log(
    path: str | os.PathLike[str],
    public_key: ec.EllipticCurvePublicKey,
    *,
    checkpoint: bytes | None = None,
) -> AuditSummary:
    """Verify a whole log: every line canonical and signed, ``seq`` consecutive from 0, each ``prev``
    the hash of the line before, the genesis naming this key; with ``checkpoint``, the log must hold
    the checkpoint's ``seq`` with the same hash (so tail truncation and rewrites before it show).

    An unterminated last line is a write cut by a crash (never acknowledged): reported as
    ``torn_tail``, not an error.

    Raises:
        AuditVerificationError: naming the first bad line and why.
        OSError: the log cannot be read.
    """
    _check_p256(public_key, ec.EllipticCurvePublicKey)
    want_key = key_id(public_key)
    cp = parse_checkpoint(checkpoint, public_key) if checkpoint is not None else None
    log_id = ""
    prev_hash, prev_line = ZERO_HASH, None
    last: AuditRecord | None = None
    torn = False
    with open(path, "rb") as f:
        lineno = 0
        for raw, terminated in _lines(f):
            lineno += 1
            if not terminated:
                if f.read(1):
                    raise AuditVerificationError(f"record longer than {MAX_LINE} bytes", line=lineno)
                torn = True
                break
            try:
                rec = parse_record(raw)
            except ValueError as exc:
                raise AuditVerificationError(f"malformed record (edited?): {exc}", line=lineno) from None
            # (1) signature: an edited record fails here
            if not _verify_sig(public_key, _RECORD_CONTEXT, _record_body(rec), rec.sig):
                raise AuditVerificationError(
                    "signature invalid (record edited, or signed by another key)", line=lineno
                )
            # (2) position: deletions and reordering show as a seq gap or repeat
            expected = 0 if last is None else last.seq + 1
            if rec.seq != expected:
                raise AuditVerificationError(
                    f"seq {rec.seq} where {expected} was expected (records deleted, reordered or duplicated)",
                    line=lineno,
                )
            # (3) chain: each record names the hash of the line before it
            if rec.prev != prev_hash:
                raise AuditVerificationError(
                    f"prev does not match the hash of line {lineno - 1} (records deleted, swapped or replaced)"
                    if prev_line is not None
                    else "first record does not start a chain",
                    line=lineno,
                )
            # (4) genesis: binds the log id and the signing key
            if rec.seq == 0:
                if (
                    rec.event != GENESIS_EVENT
                    or rec.fields.get("format") != FORMAT
                    or not isinstance(rec.fields.get("log_id"), str)
                ):
                    raise AuditVerificationError("first record is not a genesis record", line=lineno)
                if rec.fields.get("key_id") != want_key:
                    raise AuditVerificationError("genesis names another signing key", line=lineno)
                log_id = rec.fields["log_id"]
            elif rec.event == GENESIS_EVENT:
                raise AuditVerificationError("genesis record in the middle of the log", line=lineno)
            # (5) checkpoint: the record it names must be this one
            if cp is not None and rec.seq == cp.seq:
                if cp.log_id != log_id:
                    raise AuditVerificationError(
                        "checkpoint belongs to another log (log_id differs)", line=lineno
                    )
                if cp.head != rec.hash:
                    raise AuditVerificationError(
                        f"record seq {rec.seq} differs from the checkpoint (history rewritten)", line=lineno
                    )
            prev_hash, prev_line, last = rec.hash, raw, rec
    if last is None:
        raise AuditVerificationError(
            "log is empty: no genesis record" + (" (truncated)" if cp else ""), line=1
        )
    if cp is not None and last.seq < cp.seq:
        raise AuditVerificationError(
            f"log ends at seq {last.seq} but the checkpoint covers seq {cp.seq} (tail truncated)",
            line=lineno if not torn else lineno - 1,
        )
    return AuditSummary(
        log_id=log_id,
        key_id=want_key,
        records=last.seq + 1,
        last_seq=last.seq,
        head=last.hash,
        last_time=last.time,
        checkpoint_seq=cp.seq if cp else None,
        torn_tail=torn,
    )


def _clean_fields(event: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check an appended record's event and field names; fields as JSON values (bytes as hex)."""
    if not isinstance(event, str) or not _EVENT_RE.match(event) or event == GENESIS_EVENT:
        raise ValueError(f"invalid audit event name {event!r}; use e.g. 'release.granted'")
    for name in fields:
        if name not in _GOOD_FIELDS:
            if not isinstance(name, str) or name in RESERVED or not _FIELD_RE.match(name):
                raise ValueError(f"invalid audit field name {name!r} (reserved: {sorted(RESERVED)})")
            if len(_GOOD_FIELDS) < _MAX_GOOD_FIELDS:
                _GOOD_FIELDS.add(name)
    return {k: _jsonable(k, v) for k, v in fields.items()}


class _Batch:
    """Records that share one write and one fdatasync under group commit. ``lines`` are appended
    under ``AuditLog._cond``; ``done`` is set once they are durable (or ``error`` says why not)."""

    __slots__ = ("done", "error", "head", "last_seq", "lines", "prev")

    def __init__(self, prev: _Batch | None) -> None:
        self.prev = prev
        self.lines: list[bytes] = []
        self.done = threading.Event()
        self.error: str | None = None
        self.last_seq = -1
        self.head = ZERO_HASH


class AuditLog:
    """Append-only, signed, chained audit log in one file. One writer process at a time (flock).

    Args:
        path: the log file; created (mode 0600, with ``<path>.pub`` holding the public key) if absent.
        signing_key: ECDSA P-256 private key; an existing log must have been started with the same key.
        group_commit: let concurrent appenders share one fsync (each still returns only once durable).
        clock: returns the time of a record when the caller passes none.

    Raises:
        AuditLogError: the log is in use, was started with another key, or its tail fails verification.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        signing_key: ec.EllipticCurvePrivateKey,
        *,
        group_commit: bool = False,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        _check_p256(signing_key, ec.EllipticCurvePrivateKey)
        self._path = Path(path)
        self._key = signing_key
        self._public = signing_key.public_key()
        self._key_id = key_id(self._public)
        self._group = group_commit
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._failed: str | None = None
        self._closed = False
        self._batch = _Batch(None)  # group commit: the batch new records join (docs/audit-log.md)
        created = not self._path.exists()
        self._fd = os.open(
            self._path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o600
        )
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise AuditLogError(f"audit log {self._path} is in use by another process") from None
        try:
            self._open_tail()
            if created:
                _fsync_dir(self._path.parent)
                self._write_public_key()
        except BaseException:
            os.close(self._fd)
            raise

    def _write_public_key(self) -> None:
        pub = self._path.with_name(self._path.name + ".pub")
        pem = self._public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        tmp = pub.with_name(pub.name + ".tmp")
        tmp.write_bytes(pem)
        tmp.chmod(0o644)
        os.replace(tmp, pub)

    def _open_tail(self) -> None:
        """Continue an existing chain: drop a torn final line (never acknowledged), then check that
        the genesis names our key and that the last record is signed by it."""
        size = os.fstat(self._fd).st_size
        tail = os.pread(self._fd, min(size, 2 * MAX_LINE), max(0, size - 2 * MAX_LINE))
        if tail and not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n") + 1
            size -= len(tail) - cut
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
            tail = tail[:cut]
        if size == 0:
            self._log_id = secrets.token_hex(16)
            self._next_seq, self._head = 0, ZERO_HASH
            self._written = self._durable = -1
            self._append_locked(
                GENESIS_EVENT, {"log_id": self._log_id, "key_id": self._key_id, "format": FORMAT}, None
            )
            self._fsync()
            self._durable = 0
            return
        with open(self._path, "rb") as f:
            first = f.readline(MAX_LINE).rstrip(b"\n")
        try:
            genesis, last = parse_record(first), parse_record(tail[:-1].rsplit(b"\n", 1)[-1])
        except ValueError as exc:
            raise AuditLogError(
                f"audit log {self._path}: tail or genesis malformed ({exc}); run audit verify"
            ) from None
        if genesis.seq != 0 or genesis.event != GENESIS_EVENT:
            raise AuditLogError(f"audit log {self._path} does not start with a genesis record")
        if genesis.fields.get("key_id") != self._key_id:
            raise AuditLogError(
                f"audit log {self._path} was started with another signing key; start a new log"
            )
        for rec in (genesis, last):
            if not _verify_sig(self._public, _RECORD_CONTEXT, _record_body(rec), rec.sig):
                raise AuditLogError(
                    f"audit log {self._path}: record seq {rec.seq} fails its signature; run audit verify"
                )
        self._log_id = str(genesis.fields["log_id"])
        self._next_seq, self._head = last.seq + 1, last.hash
        self._written = self._durable = last.seq

    @property
    def log_id(self) -> str:
        return self._log_id

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def _append_locked(self, event: str, fields: Mapping[str, Any], when: datetime | None) -> AuditRecord:
        """Sign and chain the next record (:meth:`_encode_locked`, :meth:`_push_locked`)."""
        rec = self._encode_locked(event, fields, when, self._next_seq, self._head)
        self._push_locked((rec,), rec.hash)
        return rec

    def _encode_locked(
        self, event: str, fields: Mapping[str, Any], when: datetime | None, seq: int, prev: str
    ) -> AuditRecord:
        """Sign record ``seq`` chained to ``prev``; changes nothing, so a refused record (too long)
        leaves the log as it was."""
        body = {
            **fields,
            "seq": seq,
            "time": _format_time(when or self._clock()),
            "event": event,
            "prev": prev,
        }
        sig, line = _encode_record(self._key, body)
        if len(line) >= MAX_LINE:
            raise ValueError(f"audit record of {len(line)} bytes exceeds {MAX_LINE}; log less detail")
        return AuditRecord(
            seq=seq, time=body["time"], event=event, fields=MappingProxyType(dict(fields)), prev=prev,
            sig=sig, line=line,
        )  # fmt: skip

    def _push_locked(self, recs: Sequence[AuditRecord], head: str) -> None:
        """Chain ``recs`` (consecutive, encoded by :meth:`_encode_locked`; ``head`` is the hash of the
        last). Without group commit they are written here, with one ``write``; with group commit their
        lines join the open batch, which that batch's leader writes (see :meth:`_commit`)."""
        lines = [rec.line + b"\n" for rec in recs]
        if self._group and self._durable >= 0:
            self._batch.lines.extend(lines)
        else:
            self._write(b"".join(lines))
        last = recs[-1].seq
        self._next_seq = last + 1
        self._head = head
        self._written = last
        self._batch.last_seq, self._batch.head = last, head

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            # A partial line may be on disk: nothing more can be appended behind it safely.
            self._failed = f"write failed: {exc.strerror}"
            raise AuditLogError(f"audit log {self._path}: {self._failed}") from None

    def _fsync(self) -> None:
        try:
            os.fdatasync(self._fd) if hasattr(os, "fdatasync") else os.fsync(self._fd)
        except OSError as exc:
            # After a failed fsync the page cache state is unknown (Linux drops dirty pages): stop.
            self._failed = f"fsync failed: {exc.strerror}"
            raise AuditLogError(f"audit log {self._path}: {self._failed}") from None

    def _commit(self, batch: _Batch) -> None:
        """Group commit, run by the first appender of ``batch`` (its leader) without ``_cond`` held:
        wait until the batch before it is durable, close ``batch`` (later records start the next one,
        which gathers while this fsync runs), write its lines with one ``write`` and make them durable
        with one fdatasync, then wake exactly its appenders. Raises AuditLogError on failure."""
        if batch.prev is not None:
            batch.prev.done.wait()
        with self._cond:
            if self._batch is batch:
                self._batch = _Batch(batch)
            failed = self._failed
        durable = False
        try:
            if failed:
                raise AuditLogError(f"audit log {self._path}: {failed}")
            self._write(b"".join(batch.lines))
            self._fsync()
            with self._cond:
                self._durable = max(self._durable, batch.last_seq)
            durable = True
        except AuditLogError as exc:
            batch.error = str(exc)
            raise
        finally:
            if not durable and batch.error is None:  # interrupted by anything else: state unknown, stop
                self._failed = self._failed or "commit interrupted"
                batch.error = f"audit log {self._path}: {self._failed}"
            batch.done.set()

    def append(self, event: str, *, time: datetime | None = None, **fields: Any) -> AuditRecord:
        """Append a record and return it once it is durable (fsync).

        Args:
            event: dotted lower-case name, e.g. ``"release.denied"``.
            time: the record's time (timezone-aware); default: the log's clock.
            **fields: JSON values (bytes are written as hex); not ``seq``, ``time``, ``event``, ``prev``, ``sig``.

        Raises:
            ValueError/TypeError: a bad event name, field name or value.
            AuditLogError: the log failed earlier or fails now (then no later append succeeds either).
        """
        return self.append_many(((event, fields),), time=time)[0]

    def append_many(
        self, records: Sequence[tuple[str, Mapping[str, Any]]], *, time: datetime | None = None
    ) -> list[AuditRecord]:
        """Append ``(event, fields)`` records as consecutive records and return them once all are
        durable: they join one group-commit batch (without group commit: one ``write`` and one fsync),
        so the caller waits for durability once. Every record is validated, signed and chained as by
        :meth:`append`; if any is refused, none is appended.

        Args:
            records: ``(event, fields)`` pairs, as :meth:`append`'s ``event`` and ``**fields``.
            time: the records' time (timezone-aware); default: the log's clock, read per record.

        Raises:
            ValueError/TypeError: a bad event name, field name or value (nothing appended).
            AuditLogError: the log failed earlier or fails now; then none of ``records`` is reported
                durable (and no later append succeeds either).
        """
        clean = [(event, _clean_fields(event, fields)) for event, fields in records]
        if not clean:
            return []
        with self._cond:
            if self._closed:
                raise ValueError("AuditLog is closed")
            if self._failed:
                raise AuditLogError(f"audit log {self._path}: {self._failed}")
            recs: list[AuditRecord] = []
            seq, head = self._next_seq, self._head
            for event, fields in clean:  # encode all first: a refused record leaves the log as it was
                rec = self._encode_locked(event, fields, time, seq, head)
                recs.append(rec)
                seq, head = seq + 1, rec.hash
            self._push_locked(recs, head)
            if not self._group:
                self._fsync()
                self._durable = recs[-1].seq
                return recs
            batch = self._batch
            lead = len(batch.lines) == len(recs)  # ours are the batch's first lines: we write it
        if lead:
            self._commit(batch)
        else:
            batch.done.wait()
            if batch.error:
                raise AuditLogError(batch.error)
        return recs

    def checkpoint(self, *, time: datetime | None = None) -> bytes:
        """A signed statement of the current durable head, for the owner to keep elsewhere."""
        with self._cond:
            if self._closed:
                raise ValueError("AuditLog is closed")
            seq, head, pending = self._written, self._head, self._batch
        if pending.lines:  # only ever vouch for durable records: wait for the open batch's commit
            pending.done.wait()
            if pending.error:
                raise AuditLogError(pending.error)
            seq, head = pending.last_seq, pending.head
        elif pending.prev is not None:
            pending.prev.done.wait()
            if pending.prev.error:
                raise AuditLogError(pending.prev.error)
        body = {
            "type": CHECKPOINT_TYPE,
            "log_id": self._log_id,
            "seq": seq,
            "head": head,
            "time": _format_time(time or self._clock()),
            "key_id": self._key_id,
        }
        return canonical_json({**body, "sig": _sign(self._key, _CHECKPOINT_CONTEXT, body)}) + b"\n"

    def close(self) -> None:
        with self._cond:
            pending = self._batch
        for batch in (pending, pending.prev):  # let running commits finish (their leaders hold the fd)
            if batch is not None and batch.lines:
                batch.done.wait()
        with self._cond:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AuditLog {self._path} seq={self._written}>"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """Load an ECDSA P-256 public key from PEM. Raises ValueError otherwise."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the audit public key must be ECDSA P-256")
    return key


__all__ = [
    "AuditLog",
    "AuditLogError",
    "AuditRecord",
    "AuditSummary",
    "AuditVerificationError",
    "Checkpoint",
    "canonical_json",
    "key_id",
    "load_public_key",
    "parse_checkpoint",
    "parse_record",
    "utc_now",
    "verify_log",
]
