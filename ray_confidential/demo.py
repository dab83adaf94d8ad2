"""``ray-confidential demo``: the whole story on one machine, each claim checked as it is shown.

A local Ray cluster (``ray.cluster_utils.Cluster`` on 127.0.0.1, dashboard on loopback) with two
attested simulated TEE nodes in two pools (sev-snp in ``eu-hospital``, tdx in ``us-research``) and
one node that lies about being a TEE (labelled sgx, but its attestation device signs under a root
nobody trusts); the embedded development key broker in this process (the owner's). Steps: seal a
patient table; scan the object store; run a confidential task and an enclave actor and show where
each ran (``rc.context()`` inside the executor); force a call onto the liar (its key request is
denied, and the broker's audit log says so); let an ordinary ``@ray.remote`` task try the
attestation device (refused); force spilling and scan the spill files; open the results as the
owner and export the sealed bytes; show and verify the signed audit trail; print the dashboard
address. Exit status 0 only when every check held.

Routing: the task asks for pool ``eu-hospital``, the actor for ``us-research``; the liar claims
``eu-hospital`` too, but placement uses only nodes in the trust registry (admitted by the broker
after attestation), so it is never chosen. To show the broker's side, the demo then plays a shim by
hand: an ordinary Ray task pinned to the liar hands its executor the bundle and the sealed table;
the broker refuses the attestation, releases no key, and its audit log records the denial.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

MARKER = "PATIENT-PLAINTEXT-7f3a"
STEPS = 12
TRUSTED = (("sev-snp", "eu-hospital"), ("tdx", "us-research"))
LIAR = ("sev-snp", "eu-hospital")


def _table(rows: int):  # type: ignore[no-untyped-def]
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(7)
    return pa.table(
        {
            "patient": [f"{MARKER}-{i:07d}" for i in range(rows)],
            "age": rng.integers(18, 95, rows),
            "glucose": rng.normal(5.5, 1.2, rows),
        }
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _try_attestation_device() -> str:
    """An ordinary Ray task on a TEE node asks the attestation device for evidence over a key of
    its own choosing (what a relay attack needs). Returns what happened."""
    from enclave_actors.device import request_evidence
    from enclave_actors.shim import SOCKET_ENV
    from ray_confidential.attestation.binding import Binding

    path = os.environ.get(SOCKET_ENV, "/nonexistent") + ".device"
    binding = Binding(nonce=os.urandom(32), executor_public_key=os.urandom(32), hpke_suite="x25519",
                      cluster_id="demo", bundle_digest=bytes(32))  # fmt: skip
    try:
        request_evidence(path, binding)
    except Exception as exc:  # the expected outcome: refused
        return f"{type(exc).__name__}: {exc}"
    return "evidence obtained"


def call_by_hand(bundle: Any, domain: str, payload: Any) -> str:
    """An ordinary Ray task playing a confidential call's shim on whatever node it was placed:
    it hands the local executor ``bundle`` and one sealed input. Returns what happened."""
    from enclave_actors.shim import ExecutorClient
    from ray_confidential.api import sealed_data

    data = sealed_data(payload)
    try:
        ExecutorClient.from_env().call(bundle, domain=domain, inputs=[data], args=[["s", 0]], timeout_s=60)
    except Exception as exc:  # the expected outcome on a node that cannot attest
        return f"{type(exc).__name__}: {exc}"
    return "a sealed result came back"


class _Story:
    """Progress lines and the running verdict."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.ok = True
        self.started = time.monotonic()

    def step(self, n: int, text: str) -> None:
        print(f"[{n}/{STEPS}] {text} ({time.monotonic() - self.started:.0f} s)", file=self.out, flush=True)

    def detail(self, text: str) -> None:
        print(f"      {text}", file=self.out, flush=True)

    def check(self, held: bool, text: str) -> None:
        self.ok &= held
        self.detail(("ok: " if held else "FAILED (!): ") + text)


def _short(node_id: str) -> str:
    return node_id[:12]


