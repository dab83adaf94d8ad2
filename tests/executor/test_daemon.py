"""The executor daemon without Ray: calls, approvals (A2, A3), isolation, errors, limits, lifecycle,
and the local attacks of A6/A7 (attestation device, forged requests, /proc/PID/mem)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from enclave_actors import protocol
from enclave_actors.device import request_evidence
from enclave_actors.keys import UnsafeLocalKeyReleaser, bump_revocation_epoch
from enclave_actors.shim import ExecutorClient
from ray_confidential.attestation.binding import Binding
from ray_confidential.bundle import Bundle, from_callable
from ray_confidential.domains import DomainPolicy
from ray_confidential.errors import AttestationError, KeyReleaseDenied, SealedTaskError
from tests.executor import conf_funcs
from tests.executor.conftest import Env, launch, make_service, stop

REPO = Path(__file__).resolve().parents[2]
TOTAL = from_callable(conf_funcs.total)
DROP_PRIVS = ["setpriv", "--bounding-set=-sys_ptrace,-dac_override,-dac_read_search", "--inh-caps=-all"]
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all"]


def _stats(env: Env) -> dict:
    return env.client.request({"op": "stats"}).header


def test_call_round_trip_and_caches(env: Env) -> None:
    sealed = env.seal(np.arange(10.0))
    out = env.client.call(TOTAL, domain="exec-a", inputs=[sealed], args=[["s", 0], ["j", 2]])
    assert env.open(out) == {"sum": 90.0}
    before = _stats(env)["stats"]
    env.client.call(TOTAL, domain="exec-a", inputs=[sealed], args=[["s", 0]])
    after = _stats(env)["stats"]
    assert after["unwraps"] == before["unwraps"] and after["grants"] == before["grants"]  # cached token + DEK


def test_large_input_moves_as_sealed_memfd(env: Env) -> None:
    big = env.seal(np.ones(1 << 19))  # 4 MiB: over the inline limit
    assert len(big) > 1 << 20
    assert env.open(env.client.call(TOTAL, domain="exec-a", inputs=[big], args=[["s", 0]])) == {
        "sum": float(1 << 19)
    }


def test_unsealed_memfd_is_refused(env: Env) -> None:
    """The shim could rewrite an unsealed memfd while the executor reads it (TOCTOU): refused."""
    data = env.seal(np.arange(4.0))
    fd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    header = {"op": "call", "bundle_digest": TOTAL.digest_hex, "domain": "exec-a",
              "inputs": [{"src": "fd", "index": 0}], "params": {"args": [["s", 0]]},
              "bundle": {**TOTAL.to_wire(), "files": 1}}  # fmt: skip
    reply = env.client.request(header, [TOTAL.files[0][1]], [fd])
    os.close(fd)
    assert reply.header["status"] == "bad_request"


def test_a2_replaced_source_gets_no_key(env: Env) -> None:
    """A compromised head replaces the bundle source: the digest no longer matches, or is not approved."""
    genuine = TOTAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env.service.create_domain("approved", DomainPolicy(bundles=(genuine.digest_hex,)))
    sealed = env.seal(np.arange(3.0), "approved")
    fresh = ExecutorClient(env.executor.socket)
    assert env.open(fresh.call(genuine, domain="approved", inputs=[sealed], args=[["s", 0]])) == {"sum": 3.0}
    path, source = genuine.files[0]
    evil_source = source.replace(b'return {"sum"', b'return {"stolen": x.tolist(), "sum"')
    assert evil_source != source
    evil = Bundle(module=genuine.module, entry=genuine.entry, files=((path, evil_source),))
    # (a) Claiming the approved digest with other source: the executor hashes what it received.
    header = {"op": "call", "bundle_digest": "11" * 32, "domain": "approved", "inputs": [],
              "params": {}, "bundle": {**evil.to_wire(), "files": 1}}  # fmt: skip
    assert fresh.request(header, [evil_source]).header["status"] == "bad_request"
    # ... and where it has the approved digest cached, it runs only the cached (genuine) source.
    header["bundle_digest"] = genuine.digest_hex
    header["inputs"] = [{"src": "frame", "index": 0}]
    header["params"] = {"args": [["s", 0]]}
    reply = fresh.request(header, [evil_source, sealed])
    assert reply.header["status"] == "ok" and env.open(reply.frames[0]) == {"sum": 3.0}
    # (b) The replaced source under its own digest: not approved, no key, audited denial.
    sealed2 = env.seal(np.arange(3.0), "approved")
    with pytest.raises(KeyReleaseDenied, match="not approved by domain 'approved'"):
        fresh.call(evil, domain="approved", inputs=[sealed2], args=[["s", 0]])
    audit = [json.loads(line) for line in env.audit().splitlines()]
    assert any(r["event"] == "call_denied" and r["bundle"] == evil.digest_hex for r in audit)
    from ray_confidential.sealed.format import SealedHeader

    oid = SealedHeader.parse(sealed2).object_id.hex()
    assert not any(r.get("object_id") == oid for r in audit), "a key was released for the denied call"


def test_a3_unapproved_bundle_and_foreign_domain(env: Env) -> None:
    sealed = env.seal(np.arange(3.0), "strict")
    with pytest.raises(KeyReleaseDenied, match="not approved by domain 'strict'"):
        env.client.call(TOTAL, domain="exec-a", inputs=[sealed], args=[["s", 0]])
    with pytest.raises(KeyReleaseDenied, match="not approved"):
        env.client.call(TOTAL, domain="strict", inputs=[], args=[["j", [1]]])
    # Another owner's domain (held by a different key service): the broker knows nothing of it.
    other = make_service(env.state_dir.parent / "other-owner")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = other.create_domain("other-owner-domain")
    from ray_confidential.sealed.format import DomainPublicKey, seal

    foreign = bytes(
        seal(np.arange(2.0), DomainPublicKey(domain="other-owner-domain", version=1, public_key=d.public_key))
    )
    with pytest.raises(KeyReleaseDenied):
        env.client.call(TOTAL, domain="exec-a", inputs=[foreign], args=[["s", 0]])


def test_forged_requests_are_refused(env: Env) -> None:
    for header in ({"op": "unwrap", "domain": "exec-a"}, {"op": "dump_keys"}, {"op": "call"},
                   {"op": "call", "bundle_digest": "zz"}):  # fmt: skip
        assert env.client.request(header).header["status"] in ("bad_request", "need_bundle")
    # An entry point outside the bundle ("os.system" re-exported by approved-looking source).
    evil = Bundle(module="evil_mod", entry="system", files=(("evil_mod.py", b"from os import system\n"),))
    with pytest.raises(ValueError, match=r"failed to load|refused"):
        env.client.call(evil, domain="exec-a", args=[["j", "id"]])
    # A recipient key the policy does not list: results are never sealed to the attacker.
    with pytest.raises(KeyReleaseDenied, match="recipient"):
        env.client.call(TOTAL, domain="exec-a", args=[["j", [1]]], recipient="x25519:" + "11" * 32)


def test_domains_never_share_a_worker_and_later_calls_see_no_keys(env: Env) -> None:
    pk = from_callable(conf_funcs.pid_and_keys)
    a = env.open(env.client.call(pk, domain="exec-a"))
    b = env.open(env.client.call(pk, domain="exec-b"))
    a2 = env.open(env.client.call(pk, domain="exec-a"))
    assert a["pid"] != b["pid"] and a["pid"] == a2["pid"]
    assert a["key_handles"] == b["key_handles"] == a2["key_handles"] == 0
    other_bundle = from_callable(conf_funcs.where)
    w = env.open(env.client.call(other_bundle, domain="exec-a"))
    assert w["pid"] not in (a["pid"], b["pid"])
    assert w["domains"] == ["exec-a"] and w["bundle"] == other_bundle.digest_hex and w["tee"] == "sev-snp"


def test_exception_detail_is_sealed_and_output_dropped(env: Env) -> None:
    marker = "MARKER-EXC-7d1f"
    with pytest.raises(SealedTaskError) as info:
        env.client.call(from_callable(conf_funcs.leak), domain="exec-a", inputs=[env.seal(marker.encode())],
                        args=[["s", 0]])  # fmt: skip
    err = info.value
    assert (
        marker not in str(err)
        and marker not in repr(err)
        and marker.encode() not in json.dumps(err.args).encode()
    )
    assert marker in env.open(err.sealed_detail)["error"]  # the owner can open it
    log = (Path(env.executor.socket).parent / "executor.log").read_bytes()
    assert marker.encode() not in log


def test_crash_and_timeout_are_survived(env: Env) -> None:
    with pytest.raises(SealedTaskError, match="died"):
        env.client.call(from_callable(conf_funcs.crash), domain="exec-a")
    with pytest.raises(SealedTaskError, match="time limit"):
        env.client.call(from_callable(conf_funcs.sleep), domain="exec-a", args=[["j", 30]], timeout_s=0.5)
    assert (
        env.open(env.client.call(from_callable(conf_funcs.sleep), domain="exec-a", args=[["j", 0]]))
        == "slept"
    )


def test_params_size_limit(env: Env) -> None:
    with pytest.raises(ValueError, match="64 KiB"):
        env.client.call(TOTAL, domain="exec-a", args=[["j", "x" * (70 << 10)]])


def test_a6_a7_device_answers_only_the_executor(env: Env) -> None:
    binding = Binding(nonce=os.urandom(32), executor_public_key=os.urandom(32),
                      hpke_suite="X25519-HKDF-SHA256-AES-256-GCM", cluster_id="dev", bundle_digest=bytes(32))  # fmt: skip
    with pytest.raises(AttestationError, match="refused"):
        request_evidence(env.executor.device_socket, binding)  # same user, other process
    assert oct(os.stat(env.executor.device_socket).st_mode & 0o777) == "0o600"
    code = ("from enclave_actors.device import request_evidence\n"
            "from ray_confidential.attestation.binding import Binding\nimport os\n"
            f"request_evidence({env.executor.device_socket!r}, Binding(nonce=bytes(32), executor_public_key=bytes(32), "
            "hpke_suite='X25519-HKDF-SHA256-AES-256-GCM', cluster_id='dev', bundle_digest=bytes(32)))")  # fmt: skip
    out = subprocess.run([*NOBODY, sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0 and "AttestationError" in out.stderr


def test_a6_executor_memory_is_not_readable(tmp_path: Path) -> None:
    """/proc/PID/mem of the executor and its workers: refused to a process of the same user with the
    same capabilities (none of CAP_SYS_PTRACE / CAP_DAC_OVERRIDE), while the same attacker reads an
    ordinary (dumpable) process started the same way: only non-dumpability protects the executor."""
    service = make_service(tmp_path / "state")
    ex = launch(tmp_path / "state", wrapper=tuple(DROP_PRIVS))
    code = "import time; m=b'CONTROL-MARK'*2; time.sleep(30)"
    control = subprocess.Popen([*DROP_PRIVS, sys.executable, "-c", code])
    try:
        client = ExecutorClient(ex.socket)
        env = Env(service, tmp_path / "state", ex, client)
        worker_pid = env.open(client.call(from_callable(conf_funcs.pid_and_keys), domain="exec-a"))["pid"]
        time.sleep(0.3)
        ctl = _attack(DROP_PRIVS, control.pid, "CONTROL-MARK" * 2)
        assert ctl["opened"] and ctl["found"], "the attacker must be able to read a dumpable process"
        for prefix in (DROP_PRIVS, NOBODY):
            for pid in (ex.pid, worker_pid):
                res = _attack(prefix, pid, "anything")
                assert not res["opened"], (prefix, pid, res)
    finally:
        control.kill()
        stop(ex)


def _attack(prefix: list[str], pid: int, marker: str) -> dict:
    out = subprocess.run([*prefix, sys.executable, "-m", "tests.executor.attacker", str(pid), marker],
                         capture_output=True, text=True, cwd=REPO, check=True)  # fmt: skip
    return dict(json.loads(out.stdout))


def test_revocation_drops_keys_and_workers(tmp_path: Path) -> None:
    service = make_service(tmp_path / "state")
    ex = launch(tmp_path / "state")
    try:
        client = ExecutorClient(ex.socket)
        pk = from_callable(conf_funcs.pid_and_keys)
        first = Env(service, tmp_path / "state", ex, client).open(client.call(pk, domain="exec-a"))
        bump_revocation_epoch(tmp_path / "state")
        deadline = time.monotonic() + 5
        while client.request({"op": "stats"}).header["workers"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.request({"op": "stats"}).header["workers"] == {}
        time.sleep(0.2)
        assert "revocation epoch" in (Path(ex.socket).parent / "executor.log").read_text()
        with pytest.raises(ProcessLookupError):
            os.kill(first["pid"], 0)
        # (Unavailable broker) the dev broker's state cannot be read: fail closed after the bounded wait.
        epoch = tmp_path / "state" / UnsafeLocalKeyReleaser.REVOCATION_FILE
        epoch.unlink()
        epoch.mkdir()
        time.sleep(2.0)
        with pytest.raises(KeyReleaseDenied, match="unreachable"):
            client.call(pk, domain="exec-a")
        shutil.rmtree(epoch)
        time.sleep(0.8)
        assert "pid" in Env(service, tmp_path / "state", ex, client).open(client.call(pk, domain="exec-a"))
    finally:
        stop(ex)


def test_untrusted_device_gets_no_token(tmp_path: Path) -> None:
    """A7: a node whose 'TEE' signs under a root the broker does not trust gets nothing."""
    service = make_service(tmp_path / "state")
    ex = launch(tmp_path / "state", trusted=False)
    try:
        client = ExecutorClient(ex.socket)
        env = Env(service, tmp_path / "state", ex, client)
        with pytest.raises(KeyReleaseDenied, match="attestation failed"):
            client.call(TOTAL, domain="exec-a", inputs=[env.seal(np.arange(2.0))], args=[["s", 0]])
        assert '"attest_denied"' in env.audit()
    finally:
        stop(ex)


def test_executor_is_hardened(env: Env) -> None:
    status = Path(f"/proc/{env.executor.pid}/status").read_text()
    limits = Path(f"/proc/{env.executor.pid}/limits").read_text()
    assert "Max core file size        0" in limits
    # Non-dumpable processes' /proc files are owned by root:root; the kernel reports it in /proc/PID/stat too.
    assert os.stat(f"/proc/{env.executor.pid}/mem").st_uid == 0
    assert status


def test_protocol_limits() -> None:
    import socket

    a, b = socket.socketpair()
    a.sendall(bytes([9]) + bytes(6))
    with pytest.raises(protocol.ProtocolError):
        protocol.recv(b)
    a.close()
    b.close()
