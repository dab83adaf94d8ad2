"""Confidential calls and enclave actors through Ray, keys from the embedded broker over gRPC.

One small Cluster for the module: a head (ordinary node, small object store that spills), a trusted
sev-snp node added before ``rc.init`` and a node that claims tdx but cannot attest, added after it
(both orders share the embedded broker of this process). The node revocation test runs last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

import ray_confidential as rc
from ray_confidential.errors import KeyReleaseDenied, SealedTaskError
from ray_confidential.kbs import embedded
from ray_confidential.testing import add_tee_node, scan
from ray_confidential.testing.scan import files_containing, plasma_contains
from ray_confidential.testing.tee_node import EXECUTORS, stop_executors
from tests.executor import conf_funcs
from tests.executor.attacker import read_memory
from tests.ray_helpers import process_alive, registered_node_ids, spill_config, wait_for

REPO = Path(__file__).resolve().parents[2]
DROP_PRIVS = ["setpriv", "--bounding-set=-sys_ptrace,-dac_override,-dac_read_search", "--inh-caps=-all"]


def _snp(fn: Any) -> Any:
    """Route to the trusted sev-snp node (the default selector also admits the lying tdx node)."""
    return fn.options(tee="sev-snp")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    spill = tmp_path_factory.mktemp("spill")
    c = Cluster(initialize_head=True, head_node_args={**spill_config(spill), "num_cpus": 1})
    tee = add_tee_node(c, tee="sev-snp", num_cpus=2, object_store_memory=80 << 20,
                       executor_args=("--poll-interval", "0.5"))  # fmt: skip
    rc.init(address=c.address, dev=True, placement_wait_s=2)  # after one node joined ...
    liar = add_tee_node(
        c, tee="tdx", trusted=False, num_cpus=1, object_store_memory=80 << 20
    )  # ... one after
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc.create_domain("exec-a")  # created after the broker started: it serves it at once
    broker = embedded.current()
    assert broker is not None and EXECUTORS[tee.node_id].broker is broker is EXECUTORS[liar.node_id].broker
    try:
        yield {"cluster": c, "tee": tee, "liar": liar, "executor": EXECUTORS[tee.node_id], "broker": broker,
               "spill": spill}  # fmt: skip
    finally:
        rc.shutdown()
        ray.shutdown()
        stop_executors()
        c.shutdown()
    assert embedded.current() is None, "the embedded broker outlived its last user"


def test_confidential_call_and_context(cluster: dict[str, Any]) -> None:
    arg = rc.put(np.arange(6.0), domain="exec-a")
    ref = _snp(conf_funcs.total).remote(arg, 2)
    assert isinstance(ref, rc.SealedRef)
    assert rc.get(ref) == {"sum": 30.0}
    # The data key came from the broker over gRPC: a grant record names this object and node.
    grants = [
        r for r in cluster["broker"].audit_records() if r["event"] == "unwrap" and r["decision"] == "grant"
    ]
    assert any(r["object_id"] == arg.object_id and r["node_id"] == cluster["tee"].node_id for r in grants)
    where = rc.get(_snp(conf_funcs.where).remote())
    assert where["node_id"] == cluster["tee"].node_id and where["tee"] == "sev-snp"
    assert where["bundle"] == conf_funcs.where.bundle.digest_hex and where["domains"] == ["exec-a"]
    with pytest.raises(RuntimeError, match="only available inside a confidential call"):
        rc.context()


def test_arrow_input(cluster: dict[str, Any]) -> None:
    import pyarrow as pa

    table = pa.table({"x": np.arange(300_000)})  # ~2.4 MiB: moves as a sealed memfd
    assert rc.get(_snp(conf_funcs.echo_len).remote(rc.put(table, domain="exec-a"))) == 300_000


def test_seal_arguments_policy_seals_plain_arguments_before_ray_sees_them(cluster: dict[str, Any]) -> None:
    from enclave_actors.remote import encode_call, seal_arguments_for
    from ray_confidential.domains import DomainPolicy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc.create_domain("exec-sealed", policy=DomainPolicy(dev=True, seal_arguments=True))
    marker = 1234.5678
    args, kwargs = seal_arguments_for("exec-sealed", (np.arange(3.0),), {"scale": marker})
    spec, refs = encode_call(args, kwargs)
    assert spec["args"] == [["s", 0]] and spec["kwargs"] == [["s", 1]] and len(refs) == 2
    assert str(marker) not in json.dumps(spec)  # what Ray carries: references only
    total = _snp(conf_funcs.total).options(domain="exec-sealed")
    assert rc.get(total.remote(np.arange(3.0), scale=2.0)) == {"sum": 6.0}  # a NumPy array, directly
    acc = conf_funcs.Accumulator.options(tee="sev-snp", domain="exec-sealed").remote(1)
    assert rc.get(acc.add.remote([1, 2])) == 4.0
    assert seal_arguments_for("exec-a", (1,), {}) == ((1,), {})  # other domains: unchanged


def test_a7_node_claiming_tee_labels_gets_no_key(cluster: dict[str, Any]) -> None:
    from enclave_actors.remote import _shim_task, encode_call
    from ray_confidential.errors import NoAttestedNodeError

    arg = rc.put(np.arange(3.0), domain="exec-a")
    # Placement never selects it: it holds no routing token, so it is not in the trust registry.
    started = time.monotonic()
    with pytest.raises(
        NoAttestedNodeError, match=r"tee=tdx.*labelled as TEEs but holding no routing token: 1 x tdx"
    ):
        conf_funcs.total.options(tee="tdx").remote(arg)
    assert time.monotonic() - started < 10
    # Forced onto it by hand (a raw shim task with a node-id selector): the broker refuses the key.
    liar = cluster["liar"].node_id
    spec, refs = encode_call((arg,), {})
    spec.update(domain="exec-a", timeout_s=None, recipient=None)
    forced = ray.remote(_shim_task).options(label_selector={"ray.io/node-id": liar}, max_retries=0)
    with pytest.raises(KeyReleaseDenied, match="refused a token"):
        ray.get(forced.remote(spec, conf_funcs.total.bundle, *refs))
    records = cluster["broker"].audit_records()
    denied = [r for r in records if r["event"] == "attest" and r.get("node_id") == liar]
    assert denied and all(r["decision"] == "deny" for r in denied), "the liar's attempt must be audited"
    assert not any(r.get("object_id") == arg.object_id and r.get("decision") == "grant" for r in records)


def _ray_worker_pids() -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"default_worker.py" in cmd:
            pids.append(int(pid))
    return pids


@ray.remote(max_retries=0)
def _plain_leak(text: str) -> None:
    print("PRINTED", text)
    raise RuntimeError("raised " + text)


KV_NAMESPACES = (None, "", "fun", "session", "jobs", "job", "dashboard", "cluster", "runtime_env", "actor",
                 "tracing", "export")  # fmt: skip


def _kv_blob() -> bytes:
    """Every key and value of the GCS internal KV in the namespaces Ray uses."""
    from ray.experimental import internal_kv as kv

    parts = []
    for ns in KV_NAMESPACES:
        try:
            keys = kv._internal_kv_list(b"", namespace=ns)
        except Exception:
            continue
        for key in keys:
            parts += [key, kv._internal_kv_get(key, namespace=ns) or b""]
    return b"\0".join(parts)


def _control_fn(text: str) -> Any:
    """A plain task whose pickled closure (in GCS internal KV) carries ``text``."""

    def body() -> str:
        return text

    return ray.remote(body)


def _pids(name: bytes) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if name in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(int(pid))
        except OSError:
            continue
    return out


def test_plaintext_marker_scan(cluster: dict[str, Any], capfd: pytest.CaptureFixture[str]) -> None:
    """A confidential call that prints its plaintext and raises with it leaves the plaintext nowhere
    Ray keeps data; the same scans find a plain control's plaintext (proving they can see)."""
    secret = "SECRETMARK-" + os.urandom(6).hex()
    control = "CONTROLMARK-" + os.urandom(6).hex()
    sealed_arg = rc.put(secret.encode() * 4096, domain="exec-a")  # in plasma (~64 KiB), then spilled
    with pytest.raises(SealedTaskError) as info:
        rc.get(_snp(conf_funcs.leak).remote(sealed_arg))
    err = info.value
    assert secret not in str(err) and secret not in repr(err)
    assert (
        secret in rc.get.__globals__["open_sealed"](err.sealed_detail, rc.api._session.key_service)["error"]
    )
    with pytest.raises(ray.exceptions.RayTaskError) as ctl_info:
        ray.get(_plain_leak.remote(control))
    assert control in str(ctl_info.value)
    assert ray.get(_control_fn(control).remote()) == control
    held = ray.put(control.encode() * 4096)
    # Force spilling: fill the head's 80 MiB object store (the sealed input and the control spill).
    fillers = [ray.put(np.zeros(20 << 20, dtype=np.uint8)) for _ in range(6)]
    spill = cluster["spill"]
    assert scan.files_containing(spill, control.encode()), "the control must be spilled (scan sees it)"
    assert not scan.files_containing(spill, secret.encode())
    del fillers
    time.sleep(1.5)  # let log monitors flush
    session = Path(cluster["cluster"].head_node.get_session_dir_path())
    out = capfd.readouterr()
    assert control in out.out + out.err or files_containing(session / "logs", control.encode())
    assert secret not in out.out + out.err
    assert files_containing(session / "logs", control.encode()), "the scan must see the control's logs"
    assert not files_containing(session / "logs", secret.encode())
    assert not files_containing(Path(cluster["executor"].socket).parent, secret.encode())
    in_plasma = ray.put(control.encode() * 4096)  # the first control copy may have been spilled out
    assert plasma_contains(control.encode()) and not plasma_contains(secret.encode())
    del in_plasma
    # GCS internal KV (function table, job and session data) and job info.
    kv = _kv_blob()
    assert control.encode() in kv, "the KV scan must see the control's pickled closure"
    assert secret.encode() not in kv
    jobs = json.dumps(ray._private.state.state.job_table(), default=repr)
    assert ray.get_runtime_context().get_job_id() in jobs, "the job-info scan must see this job"
    assert secret not in jobs
    # Memory of every Ray worker, the GCS server and the raylets (dumpable, same user).
    found_control = found_secret = False
    for pid in [*_ray_worker_pids(), *_pids(b"gcs_server"), *_pids(b"raylet")]:
        found_control |= bool(read_memory(pid, control.encode())["found"])
        found_secret |= bool(read_memory(pid, secret.encode())["found"])
    assert found_control, "the memory scan must see the control's plaintext in a Ray process"
    assert not found_secret
    del held


