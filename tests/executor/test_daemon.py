"""The executor daemon without Ray: calls, approvals (A2, A3), isolation, errors, limits, lifecycle,
and the local attacks of A6/A7 (attestation device, forged requests, /proc/PID/mem)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclave_actors import protocol
from enclave_actors.device import request_evidence
from enclave_actors.shim import ExecutorClient
from ray_confidential.attestation.binding import Binding
from ray_confidential.bundle import Bundle, from_callable
from ray_confidential.domains import DomainPolicy
from ray_confidential.errors import AttestationError, DecryptionError, KeyReleaseDenied, SealedTaskError
from ray_confidential.kbs.embedded import EmbeddedBroker
from tests.executor import conf_funcs
from tests.executor.conftest import Env, executor_start, launch, make_service, stop
from tests.ray_helpers import wait_for

TOTAL = from_callable(conf_funcs.total)
DROP_PRIVS = ["setpriv", "--bounding-set=-sys_ptrace,-dac_override,-dac_read_search", "--inh-caps=-all"]
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all"]
# Stdlib-only attacker scripts run on the base interpreter: a virtualenv inside a directory only root
# can read (as a fresh CI clone may be) is not executable by ``nobody``.
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)


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


def test_large_input_is_named_by_header_once_the_executor_authenticated_it(env: Env) -> None:
    """A large input goes as a sealed memfd once; later calls, from any shim, name it by its sealed
    header and the executor reuses the memfd it kept, but only after a call authenticated it: a
    forged body under a genuine header is never kept, and naming an unknown header costs a retry."""
    big = env.seal(np.ones(1 << 19) * 3)
    forged = bytearray(big)
    forged[-100] ^= 1  # same header, tampered last chunk
    first, second = ExecutorClient(env.executor.socket), ExecutorClient(env.executor.socket)
    try:
        known = _stats(env)["stats"]["inputs_known"]
        with pytest.raises(SealedTaskError):
            first.call(TOTAL, domain="exec-a", inputs=[bytes(forged)], args=[["s", 0]])
        assert env.open(first.call(TOTAL, domain="exec-a", inputs=[big], args=[["s", 0]])) == {
            "sum": 3.0 * (1 << 19)
        }
        assert _stats(env)["stats"]["inputs_known"] == known  # the forged body was not kept
        out = second.call(TOTAL, domain="exec-a", inputs=[big], args=[["s", 0]])
        assert env.open(out) == {"sum": 3.0 * (1 << 19)}
        assert _stats(env)["stats"]["inputs_known"] == known + 1
        header = {"op": "call", "bundle_digest": TOTAL.digest_hex, "domain": "exec-a",
                  "inputs": [{"src": "known", "index": 0, "length": len(big) + 1}], "params": {"args": [["s", 0]]}}  # fmt: skip
        assert second.request(header, [big[:200]]).header["status"] in ("need_inputs", "bad_request")
    finally:
        first.close()
        second.close()


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


def test_a_seal_arguments_domain_refuses_plain_parameters(env: Env) -> None:
    """The owner's policy says every argument is sealed: a shim that sends a plain JSON parameter
    anyway (Ray would have carried it in the clear) is refused; sealed arguments run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env.service.create_domain("sealed-args", DomainPolicy(dev=True, seal_arguments=True))
    x, scale = env.seal(np.arange(4.0), "sealed-args"), env.seal(2.0, "sealed-args")
    out = env.client.call(TOTAL, domain="sealed-args", inputs=[x, scale], args=[["s", 0], ["s", 1]])
    assert env.open(out) == {"sum": 12.0}
    for args, kwargs in (
        ([["s", 0], ["j", 2.0]], None),
        ([["s", 0]], {"scale": ["j", 2.0]}),
        ([["s", 0], 7], None),
    ):
        with pytest.raises(KeyReleaseDenied, match=r"requires sealed arguments"):
            env.client.call(TOTAL, domain="sealed-args", inputs=[x], args=args, kwargs=kwargs)
    # An input of the strict domain brings its rule into a call whose output domain is another.
    with pytest.raises(KeyReleaseDenied, match=r"\['sealed-args'\] requires sealed"):
        env.client.call(TOTAL, domain="exec-a", inputs=[x], args=[["s", 0], ["j", 2.0]])


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
    with pytest.raises(KeyReleaseDenied, match="refused a token"):
        fresh.call(evil, domain="approved", inputs=[sealed2], args=[["s", 0]])
    audit = env.audit()
    assert any(r["event"] == "attest" and r["decision"] == "deny"
               and f"bundle {evil.digest_hex} is not approved by domain 'approved'" in r["reason"] for r in audit)  # fmt: skip
    from ray_confidential.sealed.format import SealedHeader

    oid = SealedHeader.parse(sealed2).object_id.hex()
    assert not any(r.get("object_id") == oid for r in audit), "a key was released for the denied call"
    genuine_oid = SealedHeader.parse(sealed).object_id.hex()
    assert any(r["event"] == "unwrap" and r["decision"] == "grant" and r["object_id"] == genuine_oid
               for r in audit), "the genuine call's key must come from the broker"  # fmt: skip


