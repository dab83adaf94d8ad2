"""Decorated confidential task and enclave actor calls vs plain ``@ray.remote`` equivalents.

    python benchmarks/tasks.py            # writes benchmarks/results/tasks.json + one summary line
    python benchmarks/tasks.py --quick

Warm, side by side in one run, on one simulated sev-snp node of a local Cluster: p50/p99 latency of
one call (submit + get of a small sealed input, keys cached: no broker round trip per call) and
small-call throughput (a batch of calls in flight, then all results fetched). The plain task and
actor run the same function body on the same node. Goals (issue 7): <= 0.6 ms added per call at
p50; >= 0.7x small-call throughput. Confidential and plain calls alternate (latency: call by call;
throughput: three rounds each, the median ratio), so both see the same load on a shared machine.
Around each throughput round it also reads every process's CPU time (``benchmarks/cpu_accounting``)
and reports ``cpu``: ms per call by role (driver, Ray workers, the rest of Ray, executor daemon and
workers), the throughput ratio the CPU alone allows, and that ratio were the executor free.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

if __package__ in (None, ""):  # run as a script: import from the repository root, where the
    _sys.path[0] = str(
        _Path(__file__).resolve().parents[1]
    )  # packages are (benchmarks/scheduler.py would shadow one)

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import ray_confidential as rc

RESULTS = Path(__file__).parent / "results" / "tasks.json"


def scale(x: Any) -> float:
    return float(np.asarray(x).sum()) * 2.0


confidential_scale = rc.remote(domain="bench-tasks")(scale)


class Accumulator:
    def __init__(self) -> None:
        self.total = 0.0

    def add(self, x: Any) -> float:
        self.total += float(np.asarray(x).sum())
        return self.total


ConfidentialAccumulator = rc.enclave_actor(domain="bench-tasks")(Accumulator)


def _pcts(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_ms": s[len(s) // 2] * 1e3, "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3}


def _latency(a: Any, b: Any, n: int) -> tuple[dict[str, float], dict[str, float]]:
    """p50/p99 of ``a`` and ``b``, timed alternately so that both see the same load."""
    ta, tb = [], []
    for _ in range(n):
        for fn, out in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return _pcts(ta), _pcts(tb)


def _throughput(submit: Any, fetch: Any, n: int, cpu: list[dict[str, float]]) -> float:
    """Calls per second for ``n`` calls in flight; appends the CPU per call by role to ``cpu``."""
    from benchmarks import cpu_accounting  # here, not at the top: executors import this module

    before, t = cpu_accounting.snapshot(), time.perf_counter()
    refs = [submit() for _ in range(n)]
    fetch(refs)
    rate = n / (time.perf_counter() - t)
    cpu.append(cpu_accounting.per_call_ms(before, cpu_accounting.snapshot(), n))
    return rate


def _cpu_summary(conf: list[dict[str, float]], plain: list[dict[str, float]]) -> dict[str, Any]:
    """Mean CPU per call by role over the rounds (``/proc`` counts in 10 ms ticks: the mean of all
    rounds resolves finer than any one), and the throughput ratio the CPU alone allows when calls
    are CPU-bound: as measured, and if the executor (daemon and workers) cost nothing."""
    from benchmarks import cpu_accounting

    c, p = (
        {role: statistics.fmean(r[role] for r in rounds) for role in rounds[0]} for rounds in (conf, plain)
    )
    executor = sum(c[r] for r in cpu_accounting.EXECUTOR_ROLES)
    return {"confidential_ms_per_call": c, "plain_ms_per_call": p,
            "cpu_bound_ratio": p["total"] / c["total"],
            "cpu_bound_ratio_zero_cost_executor": p["total"] / (c["total"] - executor)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_CONFIDENTIAL_STATE_DIR", tempfile.mkdtemp(prefix="rc-bench-"))
    import ray
    from ray.cluster_utils import Cluster

    from ray_confidential.testing import add_tee_node
    from ray_confidential.testing.tee_node import stop_executors

    n = 100 if args.quick else 300
    cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, "num_cpus": 0})
    node = add_tee_node(cluster, tee="sev-snp", num_cpus=2)
    rc.init(address=cluster.address, dev=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc.create_domain("bench-tasks")
    on_node = {"label_selector": {"ray.io/node-id": node.node_id}}
    plain_scale = ray.remote(scale).options(**on_node)
    plain_actor = ray.remote(Accumulator).options(**on_node).remote()
    conf_actor = ConfidentialAccumulator.remote()
    res: dict[str, Any] = {"device": "CPU only", "node": "1 simulated sev-snp node (local Cluster), 2 CPUs"}
    try:
        x = np.arange(16.0)
        sx, px = rc.put(x, domain="bench-tasks"), ray.put(x)
        for _ in range(20):  # warm: workers, executor subprocesses, tokens, data keys
            rc.get(confidential_scale.remote(sx))
            ray.get(plain_scale.remote(px))
            rc.get(conf_actor.add.remote(sx))
            ray.get(plain_actor.add.remote(px))
        for kind, conf_call, plain_call in (
            ("task", lambda: confidential_scale.remote(sx), lambda: plain_scale.remote(px)),
            ("actor", lambda: conf_actor.add.remote(sx), lambda: plain_actor.add.remote(px)),
        ):
            c, p = _latency(lambda f=conf_call: rc.get(f()), lambda f=plain_call: ray.get(f()), n)
            cpu_conf: list[dict[str, float]] = []
            cpu_plain: list[dict[str, float]] = []
            rounds = [(_throughput(conf_call, rc.get, n, cpu_conf),
                       _throughput(plain_call, ray.get, n, cpu_plain)) for _ in range(3)]  # fmt: skip
            ct, pt = (statistics.median(x) for x in zip(*rounds, strict=True))
            res[kind] = {"confidential": c, "plain": p, "added_p50_ms": c["p50_ms"] - p["p50_ms"],
                         "confidential_calls_per_s": ct, "plain_calls_per_s": pt,
                         "throughput_ratio": statistics.median(a / b for a, b in rounds),
                         "cpu": _cpu_summary(cpu_conf, cpu_plain)}  # fmt: skip
    finally:
        rc.shutdown()
        ray.shutdown()
        stop_executors()
        cluster.shutdown()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))
    t, a = res["task"], res["actor"]
    print(
        f"tasks: task added p50 {t['added_p50_ms']:.2f} ms, throughput {t['throughput_ratio']:.2f}x plain; "
        f"actor added p50 {a['added_p50_ms']:.2f} ms, throughput {a['throughput_ratio']:.2f}x plain "
        "(goals <= 0.6 ms, >= 0.7x); CPU per call confidential/plain "
        f"{t['cpu']['confidential_ms_per_call']['total']:.2f}/{t['cpu']['plain_ms_per_call']['total']:.2f} ms "
        f"(task), with a zero-cost executor the CPU would allow {t['cpu']['cpu_bound_ratio_zero_cost_executor']:.2f}x "
        f"(task), {a['cpu']['cpu_bound_ratio_zero_cost_executor']:.2f}x (actor)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