def run(out: TextIO = sys.stdout, *, rows: int = 200_000) -> int:
    """Run the demo; returns a process exit code (0 when every check held)."""
    # Ray binds 127.0.0.1 only with this set (read when Ray is first imported; the CLI imports it here).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.cluster_utils import Cluster

    story = _Story(out)
    _ensure_ray_token()
    spill_dir = Path(tempfile.mkdtemp(prefix="rc-demo-spill-"))
    dashboard_port = _free_port()
    story.step(1, f"Starting a local Ray cluster on loopback (dashboard on :{dashboard_port}, 100 MiB object "
                  f"store spilling to {spill_dir})")  # fmt: skip
    cluster: Any = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": 100 << 20,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
            # Not the default 52365: a node agent that finds its port taken (another Ray on this
            # machine) stays up without its HTTP service, and the dashboard loses that node's logs.
            "dashboard_agent_listen_port": _free_port(),
            "_system_config": {
                "object_spilling_config": json.dumps(
                    {"type": "filesystem", "params": {"directory_path": str(spill_dir)}}
                ),
                "min_spilling_size": 0,
                "metrics_report_interval_ms": 2000,
            },
        },
    )
    try:
        story.detail(f"head node at {cluster.address}")
        return _story(story, cluster, spill_dir, rows)
    except Exception as exc:
        story.ok = False
        print(f"FAILED (!): {type(exc).__name__}: {exc}", file=out, flush=True)
        return 1
    finally:
        import ray_confidential as rc
        from ray_confidential.testing.tee_node import stop_executors

        rc.shutdown()
        ray.shutdown()
        stop_executors()
        cluster.shutdown()
        shutil.rmtree(spill_dir, ignore_errors=True)
        print(f"demo: {'OK, every check held' if story.ok else 'FAILED: see the lines marked (!)'} "
              f"({time.monotonic() - story.started:.0f} s)", file=out, flush=True)  # fmt: skip


