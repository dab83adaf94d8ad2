"""Audit log: every tampering the issue names is caught; checkpoints; group commit; crash; CLI; fuzz."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_confidential.errors import ConfidentialError
from ray_confidential.kbs import audit as audit_mod
from ray_confidential.kbs import audit_cli
from ray_confidential.kbs.audit import (
    AuditLog,
    AuditLogError,
    AuditVerificationError,
    canonical_json,
    parse_checkpoint,
    parse_record,
    verify_log,
)
from tests.kbs.test_store import HERE, REPO, read_acks_then_kill

KEY = ec.generate_private_key(ec.SECP256R1())
PUB = KEY.public_key()
OTHER = ec.generate_private_key(ec.SECP256R1())
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)


def ticking_clock() -> Callable[[], datetime]:
    state = {"t": T0}

    def clock() -> datetime:
        state["t"] += timedelta(milliseconds=1)
        return state["t"]

    return clock


def make_log(path: Path, n: int = 6, key: ec.EllipticCurvePrivateKey = KEY) -> bytes:
    """A log with a genesis and ``n`` records; returns a checkpoint of its head."""
    with AuditLog(path, key, clock=ticking_clock()) as log:
        for i in range(n):
            log.append("release.granted", domain="hospital", key_version=1, nonce=bytes([i]) * 16, n=i)
        return log.checkpoint()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, content: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in content))


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


# --------------------------------------------------------------------------------------------------
# Happy path


def test_records_verify_with_and_without_checkpoint(log_path: Path) -> None:
    cp = make_log(log_path)
    summary = verify_log(log_path, PUB, checkpoint=cp)
    assert (summary.records, summary.last_seq, summary.checkpoint_seq, summary.torn_tail) == (7, 6, 6, False)
    assert verify_log(log_path, PUB).checkpoint_seq is None
    first = parse_record(lines(log_path)[1])
    assert first.event == "release.granted" and first.fields["nonce"] == "00" * 16  # bytes written as hex
    assert first.time == "2025-06-01T12:00:00.002000Z"
    for line in lines(log_path):
        assert canonical_json(json.loads(line)) == line
    assert (log_path.stat().st_mode & 0o077) == 0
    assert Path(str(log_path) + ".pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_append_returns_the_record_written(log_path: Path) -> None:
    with AuditLog(log_path, KEY, clock=ticking_clock()) as log:
        rec = log.append(
            "release.denied", time=T0, domain="bank", reason="measurement mismatch", tags=["a", 1]
        )
        assert rec.line == lines(log_path)[-1] and rec.seq == 1 and rec.time == "2025-06-01T12:00:00.000000Z"
        assert rec.fields == {"domain": "bank", "reason": "measurement mismatch", "tags": ["a", 1]}
        assert parse_record(rec.line).hash == rec.hash


@pytest.mark.parametrize(
    "fields",
    [
        {"nested": {"sig": "0" * 128, "a": [1, {"sig": "x"}]}},  # a nested "sig" key
        {"reason": ',"sig":"' + "0" * 128 + '"', "zz": "after sig"},  # the item's text inside a value
        {"reason": audit_mod._SIG_SLOT},  # the placeholder itself: the two-encoding path
        {"reason": "x", "nested": {"k": audit_mod._SIG_SLOT}},
    ],
)
def test_record_line_and_signed_body_from_one_encoding(log_path: Path, fields: dict[str, object]) -> None:
    """The line is the canonical encoding of the signed body plus its sig, whatever the fields hold."""
    with AuditLog(log_path, KEY, clock=ticking_clock()) as log:
        rec = log.append("release.denied", **fields)  # type: ignore[arg-type]
    obj = json.loads(rec.line)
    assert canonical_json(obj) == rec.line and obj["sig"] == rec.sig
    assert {k: obj[k] for k in fields} == fields
    body = {k: v for k, v in obj.items() if k != "sig"}
    assert audit_mod._verify_sig(PUB, audit_mod._RECORD_CONTEXT, body, rec.sig)
    assert verify_log(log_path, PUB).records == 2


def test_time_is_rfc3339_utc_whatever_the_zone(log_path: Path) -> None:
    cet = timezone(timedelta(hours=1))
    with AuditLog(log_path, KEY) as log:
        a = log.append("x", time=datetime(2025, 1, 2, 0, 30, 0, 7, tzinfo=cet))
        b = log.append("x", time=datetime(999, 12, 31, 23, 59, 59, tzinfo=timezone.utc))
    assert a.time == "2025-01-01T23:30:00.000007Z"
    assert b.time == "0999-12-31T23:59:59.000000Z"  # four digits, as parse_record requires
    assert verify_log(log_path, PUB).records == 3


@pytest.mark.parametrize(
    ("event", "fields", "error"),
    [
        ("Bad Event", {}, ValueError),
        ("audit.genesis", {}, ValueError),
        ("ok", {"seq": 3}, ValueError),
        ("ok", {"prev": "x"}, ValueError),
        ("ok", {"sig": "x"}, ValueError),
        ("ok", {"BadName": 1}, ValueError),
        ("ok", {"value": object()}, TypeError),
        ("ok", {"value": float("nan")}, ValueError),
        ("ok", {"value": {1: 2}}, TypeError),
        ("ok", {"blob": "x" * 70_000}, ValueError),
    ],
)
def test_append_rejects_misuse(
    log_path: Path, event: str, fields: dict[str, object], error: type[Exception]
) -> None:
    with AuditLog(log_path, KEY) as log:
        with pytest.raises(error):
            log.append(event, **fields)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timezone-aware"):
            log.append("ok", time=datetime(2025, 1, 1))
        log.append("still.works")
    assert verify_log(log_path, PUB).records == 2


def test_wrong_key_type_refused(log_path: Path) -> None:
    with pytest.raises(TypeError, match="P-256"):
        AuditLog(log_path, ec.generate_private_key(ec.SECP384R1()))


# --------------------------------------------------------------------------------------------------
# Acceptance: each tampering caught, naming the first bad line


def test_edited_record_caught(log_path: Path) -> None:
    make_log(log_path)
    content = lines(log_path)
    content[3] = content[3].replace(b'"domain":"hospital"', b'"domain":"hospitaL"')
    write_lines(log_path, content)
    with pytest.raises(AuditVerificationError, match="signature invalid") as info:
        verify_log(log_path, PUB)
    assert info.value.line == 4 and isinstance(info.value, ConfidentialError)


def test_edited_record_resigned_with_another_key_caught(log_path: Path) -> None:
    """The attacker re-signs the edited record with its own key: still caught (pinned key)."""
    make_log(log_path)
    content = lines(log_path)
    obj = json.loads(content[2])
    obj["domain"] = "attacker"
    del obj["sig"]
    from ray_confidential.kbs.audit import _RECORD_CONTEXT, _sign

    obj["sig"] = _sign(OTHER, _RECORD_CONTEXT, obj)
    content[2] = canonical_json(obj)
    write_lines(log_path, content)
    with pytest.raises(AuditVerificationError, match="signature invalid") as info:
        verify_log(log_path, PUB)
    assert info.value.line == 3


def test_non_canonical_reencoding_caught(log_path: Path) -> None:
    """Same JSON value, different bytes (would change the chain hash): refused as non-canonical."""
    make_log(log_path)
    content = lines(log_path)
    content[2] = json.dumps(json.loads(content[2]), sort_keys=True).encode()  # with spaces
    write_lines(log_path, content)
    with pytest.raises(AuditVerificationError, match="canonical") as info:
        verify_log(log_path, PUB)
    assert info.value.line == 3


@pytest.mark.parametrize("index", [0, 1, 3])
def test_deleted_record_caught(log_path: Path, index: int) -> None:
    make_log(log_path)
    content = lines(log_path)
    del content[index]
    write_lines(log_path, content)
    with pytest.raises(AuditVerificationError, match="deleted") as info:
        verify_log(log_path, PUB)
    assert info.value.line == index + 1


def test_swapped_records_caught(log_path: Path) -> None:
    make_log(log_path)
    content = lines(log_path)
    content[2], content[3] = content[3], content[2]
    write_lines(log_path, content)
    with pytest.raises(AuditVerificationError, match="reordered") as info:
        verify_log(log_path, PUB)
    assert info.value.line == 3


def test_duplicated_record_caught(log_path: Path) -> None:
    make_log(log_path)
    content = lines(log_path)
    content.insert(3, content[2])
    write_lines(log_path, content)
    with pytest.raises(AuditVerificationError, match="duplicated") as info:
        verify_log(log_path, PUB)
    assert info.value.line == 4


@pytest.mark.parametrize("keep", [0, 1, 3, 6])
def test_truncated_tail_caught_with_checkpoint(log_path: Path, keep: int) -> None:
    cp = make_log(log_path)
    write_lines(log_path, lines(log_path)[:keep])
    with pytest.raises(AuditVerificationError, match="truncated"):
        verify_log(log_path, PUB, checkpoint=cp)


def test_truncation_without_checkpoint_is_not_detectable(log_path: Path) -> None:
    """Documented limitation (docs/audit-log.md): without a checkpoint a cut tail looks like a shorter log."""
    make_log(log_path)
    write_lines(log_path, lines(log_path)[:4])
    assert verify_log(log_path, PUB).records == 4


def test_rewrite_by_foreign_key_caught(log_path: Path, tmp_path: Path) -> None:
    """An attacker without the broker key writes a whole consistent log of its own."""
    make_log(tmp_path / "forged.jsonl", key=OTHER)
    os.replace(tmp_path / "forged.jsonl", log_path)
    with pytest.raises(AuditVerificationError, match="signature invalid") as info:
        verify_log(log_path, PUB)
    assert info.value.line == 1


def test_rewrite_before_checkpoint_by_key_holder_caught(log_path: Path, tmp_path: Path) -> None:
    """Even the key holder cannot rewrite history the owner's checkpoint covers."""
    cp = make_log(log_path, n=4)
    forged = tmp_path / "forged.jsonl"
    make_log(forged, n=6)  # same key, different records (and log id)
    os.replace(forged, log_path)
    with pytest.raises(AuditVerificationError, match="another log"):
        verify_log(log_path, PUB, checkpoint=cp)