def test_a3_unapproved_bundle_and_foreign_domain(env: Env) -> None:
    sealed = env.seal(np.arange(3.0), "strict")
    with pytest.raises(KeyReleaseDenied, match="refused a token"):
        env.client.call(TOTAL, domain="exec-a", inputs=[sealed], args=[["s", 0]])
    with pytest.raises(KeyReleaseDenied, match="refused a token"):
        env.client.call(TOTAL, domain="strict", inputs=[], args=[["j", [1]]])
    reasons = [r["reason"] for r in env.audit() if r["event"] == "attest" and r["decision"] == "deny"]
    assert any(f"bundle {TOTAL.digest_hex} is not approved by domain 'strict'" in r for r in reasons)
    # Another owner's domain (held by a different key service): the broker knows nothing of it.
    other = make_service(env.state_dir.parent / "other-owner")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = other.create_domain("other-owner-domain")
    from ray_confidential.sealed.format import DomainPublicKey, seal

    foreign = bytes(
        seal(np.arange(2.0), DomainPublicKey(domain="other-owner-domain", version=1, public_key=d.public_key))
    )
    with pytest.raises(KeyReleaseDenied, match="unknown domain 'other-owner-domain'"):
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


def test_results_go_to_a_recipient_the_broker_signed_into_the_descriptor(env: Env) -> None:
    """The executor sees no policy from the broker, only signed descriptors: a recipient listed
    there receives the result (sealed to its key, version 0), and the domain owner cannot open it."""
    from ray_confidential.crypto import hpke
    from ray_confidential.sealed import open_as_recipient

    partner, stranger = hpke.generate_private_key("x25519"), hpke.generate_private_key("x25519")
    listed = f"x25519:{partner.public_key().raw.hex()}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env.service.create_domain("shared", DomainPolicy(dev=True, recipients=(listed,)))
    x = env.seal(np.arange(5.0), "shared")
    out = env.client.call(TOTAL, domain="shared", inputs=[x], args=[["s", 0]], recipient=listed)
    assert open_as_recipient(out, partner) == {"sum": 10.0}
    with pytest.raises(DecryptionError):
        open_as_recipient(out, stranger)
    with pytest.raises((DecryptionError, KeyReleaseDenied)):
        env.open(out)  # the domain owner holds no key version 0
    unlisted = f"x25519:{stranger.public_key().raw.hex()}"
    with pytest.raises(KeyReleaseDenied, match="recipient is not listed"):
        env.client.call(TOTAL, domain="shared", inputs=[x], args=[["s", 0]], recipient=unlisted)


def test_domains_never_share_a_worker_and_later_calls_see_no_keys(env: Env) -> None:
    pk = from_callable(conf_funcs.pid_and_keys)
    a = env.open(env.client.call(pk, domain="exec-a"))
    b = env.open(env.client.call(pk, domain="exec-b"))
    a2 = env.open(env.client.call(pk, domain="exec-a"))
    assert a["pid"] != b["pid"] and a["pid"] == a2["pid"]
    assert a["key_handles"] == b["key_handles"] == a2["key_handles"] == 0
    # All a worker keeps between calls: one unused HPKE encapsulation to the domain's public key, for
    # its next result (crypto/encap.py). Every used one is gone: nothing of an earlier result's key.
    assert a2["encapsulations"] == ["ready"] and b["encapsulations"] in ([], ["ready"])
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