def _story(story: _Story, cluster: Any, spill_dir: Path, rows: int) -> int:
    import ray

    import ray_confidential as rc
    from ray_confidential import demo_jobs
    from ray_confidential.errors import KeyReleaseDenied
    from ray_confidential.kbs import embedded
    from ray_confidential.keyservice import default_state_dir
    from ray_confidential.sealed.format import SealedHeader
    from ray_confidential.testing import add_tee_node, scan

    marker = MARKER.encode()
    story.step(2, "Adding three nodes that say they are TEEs, each with a simulated enclave executor:")
    nodes: dict[str, Any] = {}

    def add(**kwargs: Any) -> Any:
        # On a loaded laptop a raylet can miss Ray's fixed 30 s registration window; try once more.
        for attempt in (1, 2):
            try:
                return add_tee_node(cluster, num_cpus=1, object_store_memory=80 << 20, **kwargs)
            except Exception as exc:
                if attempt == 2 or "timed out during startup" not in str(exc):
                    raise
                story.detail("a node was slow to register with Ray; starting it again")
        raise AssertionError("unreachable")

    for tee, pool in TRUSTED:
        nodes[tee] = add(tee=tee, pool=pool)
        story.detail(f"{tee:8} pool={pool:12} node {_short(nodes[tee].node_id)}  (attests under the "
                     f"simulated root the broker trusts)")  # fmt: skip
    liar = add(tee=LIAR[0], pool=LIAR[1], trusted=False)
    story.detail(f"{LIAR[0]:8} pool={LIAR[1]:12} node {_short(liar.node_id)}  (LIES: its device signs under a "
                 f"root nobody trusts)")  # fmt: skip
    rc.init(address=cluster.address, dev=True)
    broker = embedded.current()
    assert broker is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the development policy's warning: the demo says so itself
        rc.create_domain(demo_jobs.DOMAIN)
    story.detail(f"development key broker (this process, the owner) on {broker.target}; domain "
                 f"{demo_jobs.DOMAIN!r} with the development policy")  # fmt: skip

    table = _table(rows)
    t0 = time.perf_counter()
    ref = rc.put(table, domain=demo_jobs.DOMAIN)
    story.step(3, f"Sealed {table.num_rows:,} patient rows ({table.nbytes / 2**20:.1f} MiB) in "
                  f"{(time.perf_counter() - t0) * 1e3:.0f} ms -> {ref!r}")  # fmt: skip

    sealed_found = scan.plasma_contains(marker)
    control = ray.put(table)
    control_found = scan.plasma_contains(marker)
    del control
    story.step(4, f"Object store (plasma) scanned for {MARKER!r}:")
    story.check(not sealed_found, "the sealed table: marker not found")
    story.check(control_found, "a plain ray.put control: marker found (the scan can see)")

    trusted_ids = {n.node_id: tee for tee, n in nodes.items()}
    summary_ref = demo_jobs.glucose_summary.options(pools=[TRUSTED[0][1]]).remote(ref)
    summary = rc.get(summary_ref)
    story.step(5, f"Confidential task glucose_summary ran inside the executor on node {_short(summary['node_id'])} "
                  f"({summary['tee']}, pool={summary['pool']}): {summary['rows']:,} rows, mean glucose "
                  f"{summary['mean_glucose']:.2f}")  # fmt: skip
    story.check(
        summary["node_id"] == nodes["sev-snp"].node_id, "rc.context() names the attested sev-snp node"
    )

    counter_cls: Any = demo_jobs.CohortCounter
    counter = counter_cls.options(pools=[TRUSTED[1][1]]).remote()
    counted = rc.get(counter.add.remote(ref))
    trust = ray.get(counter.trust_state(), timeout=60)
    story.step(6, f"Enclave actor CohortCounter on node {_short(counted['node_id'])} ({counted['tee']}, "
                  f"pool={counted['pool']}): {counted['over_65']:,} of {counted['seen']:,} patients over 65")  # fmt: skip
    story.detail(f"its Ray actor (an untrusted shim) shows: {trust['repr']}")
    story.check(counted["node_id"] == nodes["tdx"].node_id, "rc.context() names the attested tdx node")
    story.check(liar.node_id not in (summary["node_id"], counted["node_id"]),
                f"the liar ran neither (it claims pool {LIAR[1]} too, but is not in the trust registry)")  # fmt: skip

    story.step(7, f"Playing a shim by hand on the liar (node {_short(liar.node_id)}): an ordinary task hands its "
                  f"executor the task's bundle and the sealed table")  # fmt: skip
    by_hand = ray.remote(call_by_hand).options(label_selector={"ray.io/node-id": liar.node_id}, max_retries=0)
    forced = ray.get(
        by_hand.remote(demo_jobs.glucose_summary.bundle, demo_jobs.DOMAIN, ref.object_ref), timeout=120
    )
    story.check(forced.startswith(KeyReleaseDenied.__name__), f"refused: {forced[:100]}")
    records = broker.audit_records()
    liar_records = [r for r in records if r.get("node_id") == liar.node_id]
    denials = [r for r in liar_records if r.get("decision") == "deny"]
    for r in denials[:2]:
        story.detail(f"broker audit: {_audit_line(r)}")
    story.check(bool(denials), "the broker's audit log records the liar's denied attestation")
    story.check(not any(r.get("decision") == "grant" for r in liar_records),
                "no token and no data key was ever granted to the liar")  # fmt: skip

    plain = ray.remote(_try_attestation_device).options(
        label_selector={"ray.io/node-id": nodes["sev-snp"].node_id}, max_retries=0
    )
    device = ray.get(plain.remote(), timeout=120)
    story.step(
        8, "An ordinary @ray.remote task on the sev-snp node asks the attestation device for evidence:"
    )
    story.check(device.startswith("AttestationError"), f"refused: {device[:110]}")

    header = SealedHeader.parse(rc.export(ref)[:16384])
    fillers = [rc.put(bytes(30 << 20), domain=demo_jobs.DOMAIN) for _ in range(6)]
    ray.get([f.object_ref for f in fillers])
    spilled = scan.files_containing(spill_dir, header.header_bytes[:48])
    leaked = scan.files_containing(spill_dir, marker)
    n_files = sum(1 for p in spill_dir.rglob("*") if p.is_file())
    story.step(9, f"Forced spilling ({n_files} spill files):")
    story.check(bool(spilled), "the sealed table was spilled")
    story.check(not leaked, "marker not found in any spill file")
    del fillers

    opened = rc.get(ref)
    export_dir = default_state_dir() / "demo"
    export_dir.mkdir(parents=True, exist_ok=True)
    export_path = export_dir / "patients.sealed"
    export_path.write_bytes(rc.export(ref))
    result_path = export_dir / "glucose-summary.sealed"
    result_path.write_bytes(rc.export(summary_ref))
    story.step(
        10, f"Opened as the owner: {opened.num_rows:,} rows; exported the sealed table and the task result:"
    )
    story.check(opened.equals(table), "identical to the input")
    story.detail(f"open them off-cluster: ray-confidential open {export_path}")
    story.detail(f"                       ray-confidential open {result_path}")

    story.step(11, "The audit trail (the broker's signed, hash-chained log; a few records):")
    audit_log, audit_pub, checkpoint = _copy_audit(broker, export_dir)
    records = broker.audit_records()
    shown = _pick(records, liar.node_id, set(trusted_ids))
    for r in shown:
        story.detail(_audit_line(r))
    verify = subprocess.run(
        [sys.executable, "-m", "ray_confidential.cli", "audit", "verify", str(audit_log),
         "--public-key", str(audit_pub), "--checkpoint", str(checkpoint)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": _pythonpath()},
    )  # fmt: skip
    story.detail(f"$ ray-confidential audit verify {audit_log} --public-key {audit_pub.name} --checkpoint "
                 f"{checkpoint.name}")  # fmt: skip
    for line in verify.stdout.strip().splitlines():
        story.detail(f"  {line}")
    story.check(verify.returncode == 0, f"the audit log verifies ({len(records)} records)")

    dashboard = _dashboard_url(cluster)
    story.step(12, f"Ray dashboard: {dashboard}  (metrics: ray_confidential_* in the metrics view; "
                   f"Grafana dashboard: dashboards/ray_confidential_grafana.json)")  # fmt: skip
    return 0 if story.ok else 1


def _ensure_ray_token() -> None:
    """Respect the caller's ``RAY_AUTH_MODE``: where token auth is on and no token exists (a fresh
    HOME), create one as ``ray.init`` does for a new local cluster (``Cluster`` does not)."""
    from ray_confidential import _ray_compat

    _ray_compat.ensure_auth_token()


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


def _audit_line(r: dict[str, Any]) -> str:
    keys = ("tee", "pool", "node_id", "object_id", "code", "reason")
    width = {"node_id": 12, "object_id": 16, "reason": 60}
    fields = " ".join(f"{k}={str(r[k])[: width.get(k, 40)]}" for k in keys if r.get(k) not in (None, ""))
    return (
        f"#{r.get('seq', '?')} {r.get('time', '')} {r.get('event')} {r.get('decision', '')} {fields}".strip()
    )


def _pick(records: list[dict[str, Any]], liar: str, trusted: set[str]) -> list[dict[str, Any]]:
    """A few telling records: a granted attestation and key release per trusted node, the liar's denial."""
    picked: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for r in records:
        key = (r.get("event"), r.get("decision"), r.get("node_id"))
        if key in seen:
            continue
        if (
            r.get("node_id") in trusted
            and r.get("decision") == "grant"
            and r.get("event") in ("attest", "unwrap")
        ) or (r.get("node_id") == liar and r.get("decision") == "deny"):
            seen.add(key)
            picked.append(r)
    return picked[:6]


def _copy_audit(broker: Any, folder: Path) -> tuple[Path, Path, Path]:
    """Copy the broker's audit log, its public key and a fresh signed checkpoint (the embedded
    broker's folder is removed when it stops)."""
    from ray_confidential.kbs.config import DEV_OWNER

    checkpoint = folder / "audit.checkpoint.json"
    checkpoint.write_bytes(broker.broker.audit_checkpoint(DEV_OWNER))
    log = folder / "audit.log"
    shutil.copyfile(broker.audit_path, log)
    pub = folder / "audit.pub"
    shutil.copyfile(Path(str(broker.audit_path) + ".pub"), pub)
    return log, pub, checkpoint


def _dashboard_url(cluster: Any) -> str:
    url = str(getattr(cluster.head_node, "webui_url", "") or "")
    if not url:
        return "(not available: the dashboard did not start)"
    return url if url.startswith("http") else f"http://{url}"