def test_rewrite_after_checkpoint_by_key_holder_not_detectable(log_path: Path) -> None:
    """Documented limitation: records after the last checkpoint can be rewritten by the key holder."""
    with AuditLog(log_path, KEY, clock=ticking_clock()) as log:
        log.append("a.b", n=1)
        cp = log.checkpoint()
        log.append("release.granted", domain="x")
    keep = lines(log_path)[:2]
    write_lines(log_path, keep)
    with AuditLog(log_path, KEY, clock=ticking_clock()) as log:
        log.append("release.denied", domain="x")  # history after the checkpoint, rewritten
    assert verify_log(log_path, PUB, checkpoint=cp).records == 3


def test_checkpoint_tampering_caught(log_path: Path, tmp_path: Path) -> None:
    cp = make_log(log_path)
    obj = json.loads(cp)
    obj["seq"] = 2
    with pytest.raises(AuditVerificationError, match="checkpoint signature invalid"):
        verify_log(log_path, PUB, checkpoint=canonical_json(obj))
    with pytest.raises(AuditVerificationError, match="another key"):
        parse_checkpoint(cp, OTHER.public_key())
    with pytest.raises(AuditVerificationError, match="malformed"):
        parse_checkpoint(b"{not json", PUB)
    other_log_cp = make_log(tmp_path / "other.jsonl")
    with pytest.raises(AuditVerificationError, match="another log"):
        verify_log(log_path, PUB, checkpoint=other_log_cp)