def _rendezvous(env: Env, socket_path: str, folder: Path, n: int, wait_s: float) -> list[dict[str, Any]]:
    """``n`` concurrent calls of ``conf_funcs.rendezvous``, each on its own connection (as Ray's shims)."""
    bundle = from_callable(conf_funcs.rendezvous)
    replies: list[Any] = [None] * n

    def one(i: int) -> None:
        client = ExecutorClient(socket_path)
        try:
            replies[i] = client.call(
                bundle, domain="exec-a", args=[["j", str(folder)], ["j", n], ["j", wait_s]]
            )
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return [env.open(r) for r in replies]


@pytest.mark.parametrize("per_bundle", [2, 1])
def test_calls_of_one_function_run_in_parallel_up_to_workers_per_bundle(
    env: Env, tmp_path: Path, per_bundle: int
) -> None:
    """Concurrent calls of one (domains, bundle) pair run at once, each in its own worker subprocess
    of that pair, up to --workers-per-bundle; beyond it they wait their turn in a free one."""
    ex = launch(env.broker, extra=("--workers-per-bundle", str(per_bundle)))
    try:
        folder = tmp_path / "arrivals"
        folder.mkdir()
        if per_bundle == 2:
            out = _rendezvous(env, ex.socket, folder, 2, wait_s=30.0)  # returns as soon as both arrived
            assert [r["seen"] for r in out] == [2, 2] and out[0]["pid"] != out[1]["pid"]
        else:
            out = _rendezvous(env, ex.socket, folder, 2, wait_s=1.0)  # the first waits for nobody
            assert sorted(r["seen"] for r in out) == [1, 2] and out[0]["pid"] == out[1]["pid"]
        stats = ExecutorClient(ex.socket).request({"op": "stats"}).header
        assert len(stats["workers"]) == per_bundle and stats["stats"]["workers_started"] == per_bundle
    finally:
        stop(ex)


def test_params_size_limit(env: Env) -> None:
    with pytest.raises(ValueError, match="64 KiB"):
        env.client.call(TOTAL, domain="exec-a", args=[["j", "x" * (70 << 10)]])


def test_a6_a7_device_answers_only_the_executor(env: Env) -> None:
    binding = Binding(nonce=os.urandom(32), executor_public_key=os.urandom(32),
                      hpke_suite="x25519", cluster_id="dev", bundle_digest=bytes(32))  # fmt: skip
    with pytest.raises(AttestationError, match="refused"):
        request_evidence(env.executor.device_socket, binding)  # same user, other process
    assert oct(os.stat(env.executor.device_socket).st_mode & 0o777) == "0o600"
    # Another user (the Ray user is not the executor's) cannot even connect to the device socket.
    # Stdlib only, from a world-readable directory: the checkout may sit in a directory only root reads.
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('refused')\n"
        "else:\n    print('connected')\n"
    )
    out = subprocess.run([*NOBODY, BASE_PYTHON, "-c", code, env.executor.device_socket],
                         capture_output=True, text=True, cwd="/")  # fmt: skip
    assert out.stdout.strip() == "refused", out.stdout + out.stderr


def test_a6_executor_memory_is_not_readable(env: Env) -> None:
    """/proc/PID/mem of the executor and its workers: refused to a process of the same user with the
    same capabilities (none of CAP_SYS_PTRACE / CAP_DAC_OVERRIDE), while the same attacker reads an
    ordinary (dumpable) process started the same way: only non-dumpability protects the executor."""
    ex = launch(env.broker, wrapper=tuple(DROP_PRIVS))
    code = "import time; m=b'CONTROL-MARK'*2; time.sleep(30)"
    control = subprocess.Popen([*DROP_PRIVS, sys.executable, "-c", code])
    try:
        client = ExecutorClient(ex.socket)
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
    # The attacker script is stdlib only; run it from a world-readable copy, since the checkout may
    # sit in a directory that another user (``nobody``) cannot read.
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        script = Path(tmp) / "attacker.py"
        shutil.copyfile(Path(__file__).with_name("attacker.py"), script)
        os.chmod(script, 0o644)
        out = subprocess.run([*prefix, BASE_PYTHON, str(script), str(pid), marker],
                             capture_output=True, text=True, cwd="/", check=True)  # fmt: skip
    return dict(json.loads(out.stdout))


