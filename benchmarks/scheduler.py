"""Placement benchmark: selector size and computation time, and scheduling latency on a real cluster.

    python benchmarks/scheduler.py [--tasks 200] [--out benchmarks/results/scheduler.json]

1. For 10, 1,000 and 10,000 registered nodes: time to compute placement options (verify-free: the
   entries are already verified), the ``label_selector`` size in bytes (what every call carries), and
   the same with the bounded selector (``max_selector_nodes=256``). Also the time to verify that many
   signed registry statements once (the driver caches verified statements by digest).
2. On a local 3-node ``ray.cluster_utils.Cluster`` (head + 2 labelled nodes): submit-to-running
   latency (submit -> the task body starts, measured with ``time.time()`` in both processes on one
   host) of a task carrying the computed selector vs a plain task, interleaved, median and p90, plus
   the cost of the placement computation itself through the registry actor. Goal (issue 6): <= 1.2x.
3. Node join -> attested and schedulable (``bench_join``): a labelled node joins, its simulated
   executor starts and attests for routing, and the driver's verified registry view lists it; then a
   confidential call narrowed to its pool runs there. Goal (issue 6): <= 2 s.

Writes JSON and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")

from cryptography.hazmat.primitives.asymmetric import ec

from ray_confidential.domains import DomainPolicy
from scheduler.labels import NODE_ID_LABEL, POOL_LABEL, REGION_LABEL, TEE_LABEL
from scheduler.placement import Placer
from scheduler.registry import RegistryEntry, StatementSigner, TrustRegistry

POLICY = DomainPolicy(dev=True)


def _entries(n: int, now: float) -> list[RegistryEntry]:
    pools = ("snp-eu", "tdx-us", "snp-az")
    return [
        RegistryEntry(
            node_id=os.urandom(28).hex(),
            tee="sev-snp",
            pool=pools[i % 3],
            region="eu",
            measurement="11" * 48,
            claims={"env": "dev"},
            expires_at=int(now) + 300,
            seq=1,
            issued_at=int(now),
        )
        for i in range(n)
    ]


def _best(fn: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_selector() -> dict[str, Any]:
    now = time.time()
    out: dict[str, Any] = {}
    signer = StatementSigner(ec.generate_private_key(ec.SECP256R1()), registry_id="bench")
    for n in (10, 1_000, 10_000):
        entries = _entries(n, now)

        def source(_now: float, e: list[RegistryEntry] = entries) -> list[RegistryEntry]:
            return e

        full = Placer(source, clock=lambda: now)
        bounded = Placer(source, clock=lambda: now, max_selector_nodes=256)
        sel = full.options(POLICY)["label_selector"]
        sel_b = bounded.options(POLICY)["label_selector"]
        repeat = 20 if n < 10_000 else 5
        statements = [
            signer.admit(node_id=e.node_id, tee=e.tee, pool=e.pool, region=e.region, measurement=e.measurement,
                         claims=e.claims, expires_at=now + 300, now=now)
            for e in entries[: min(n, 2_000)]
        ]  # fmt: skip
        verifier = signer.verifier()
        t = time.perf_counter()
        reg = TrustRegistry(verifier)
        for s in statements:
            reg.submit(s, now=now)
        per_statement = (time.perf_counter() - t) / len(statements)
        out[str(n)] = {
            "compute_ms": _best(lambda p=full: p.options(POLICY), repeat) * 1e3,
            "compute_pool_ms": _best(lambda p=full: p.options(POLICY, pools="snp-eu"), repeat) * 1e3,
            "selector_bytes": len(json.dumps(sel)),
            "bounded_compute_ms": _best(lambda p=bounded: p.options(POLICY), repeat) * 1e3,
            "bounded_selector_bytes": len(json.dumps(sel_b)),
            "verify_statements_ms": per_statement * n * 1e3,
        }
    return out


def bench_latency(tasks: int) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from scheduler.registry_actor import RegistryClient, get_or_create_registry, submit

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [
        cluster.add_node(num_cpus=2, labels={TEE_LABEL: "sev-snp", POOL_LABEL: "snp-eu", REGION_LABEL: "eu"}),
        cluster.add_node(num_cpus=2, labels={TEE_LABEL: "tdx", POOL_LABEL: "tdx-us", REGION_LABEL: "us"}),
    ]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        signer = StatementSigner(ec.generate_private_key(ec.SECP256R1()), registry_id="bench")
        handle = get_or_create_registry(signer.verifier())
        for node, (tee, pool, region) in zip(
            nodes, (("sev-snp", "snp-eu", "eu"), ("tdx", "tdx-us", "us")), strict=True
        ):
            submit(handle, signer.admit(node_id=node.node_id, tee=tee, pool=pool, region=region, measurement="",
                                        claims={}, expires_at=time.time() + 300))  # fmt: skip
        client = RegistryClient(signer.verifier(), handle)
        placer = client.placer(wait_s=5)
        placer.options(POLICY)  # warm the statement cache
        place_ms = [_timed(lambda: placer.options(POLICY)) * 1e3 for _ in range(20)]
        opts = placer.options(POLICY)
        assert set(opts["label_selector"][NODE_ID_LABEL][3:-1].split(",")) == {n.node_id for n in nodes}

        @ray.remote(num_cpus=1)
        def started() -> float:
            return time.time()

        for _ in range(20):  # warm worker processes on every node
            ray.get([started.remote(), started.options(**opts).remote()])
        runs: dict[str, list[float]] = {"plain": [], "placed": [], "placed_precomputed": []}
        kinds = list(runs)
        for i in range(tasks):
            for kind in kinds[i % 3 :] + kinds[: i % 3]:  # interleaved, rotating order
                t = time.time()
                if kind == "plain":
                    ref = started.remote()
                elif kind == "placed":
                    ref = started.options(**placer.options(POLICY)).remote()  # placement per call
                else:
                    ref = started.options(**opts).remote()
                runs[kind].append(ray.get(ref) - t)
        # A 10,000-id selector (9,998 unknown ids + the two real nodes): what a large cluster would pay.
        big_ids = [os.urandom(28).hex() for _ in range(9_998)] + [n.node_id for n in nodes]
        big = {"label_selector": {NODE_ID_LABEL: f"in({','.join(big_ids)})"}}
        big_runs = []
        for _ in range(max(10, tasks // 5)):
            t = time.time()
            big_runs.append(ray.get(started.options(**big).remote()) - t)
        return {
            "tasks_each": tasks,
            "placed_10000_ids_ms": _stats(big_runs),
            **{f"{k}_ms": _stats(v) for k, v in runs.items()},
            "placement_compute_through_actor_ms": _stats([x / 1e3 for x in place_ms]),
            "ratio_median": statistics.median(runs["placed"]) / statistics.median(runs["plain"]),
            "ratio_median_precomputed": statistics.median(runs["placed_precomputed"])
            / statistics.median(runs["plain"]),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]


def bench_join(rounds: int) -> dict[str, Any]:
    """Node join -> attested and schedulable, with a simulated TEE and the development broker.

    Per round: a new labelled node joins (``Cluster.add_node`` returns once Ray registered it: t0),
    its executor starts as the node image would start it, attests for routing, the broker signs the
    admit and the registry takes it; the driver's own verified view then lists the node (t1) and a
    confidential call narrowed to the node's pool has run there (t2).
    """
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    import ray_confidential as rc
    from benchmarks.join_probe import DOMAIN, where
    from enclave_actors.shim import SOCKET_ENV
    from ray_confidential.api import _session_or_die
    from ray_confidential.testing.tee_node import start_executor, stop_executors
    from scheduler.calls import session_placer

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    rc.init(address=cluster.address, dev=True, placement_wait_s=30)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc.create_domain(DOMAIN)

        placer = session_placer(_session_or_die())
        registered, ran = [], []
        for i in range(rounds):
            pool = f"join-{i}"
            folder = tempfile.mkdtemp(prefix="rc-bench-join-")
            sock = os.path.join(folder, "executor.sock")
            node = cluster.add_node(num_cpus=1, labels={TEE_LABEL: "sev-snp", POOL_LABEL: pool, REGION_LABEL: "eu"},
                                    env_vars={SOCKET_ENV: sock})  # fmt: skip
            t0 = time.monotonic()
            start_executor(
                node_id=node.node_id, tee="sev-snp", socket_path=sock, pool=pool, region="eu", wait_s=0
            )
            while True:
                placer.on_miss()  # type: ignore[misc]
                if node.node_id in {e.node_id for e in placer.source(time.time())}:
                    break
                time.sleep(0.01)
            t1 = time.monotonic()
            assert rc.get(where.options(pools=pool).remote()) == node.node_id
            t2 = time.monotonic()
            registered.append(t1 - t0)
            ran.append(t2 - t0)
        return {
            "rounds": rounds,
            "join_to_registered_s": {"median": statistics.median(registered), "max": max(registered)},
            "join_to_first_call_done_s": {"median": statistics.median(ran), "max": max(ran)},
            "goal_s": 2.0,
        }
    finally:
        rc.shutdown()
        ray.shutdown()
        stop_executors()
        cluster.shutdown()  # type: ignore[no-untyped-call]


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median": statistics.median(xs) * 1e3, "p90": xs[int(len(xs) * 0.9) - 1] * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scheduler.json")
    parser.add_argument("--join-rounds", type=int, default=3, help="nodes joined one by one (join time)")
    parser.add_argument("--no-cluster", action="store_true", help="skip the Ray cluster latency part")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "benchmark": "scheduler",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "selector": bench_selector(),
    }
    if not args.no_cluster:
        report["latency"] = bench_latency(args.tasks)
        report["join"] = bench_join(args.join_rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    sel = report["selector"]
    parts = [
        f"{n} nodes: {sel[n]['selector_bytes'] / 1000:.1f} KB in {sel[n]['compute_ms']:.2f} ms"
        f" (bounded {sel[n]['bounded_selector_bytes'] / 1000:.1f} KB)"
        for n in sel
    ]
    if "latency" in report:
        lat = report["latency"]
        parts.append(
            f"submit-to-running median placed {lat['placed_ms']['median']:.2f} ms vs plain "
            f"{lat['plain_ms']['median']:.2f} ms ({lat['ratio_median']:.2f}x with placement per call, "
            f"{lat['ratio_median_precomputed']:.2f}x precomputed; 10,000-id selector "
            f"{lat['placed_10000_ids_ms']['median']:.1f} ms)"
        )
    if "join" in report:
        j = report["join"]
        parts.append(
            f"node join to attested and schedulable {j['join_to_registered_s']['median']:.2f} s median "
            f"(max {j['join_to_registered_s']['max']:.2f} s; first call done {j['join_to_first_call_done_s']['median']:.2f} s)"
        )
    try:
        shown = args.out.relative_to(ROOT)
    except ValueError:
        shown = args.out
    print("scheduler: " + "; ".join(parts) + f" -> {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