def test_record_signature_cannot_pass_as_checkpoint(log_path: Path) -> None:
    """Domain separation: a record line re-shaped as a checkpoint does not verify."""
    make_log(log_path)
    rec = json.loads(lines(log_path)[-1])
    fake = {"type": "ray-confidential/audit-checkpoint/v1", "log_id": "x", "seq": rec["seq"], "head": "0" * 64,
            "time": rec["time"], "key_id": "0" * 64, "sig": rec["sig"]}  # fmt: skip
    with pytest.raises(AuditVerificationError):
        parse_checkpoint(canonical_json(fake), PUB)


def test_empty_log_caught(log_path: Path) -> None:
    log_path.write_bytes(b"")
    with pytest.raises(AuditVerificationError, match="empty"):
        verify_log(log_path, PUB)


# --------------------------------------------------------------------------------------------------
# Reopen, torn tail, locking, failures


def test_reopen_continues_chain(log_path: Path) -> None:
    make_log(log_path, n=2)
    with AuditLog(log_path, KEY) as log:
        assert log.append("x.y").seq == 3
        cp = log.checkpoint()
    assert verify_log(log_path, PUB, checkpoint=cp).records == 4


def test_reopen_with_another_key_refused(log_path: Path) -> None:
    make_log(log_path, n=1)
    with pytest.raises(AuditLogError, match="another signing key"):
        AuditLog(log_path, OTHER)