def _wait_no_workers(client: ExecutorClient, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while client.request({"op": "stats"}).header["workers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.request({"op": "stats"}).header["workers"] == {}


def test_revocation_and_unreachable_broker(tmp_path: Path) -> None:
    """A revocation at the broker drops the executor's keys and workers within the poll interval; an
    unreachable broker makes it fail closed after the bounded wait; a revoked node gets nothing more."""
    service = make_service(tmp_path / "state")
    broker = EmbeddedBroker.start(tmp_path / "state")
    ex = launch(broker)
    try:
        client = ExecutorClient(ex.socket)
        env = Env(service, tmp_path / "state", ex, client, broker)
        pk = from_callable(conf_funcs.pid_and_keys)
        first = env.open(client.call(pk, domain="exec-a"))
        broker.revoke("bundle", "ff" * 32)  # someone else's bundle: the epoch moves, this node stays good
        _wait_no_workers(client)
        time.sleep(0.2)
        assert "revocation epoch" in Path(ex.log).read_text()
        with pytest.raises(ProcessLookupError):
            os.kill(first["pid"], 0)
        # Unreachable broker: fail closed after the bounded wait (1 s here), recover when it answers.
        broker.pause()
        time.sleep(1.8)
        with pytest.raises(KeyReleaseDenied, match="unreachable"):
            client.call(pk, domain="exec-a")
        broker.resume()
        time.sleep(0.8)
        assert "pid" in env.open(client.call(pk, domain="exec-a"))
        # Revoking the node: workers stop, the next call gets no token (audited at the broker).
        broker.revoke("node", ex.node_id)
        _wait_no_workers(client)
        with pytest.raises(KeyReleaseDenied, match="refused a token"):
            client.call(pk, domain="exec-a")
        assert any(r["event"] == "attest" and r["decision"] == "deny" and "revoked node" in r["reason"]
                   and r["node_id"] == ex.node_id for r in broker.audit_records())  # fmt: skip
    finally:
        stop(ex)
        broker.stop()


def _in_background(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["value"] = fn()
        except Exception as exc:
            done["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def test_a_key_drop_mid_call_resends_a_task_and_ends_an_actor(tmp_path: Path) -> None:
    """A revocation stops calls in flight with the keys (docs/executor.md "Lifecycle"). A stopped task
    is sent once more and completes while the broker still admits the node; an actor's call fails and
    its state is gone; when the revocation covers the node, the resent task gets no token."""
    service = make_service(tmp_path / "state")
    broker = EmbeddedBroker.start(tmp_path / "state")
    ex = launch(broker)
    try:
        client, watcher = ExecutorClient(ex.socket), ExecutorClient(ex.socket)
        env = Env(service, tmp_path / "state", ex, client, broker)
        bundle = from_callable(conf_funcs.rendezvous)
        arrivals = tmp_path / "arrivals"
        arrivals.mkdir()
        # The first run marks its arrival and waits for a second; only the resent run can be that one.
        thread, done = _in_background(lambda: env.open(client.call(
            bundle, domain="exec-a", args=[["j", str(arrivals)], ["j", 2], ["j", 30.0]])))  # fmt: skip
        wait_for(lambda: os.listdir(arrivals), "the call never started", timeout=20)
        first = next(iter(watcher.request({"op": "stats"}).header["workers"].values()))
        broker.revoke("bundle", "ff" * 32)  # someone else's bundle: the epoch moves, this node stays good
        thread.join(30)
        assert "error" not in done, done
        assert done["value"]["seen"] == 2 and done["value"]["pid"] != first
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)
        assert "revocation epoch" in Path(ex.log).read_text()

        # An actor's call in flight: it fails, and says its state is lost.
        owner = ExecutorClient(ex.socket)
        state = owner.actor_create(from_callable(conf_funcs.Accumulator), domain="exec-a", args=[["j", 5]])
        held = tmp_path / "held"
        held.mkdir()
        thread, done = _in_background(lambda: owner.actor_call(
            state["actor_id"], "hold", args=[["j", str(held)], ["j", 30.0]]))  # fmt: skip
        wait_for(lambda: os.listdir(held), "the actor's call never started", timeout=20)
        broker.revoke("bundle", "ee" * 32)
        thread.join(30)
        assert isinstance(done.get("error"), SealedTaskError), done
        assert "dropped its keys" in str(done["error"]) and "state is lost" in str(done["error"])
        with pytest.raises(SealedTaskError, match="enclave actor is gone"):
            owner.actor_call(state["actor_id"], "hold", args=[["j", str(held)], ["j", 0]])

        # The revocation covers this node: the task stopped in flight is resent and gets no token.
        shutil.rmtree(arrivals)
        arrivals.mkdir()
        thread, done = _in_background(lambda: client.call(
            bundle, domain="exec-a", args=[["j", str(arrivals)], ["j", 2], ["j", 30.0]]))  # fmt: skip
        wait_for(lambda: os.listdir(arrivals), "the call never started", timeout=20)
        broker.revoke("node", ex.node_id)
        thread.join(30)
        assert isinstance(done.get("error"), KeyReleaseDenied) and "refused a token" in str(done["error"]), (
            done
        )
        assert len(os.listdir(arrivals)) == 1  # the resent call never ran
    finally:
        stop(ex)
        broker.stop()


def test_untrusted_device_gets_no_token(env: Env) -> None:
    """A7: a node whose 'TEE' signs under a root the broker does not trust gets nothing."""
    ex = launch(env.broker, trusted=False)
    try:
        client = ExecutorClient(ex.socket)
        with pytest.raises(KeyReleaseDenied, match="refused a token"):
            client.call(TOTAL, domain="exec-a", inputs=[env.seal(np.arange(2.0))], args=[["s", 0]])
        denials = [r for r in env.audit() if r["event"] == "attest" and r.get("node_id") == ex.node_id]
        assert denials and all(r["decision"] == "deny" for r in denials)
        assert not any(r["event"] == "unwrap" and r.get("node_id") == ex.node_id for r in env.audit())
    finally:
        stop(ex)


def test_launch_data_must_be_private(env: Env, tmp_path: Path) -> None:
    """Launch data pins the broker: an executor refuses a file other users could read or replace."""
    loose = tmp_path / "launch.json"
    loose.write_bytes(env.broker.launch_path.read_bytes())
    loose.chmod(0o644)
    out = executor_start(tmp_path, "--tee", "sev-snp", "--node-id", "ab", "--launch-data", str(loose))
    assert out.returncode == 2 and "0600" in out.stderr
    assert oct(env.broker.launch_path.stat().st_mode & 0o777) == "0o600"


def test_executor_is_hardened(env: Env) -> None:
    status = Path(f"/proc/{env.executor.pid}/status").read_text()
    limits = Path(f"/proc/{env.executor.pid}/limits").read_text()
    assert "Max core file size        0" in limits
    # Non-dumpable processes' /proc files are owned by root:root; the kernel reports it in /proc/PID/stat too.
    assert os.stat(f"/proc/{env.executor.pid}/mem").st_uid == 0
    assert status


def test_protocol_round_trip_of_many_and_large_frames() -> None:
    """One message per ``send``, even when the kernel takes it in several pieces."""
    import socket
    import threading

    a, b = socket.socketpair()
    frames = [os.urandom(n) for n in (0, 1, 100, 70_000, 3 << 20, 5)] + [b"x"] * 600
    got: list[protocol.Message] = []
    reader = threading.Thread(target=lambda: got.append(protocol.recv(b)))
    reader.start()
    protocol.send(a, {"op": "ping", "n": 1}, frames)
    reader.join(10)
    assert got[0].header == {"op": "ping", "n": 1} and got[0].frames == frames
    a.close()
    b.close()


def test_sealed_map_cache_keeps_the_last_calls_mappings_only() -> None:
    cache = protocol.SealedMapCache()
    fd = protocol.sealed_memfd(b"sealed bytes")
    dup = os.dup(fd)  # what SCM_RIGHTS delivers the second time: the same memfd
    other = protocol.sealed_memfd(b"sealed bytes")
    try:
        first = cache.map(fd)
        cache.end_call()
        assert cache.map(dup) is first and bytes(first) == b"sealed bytes"
        assert cache.map(other) is not first
        cache.end_call()
        cache.map(other)
        cache.end_call()  # a call without the first memfd: its mapping is dropped
        assert cache.map(dup) is not first
        unsealed = os.memfd_create("x", os.MFD_ALLOW_SEALING)
        os.write(unsealed, b"sealed bytes")
        with pytest.raises(protocol.ProtocolError):
            cache.map(unsealed)
        os.close(unsealed)
    finally:
        for d in (fd, dup, other):
            os.close(d)


def test_shim_options_are_reused_only_for_equal_options() -> None:
    from enclave_actors.remote import _freeze, _shim_with

    a = {"label_selector": {"ray.io/node-id": "in(a,b)"}, "max_retries": 0}
    assert _shim_with(a) is _shim_with({"label_selector": {"ray.io/node-id": "in(a,b)"}, "max_retries": 0})
    assert _shim_with(a) is not _shim_with({**a, "max_retries": 1})
    assert _freeze({"k": [1]}) != _freeze({"k": (1,)}) != _freeze({"k": {1: None}})


def test_protocol_limits() -> None:
    import socket

    a, b = socket.socketpair()
    a.sendall(bytes([9]) + bytes(6))
    with pytest.raises(protocol.ProtocolError):
        protocol.recv(b)
    a.close()
    b.close()
    import struct

    def raw(header: bytes, frame_sizes: list[int], tail: bytes = b"") -> bytes:
        return (
            struct.pack(">BIH", 1, len(header), len(frame_sizes))
            + header
            + struct.pack(">Q", frame_sizes[0])
            + tail
        )

    for message, error in (
        (raw(b"{}", [protocol.MAX_FRAME + 1]), protocol.ProtocolError),  # refused before reading it
        (raw(b"[1]", [1], b"x"), protocol.ProtocolError),  # not a JSON object
        (raw(b"{", [1], b"x"), protocol.ProtocolError),  # not JSON
        (raw(b"{}", [4, 1], b"abcd"), ConnectionError),  # the second frame's length never comes
    ):
        a, b = socket.socketpair()
        a.sendall(message)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(error):
            protocol.recv(b)
        a.close()
        b.close()


def test_actor_lives_with_its_connection_and_keeps_to_its_domains(env: Env) -> None:
    bundle = from_callable(conf_funcs.Accumulator)
    owner = ExecutorClient(env.executor.socket)  # the shim actor's dedicated connection
    state = owner.actor_create(bundle, domain="exec-a", inputs=[env.seal(np.array([1.0]))], args=[["s", 0]])
    assert state["tee"] == "sev-snp" and state["attested_until"] > time.time()
    out, _ = owner.actor_call(state["actor_id"], "add", inputs=[env.seal(np.arange(3.0))], args=[["s", 0]])
    assert env.open(out) == 4.0
    pid = env.open(owner.actor_call(state["actor_id"], "where")[0])["pid"]
    # Another connection cannot drive it; an input of another domain never enters its process.
    other = ExecutorClient(env.executor.socket)
    with pytest.raises(ValueError, match="no such actor"):
        other.actor_call(state["actor_id"], "add", args=[["j", [1]]])
    with pytest.raises(KeyReleaseDenied, match="domains never share a process"):
        owner.actor_call(
            state["actor_id"], "add", inputs=[env.seal(np.arange(2.0), "exec-b")], args=[["s", 0]]
        )
    with pytest.raises(ValueError, match="public method"):
        owner.actor_call(state["actor_id"], "__init__", args=[["j", 0]])
    with pytest.raises(SealedTaskError):  # a function bundle is not a class
        owner.actor_create(TOTAL, domain="exec-a", args=[["j", [1]]])
    owner.close()  # the Ray actor died: its subprocess ends
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_socket_group_admits_the_ray_user(env: Env, tmp_path: Path) -> None:
    """--socket-group: an executor running as another user than Ray gives its socket Ray's group."""
    import grp

    target = next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    ex = launch(env.broker, extra=("--socket-group", target.gr_name))
    try:
        st = os.stat(ex.socket)
        assert st.st_gid == target.gr_gid and st.st_mode & 0o777 == 0o660
    finally:
        stop(ex)
    bad = executor_start(
        tmp_path, "--tee", "sev-snp", "--node-id", "ab" * 28, "--socket-group", "no-such-group-rc"
    )
    assert bad.returncode == 2 and "no group 'no-such-group-rc'" in bad.stderr