@ray.remote(max_retries=0)
def _a6_attacker(executor_pid: int) -> dict[str, Any]:
    """An ordinary Ray task on the TEE node: tries the device, a forged request, and executor memory."""
    import socket as so

    from enclave_actors import protocol
    from enclave_actors.device import request_evidence
    from ray_confidential.attestation.binding import Binding

    path = os.environ["RAY_CONFIDENTIAL_EXECUTOR_SOCKET"]
    result: dict[str, Any] = {}
    liar_key = os.urandom(32)  # A7 relay: a non-TEE process's key, to be bound into genuine evidence
    try:
        request_evidence(path + ".device", Binding(nonce=os.urandom(32), executor_public_key=liar_key,
                         hpke_suite="x25519", cluster_id="dev", bundle_digest=bytes(32)))  # fmt: skip
        result["device"] = "evidence obtained"
    except Exception as exc:
        result["device"] = f"{type(exc).__name__}: {exc}"
    with so.socket(so.AF_UNIX, so.SOCK_STREAM) as s:
        s.connect(path)
        replies = []
        for header in ({"op": "unwrap", "domain": "exec-a"}, {"op": "export_key", "domain": "exec-a"},
                       {"op": "call", "bundle_digest": "00" * 32, "domain": "exec-a", "recipient": "x25519:" + "11" * 32}):  # fmt: skip
            protocol.send(s, header)
            replies.append(protocol.recv(s).header["status"])
        result["forged"] = replies
    out = subprocess.run([*DROP_PRIVS, sys.executable, "-m", "tests.executor.attacker", str(executor_pid), "x"],
                         capture_output=True, text=True, cwd=str(REPO))  # fmt: skip
    result["mem"] = json.loads(out.stdout) if out.stdout else {"opened": False, "error": out.stderr[-200:]}
    return result