def test_reopen_with_tampered_tail_refused(log_path: Path) -> None:
    make_log(log_path, n=2)
    content = lines(log_path)
    content[-1] = content[-1].replace(b'"n":1', b'"n":9')
    write_lines(log_path, content)
    with pytest.raises(AuditLogError, match="fails its signature"):
        AuditLog(log_path, KEY)


def test_torn_tail_tolerated_then_repaired(log_path: Path) -> None:
    cp = make_log(log_path, n=3)
    with open(log_path, "ab") as f:
        f.write(b'{"event":"release.granted","n":')  # a crash in the middle of an append
    summary = verify_log(log_path, PUB, checkpoint=cp)
    assert summary.torn_tail and summary.records == 4
    with AuditLog(log_path, KEY) as log:
        assert log.append("after.crash").seq == 4
    assert not verify_log(log_path, PUB, checkpoint=cp).torn_tail


def test_second_writer_refused(log_path: Path) -> None:
    with AuditLog(log_path, KEY):
        with pytest.raises(AuditLogError, match="in use"):
            AuditLog(log_path, KEY)


def test_fsync_failure_stops_the_log(log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsyncgate: after a failed fsync nothing more is acknowledged, ever."""
    log = AuditLog(log_path, KEY)

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(AuditLogError, match="fsync failed"):
        log.append("release.granted")
    monkeypatch.undo()
    with pytest.raises(AuditLogError, match="fsync failed"):
        log.append("release.granted")
    log.close()


# --------------------------------------------------------------------------------------------------
# Group commit


def count_syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count ``os.fdatasync`` calls from now on (in a one-item list) while still syncing."""
    syncs, real = [0], os.fdatasync

    def counting(fd: int) -> None:
        syncs[0] += 1
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return syncs


@pytest.mark.parametrize("group", [False, True])
def test_concurrent_appends_keep_a_valid_chain(
    log_path: Path, monkeypatch: pytest.MonkeyPatch, group: bool
) -> None:
    syncs = count_syncs(monkeypatch)
    log = AuditLog(log_path, KEY, group_commit=group)
    seqs: list[int] = []
    not_durable: list[int] = []
    per_thread = 40

    def work(n: int) -> None:
        for i in range(per_thread):
            rec = log.append("release.granted", thread=n, i=i)
            if log._durable < rec.seq:  # returned before its record was synced
                not_durable.append(rec.seq)
            seqs.append(rec.seq)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cp = log.checkpoint()
    log.close()
    assert sorted(seqs) == list(range(1, 8 * per_thread + 1)) and not not_durable
    assert verify_log(log_path, PUB, checkpoint=cp).records == 8 * per_thread + 1
    if group:
        assert syncs[0] < 8 * per_thread, "group commit shared no fsync"
    else:
        assert syncs[0] >= 8 * per_thread + 1


# --------------------------------------------------------------------------------------------------
# Crash: kill -9 during a burst of appends


def test_crash_every_acknowledged_record_durable(tmp_path: Path) -> None:
    log_path = tmp_path / "audit.jsonl"
    key_pem = tmp_path / "audit.key"
    key_pem.write_bytes(KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    rng = random.Random(7)
    acked: dict[int, str] = {}
    last_cp: bytes | None = None
    for seed in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "crash_writer.py"), "audit", str(log_path), str(key_pem), str(seed)],
            stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        for line in read_acks_then_kill(proc, rng.uniform(0.2, 0.5)):
            tag, *rest = line.split(" ")
            if tag == "A":
                acked[int(rest[0])] = rest[1]
            elif tag == "C":
                last_cp = base64.b64decode(rest[0])
        verify_log(log_path, PUB, checkpoint=last_cp)
        with AuditLog(log_path, KEY):  # reopening repairs a torn tail and continues
            pass
        on_disk = {parse_record(line).seq: parse_record(line).hash for line in lines(log_path)}
        for seq, digest in acked.items():
            assert on_disk.get(seq) == digest, f"acknowledged record {seq} lost after kill -9"
    assert last_cp is not None and len(acked) > 20


# --------------------------------------------------------------------------------------------------
# CLI


