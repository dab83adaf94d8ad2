"""Confidential calls through Ray: shim + executor on a simulated TEE node, and the Ray-side attacks.

One small Cluster for the module: a head (ordinary node), a trusted sev-snp node and a node that
claims tdx but cannot attest.
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
from ray_confidential.testing import add_tee_node
from ray_confidential.testing.scan import files_containing, plasma_contains
from ray_confidential.testing.tee_node import EXECUTORS, stop_executors
from tests.executor import conf_funcs
from tests.executor.attacker import read_memory

REPO = Path(__file__).resolve().parents[2]
DROP_PRIVS = ["setpriv", "--bounding-set=-sys_ptrace,-dac_override,-dac_read_search", "--inh-caps=-all"]


def _snp(fn: Any) -> Any:
    """Route to the trusted sev-snp node (the default selector also admits the lying tdx node)."""
    return fn.options(tee="sev-snp")


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    c = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, "num_cpus": 1})
    tee = add_tee_node(c, tee="sev-snp", num_cpus=2)
    liar = add_tee_node(c, tee="tdx", trusted=False, num_cpus=1)
    rc.init(address=c.address, dev=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc.create_domain("exec-a")
    try:
        yield {"cluster": c, "tee": tee, "liar": liar, "executor": EXECUTORS[tee.node_id]}
    finally:
        rc.shutdown()
        ray.shutdown()
        stop_executors()
        c.shutdown()


def test_confidential_call_and_context(cluster: dict[str, Any]) -> None:
    ref = _snp(conf_funcs.total).remote(rc.put(np.arange(6.0), domain="exec-a"), 2)
    assert isinstance(ref, rc.SealedRef)
    assert rc.get(ref) == {"sum": 30.0}
    where = rc.get(_snp(conf_funcs.where).remote())
    assert where["node_id"] == cluster["tee"].node_id and where["tee"] == "sev-snp"
    assert where["bundle"] == conf_funcs.where.bundle.digest_hex and where["domains"] == ["exec-a"]
    with pytest.raises(RuntimeError, match="only available inside a confidential call"):
        rc.context()


def test_arrow_input(cluster: dict[str, Any]) -> None:
    import pyarrow as pa

    table = pa.table({"x": np.arange(300_000)})  # ~2.4 MiB: moves as a sealed memfd
    assert rc.get(_snp(conf_funcs.echo_len).remote(rc.put(table, domain="exec-a"))) == 300_000


def test_a7_node_claiming_tee_labels_gets_no_key(cluster: dict[str, Any]) -> None:
    ref = conf_funcs.total.options(tee="tdx").remote(rc.put(np.arange(3.0), domain="exec-a"))
    with pytest.raises(KeyReleaseDenied, match="attestation failed"):
        rc.get(ref)


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


def test_plaintext_marker_scan(cluster: dict[str, Any], capfd: pytest.CaptureFixture[str]) -> None:
    secret = "SECRETMARK-" + os.urandom(6).hex()
    control = "CONTROLMARK-" + os.urandom(6).hex()
    with pytest.raises(SealedTaskError) as info:
        rc.get(_snp(conf_funcs.leak).remote(rc.put(secret.encode(), domain="exec-a")))
    err = info.value
    assert secret not in str(err) and secret not in repr(err)
    assert (
        secret in rc.get.__globals__["open_sealed"](err.sealed_detail, rc.api._session.key_service)["error"]
    )
    with pytest.raises(ray.exceptions.RayTaskError) as ctl_info:
        ray.get(_plain_leak.remote(control))
    assert control in str(ctl_info.value)
    ray.put(control.encode() * 4)
    time.sleep(1.5)  # let log monitors flush
    session = Path(cluster["cluster"].head_node.get_session_dir_path())
    out = capfd.readouterr()
    assert control in out.out + out.err or files_containing(session / "logs", control.encode())
    assert secret not in out.out + out.err
    assert files_containing(session / "logs", control.encode()), "the scan must see the control's logs"
    assert not files_containing(session / "logs", secret.encode())
    assert not files_containing(Path(cluster["executor"].socket).parent, secret.encode())
    assert plasma_contains(control.encode()) and not plasma_contains(secret.encode())
    found_control = found_secret = False
    for pid in _ray_worker_pids():
        found_control |= bool(read_memory(pid, control.encode())["found"])
        found_secret |= bool(read_memory(pid, secret.encode())["found"])
    assert found_control, "the memory scan must see the control's plaintext in a Ray worker"
    assert not found_secret


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
                         hpke_suite="X25519-HKDF-SHA256-AES-256-GCM", cluster_id="dev", bundle_digest=bytes(32)))  # fmt: skip
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