def test_a6_ordinary_task_on_tee_node_is_refused(cluster: dict[str, Any]) -> None:
    tee = cluster["tee"]
    res = ray.get(
        _a6_attacker.options(label_selector={"ray.io/node-id": tee.node_id}).remote(cluster["executor"].pid)
    )
    assert res["device"].startswith("AttestationError"), res
    assert res["forged"][0] == res["forged"][1] == "bad_request"
    assert res["forged"][2] in ("need_bundle", "bad_request")
    assert res["mem"]["opened"] is False


def test_enclave_actor_state_lives_in_its_own_subprocess(cluster: dict[str, Any]) -> None:
    client_socket = cluster["executor"].socket
    from enclave_actors.shim import ExecutorClient

    stats = ExecutorClient(client_socket)
    acc = conf_funcs.Accumulator.options(tee="sev-snp").remote(rc.put(np.array([1.0]), domain="exec-a"))
    assert "Accumulator" in repr(acc)
    assert rc.get(acc.add.remote(rc.put(np.arange(4.0), domain="exec-a"))) == 7.0
    assert rc.get(acc.add.remote(rc.put(np.arange(3.0), domain="exec-a"))) == 10.0  # state kept
    where = rc.get(acc.where.remote())
    assert where["node_id"] == cluster["tee"].node_id and where["domains"] == ["exec-a"]
    other = conf_funcs.Accumulator.options(tee="sev-snp").remote(0)
    assert rc.get(other.add.remote([5])) == 5.0  # a JSON parameter
    assert rc.get(other.where.remote())["pid"] != where["pid"], "each actor instance has its own subprocess"
    actors = {
        k: v for k, v in stats.request({"op": "stats"}).header["workers"].items() if k.startswith("actor:")
    }
    assert where["pid"] in actors.values()
    state = ray.get(acc.trust_state())
    assert state["repr"].startswith("Enclave[sev-snp pool=- attested-until=20") and state["tee"] == "sev-snp"
    with pytest.raises(TypeError, match="cannot be instantiated directly"):
        conf_funcs.Accumulator(1)
    with pytest.raises(SealedTaskError):
        rc.get(acc.missing.remote())  # no such method: the sealed detail says so, Ray sees nothing
    with pytest.raises(AttributeError):
        acc._private  # noqa: B018 - private names never route to the enclave
    # The Ray actor dies -> its executor subprocess is gone; the other actor lives on.
    ray.kill(acc.actor)
    wait_for(lambda: not process_alive(where["pid"]), "the killed actor's subprocess still runs", 10)
    assert rc.get(other.add.remote([1])) == 6.0