def cli(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    audit_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    code = audit_cli.run(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_exit_codes(log_path: Path, tmp_path: Path) -> None:
    cp = make_log(log_path)
    (tmp_path / "cp").write_bytes(cp)
    pem = tmp_path / "owner.pub"
    pem.write_bytes(
        PUB.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    base = ["audit", "verify", str(log_path)]

    code, out, err = cli([*base, "--checkpoint", str(tmp_path / "cp"), "--public-key", str(pem)])
    assert code == 0 and "7 records" in out and "checkpoint at seq 6 verified" in out and err == ""
    code, out, err = cli(base)  # LOG.pub beside the log, with a warning; no checkpoint warning
    assert code == 0 and "beside the log" in err and "truncation is not detectable" in err
    code, out, _ = cli([*base, "--json", "--public-key", str(pem)])
    assert code == 0 and json.loads(out)["records"] == 7

    content = lines(log_path)
    del content[2]
    write_lines(log_path, content)
    code, _, err = cli([*base, "--public-key", str(pem)])
    assert code == 1 and "TAMPERED: line 3" in err
    code, out, _ = cli([*base, "--public-key", str(pem), "--json"])
    assert code == 1 and json.loads(out)["error"].startswith("line 3")

    assert cli(["audit", "verify", str(tmp_path / "nope"), "--public-key", str(pem)])[0] == 2
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("not a key")
    assert cli([*base, "--public-key", str(bad_pem)])[0] == 2
    assert cli([*base, "--public-key", str(pem), "--checkpoint", str(tmp_path / "nope")])[0] == 2
    (tmp_path / "junk").write_text("junk")
    assert cli([*base, "--public-key", str(pem), "--checkpoint", str(tmp_path / "junk")])[0] == 2
    os.unlink(str(log_path) + ".pub")
    assert cli(base)[0] == 2


def test_cli_wrong_key_is_tampered(log_path: Path, tmp_path: Path) -> None:
    make_log(log_path)
    pem = tmp_path / "other.pub"
    pem.write_bytes(
        OTHER.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert cli(["audit", "verify", str(log_path), "--public-key", str(pem)])[0] == 1


# --------------------------------------------------------------------------------------------------
# Fuzz


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_parse_record_only_raises_value_error(data: bytes) -> None:
    try:
        parse_record(data)
    except ValueError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=10))  # fmt: skip
def test_fuzz_parse_record_json_shapes(value: object) -> None:
    for line in (json.dumps(value).encode(), canonical_json({"seq": 1, "x": value})):
        try:
            parse_record(line)
        except ValueError:
            pass
    try:
        parse_checkpoint(json.dumps(value).encode(), PUB)
    except AuditVerificationError:
        pass


_FUZZ_LOG: dict[str, bytes] = {}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_any_byte_change_is_caught(tmp_path: Path, data: st.DataObject) -> None:
    """With a checkpoint of the head, changing, inserting or deleting any byte fails verification."""
    if not _FUZZ_LOG:
        path = tmp_path / "fuzz-base.jsonl"
        _FUZZ_LOG["cp"] = make_log(path, n=3)
        _FUZZ_LOG["log"] = path.read_bytes()
    original = _FUZZ_LOG["log"]
    pos = data.draw(st.integers(0, len(original) - 1))
    op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
    if op == "flip":
        mutated = (
            original[:pos] + bytes([original[pos] ^ data.draw(st.integers(1, 255))]) + original[pos + 1 :]
        )
    elif op == "insert":
        mutated = original[:pos] + bytes([data.draw(st.integers(0, 255))]) + original[pos:]
    else:
        mutated = original[:pos] + original[pos + 1 :]
    target = tmp_path / "fuzz.jsonl"
    target.write_bytes(mutated)
    with pytest.raises(AuditVerificationError):
        verify_log(target, PUB, checkpoint=_FUZZ_LOG["cp"])


def test_group_commit_interrupted_acknowledges_nothing(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit cut by anything but an I/O error (here a KeyboardInterrupt in fdatasync) must not let
    the batch's appenders return as if durable, nor any later append."""
    log = AuditLog(log_path, KEY, group_commit=True)

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fdatasync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        log.append("release.granted")
    monkeypatch.undo()
    with pytest.raises(AuditLogError, match="commit interrupted"):
        log.append("release.granted")
    log.close()


# --------------------------------------------------------------------------------------------------
# append_many: consecutive records, one durability wait


@pytest.mark.parametrize("group", [False, True])
def test_append_many_records_verify_in_order(
    log_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group: bool
) -> None:
    log = AuditLog(log_path, KEY, group_commit=group, clock=ticking_clock())
    syncs = count_syncs(monkeypatch)
    recs = log.append_many(
        [("unwrap", {"decision": "grant", "item": i, "nonce": bytes([i]) * 4}) for i in range(5)]
    )
    monkeypatch.undo()
    assert syncs[0] == 1, "one durability wait for the whole batch"
    assert [r.seq for r in recs] == [1, 2, 3, 4, 5] and log._durable == 5
    assert [r.prev for r in recs[1:]] == [r.hash for r in recs[:-1]]
    assert recs[2].fields == {"decision": "grant", "item": 2, "nonce": "02020202"}
    assert log.append_many([]) == []
    log.append("after")
    cp = log.checkpoint()
    log.close()
    assert [parse_record(line).seq for line in lines(log_path)] == list(range(7))
    assert [parse_record(line).line for line in lines(log_path)[1:6]] == [r.line for r in recs]
    assert verify_log(log_path, PUB, checkpoint=cp).records == 7
    (tmp_path / "cp").write_bytes(cp)
    (tmp_path / "audit.pub").write_bytes(PUB.public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    code, out, _ = cli(["audit", "verify", str(log_path), "--public-key", str(tmp_path / "audit.pub"),
                        "--checkpoint", str(tmp_path / "cp")])  # fmt: skip
    assert code == 0, out


def test_append_many_with_concurrent_single_appends(log_path: Path) -> None:
    """Batches and single records from threads share group-commit batches: every batch stays
    consecutive in the chain, every record is durable when its call returns, the log verifies."""
    log = AuditLog(log_path, KEY, group_commit=True)
    batches: list[list[int]] = []
    seqs: list[int] = []
    not_durable: list[int] = []

    def singles(n: int) -> None:
        for i in range(30):
            rec = log.append("unwrap", thread=n, i=i)
            if log._durable < rec.seq:
                not_durable.append(rec.seq)
            seqs.append(rec.seq)

    def many(n: int) -> None:
        for i in range(10):
            recs = log.append_many([("unwrap", {"thread": n, "i": i, "item": k}) for k in range(4)])
            if log._durable < recs[-1].seq:
                not_durable.append(recs[-1].seq)
            batches.append([r.seq for r in recs])
            seqs.extend(r.seq for r in recs)

    threads = [threading.Thread(target=fn, args=(n,)) for n, fn in enumerate([singles, many] * 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cp = log.checkpoint()
    log.close()
    total = 3 * 30 + 3 * 10 * 4
    assert sorted(seqs) == list(range(1, total + 1)) and not not_durable
    assert all(b == list(range(b[0], b[0] + 4)) for b in batches), "a batch's records are consecutive"
    assert verify_log(log_path, PUB, checkpoint=cp).records == total + 1


@pytest.mark.parametrize("group", [False, True])
def test_append_many_refuses_all_or_nothing_on_a_bad_record(log_path: Path, group: bool) -> None:
    with AuditLog(log_path, KEY, group_commit=group) as log:
        with pytest.raises(ValueError, match="invalid audit field name"):
            log.append_many([("unwrap", {"ok": 1}), ("unwrap", {"seq": 2})])
        with pytest.raises(ValueError, match="exceeds"):  # found only when encoding, under the lock
            log.append_many([("unwrap", {"ok": 1}), ("unwrap", {"blob": "x" * 70_000})])
        assert log.append_many([("still.works", {})])[0].seq == 1
    assert verify_log(log_path, PUB).records == 2


@pytest.mark.parametrize("group", [False, True])
def test_append_many_fsync_failure_reports_nothing_durable(
    log_path: Path, monkeypatch: pytest.MonkeyPatch, group: bool
) -> None:
    log = AuditLog(log_path, KEY, group_commit=group)

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(AuditLogError, match="fsync failed"):
        log.append_many([("unwrap", {"i": 1}), ("unwrap", {"i": 2})])
    monkeypatch.undo()
    for attempt in (lambda: log.append_many([("unwrap", {"i": 3})]), lambda: log.append("unwrap")):
        with pytest.raises(AuditLogError, match="fsync failed"):
            attempt()
    assert log._durable == 0
    log.close()