def test_zz_revoking_the_node_stops_its_actors_and_calls(cluster: dict[str, Any]) -> None:
    """Runs last: revokes the trusted node at the broker."""
    acc = conf_funcs.Accumulator.options(tee="sev-snp").remote(2)
    pid = rc.get(acc.where.remote())["pid"]
    cluster["broker"].revoke("node", cluster["tee"].node_id)
    # The actor's subprocess stops within the executor's poll interval; the driver's placement
    # view drops the node within its staleness period (routing only: keys are refused at once).
    wait_for(lambda: not process_alive(pid), "the revoked node's actor still runs", timeout=10)
    wait_for(lambda: cluster["tee"].node_id not in registered_node_ids(), "revoked node still placed", 10)
    with pytest.raises(SealedTaskError, match="state is lost"):
        rc.get(acc.add.remote([1]))
    from enclave_actors.remote import _shim_task, encode_call
    from ray_confidential.errors import NoAttestedNodeError

    arg = rc.put(np.arange(2.0), domain="exec-a")
    # The broker's signed revoke removed it from the trust registry: placement no longer selects it.
    with pytest.raises(NoAttestedNodeError, match="no attested node qualifies"):
        _snp(conf_funcs.total).remote(arg)
    spec, refs = encode_call((arg,), {})
    spec.update(domain="exec-a", timeout_s=None, recipient=None)
    forced = ray.remote(_shim_task).options(
        label_selector={"ray.io/node-id": cluster["tee"].node_id}, max_retries=0
    )
    with pytest.raises(KeyReleaseDenied, match="refused a token"):  # forced there by hand: no key
        ray.get(forced.remote(spec, conf_funcs.total.bundle, *refs))
    assert any(r["event"] == "attest" and r["decision"] == "deny" and "revoked node" in r["reason"]
               for r in cluster["broker"].audit_records())  # fmt: skip
