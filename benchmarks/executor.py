"""Warm confidential call (shim + executor) vs a plain Ray task running the same function.

    python benchmarks/executor.py            # writes benchmarks/results/executor.json + one summary line
    python benchmarks/executor.py --quick

Side by side in one run, on one simulated sev-snp node of a local Cluster: small inputs (added
latency p50/p99 of submit + get, keys cached) and 64 MiB sealed Arrow inputs (throughput). Both the
confidential and the plain task run the same function, which reads its whole input (sum of a column),
so the plain task pays for touching its data too. Keys come from the embedded broker over gRPC, cached
after the first call (no broker round trip per call). The decryption rate d (AES-256-GCM
decrypt_into, as in benchmarks/object_store.py; the best of two measurements, before and after the
calls) is measured in the same run so that the 64 MiB figure can be compared "beyond the cost of
decryption itself". As a diagnostic, not for the goal, it also measures the same decryption after
sleeping as long as a plain call takes (what an executor worker does between the alternating calls):
on a shared VM an idle CPU is slow to resume, and ``ratio_beyond_decrypt_after_idle`` shows how much
of the gap that accounts for.
Goals (issue 5): <= 0.5 ms added at p50 for small inputs; >= 0.8x plain throughput beyond decryption.

The confidential and plain calls alternate, so both see the same load on a shared machine. The
64 MiB figure is for an input used again (the executor keeps its authenticated sealed memfd, as the
node's plasma keeps the plain one); ``first_use`` is the first call on a freshly put object, which
also pays for that one copy into a sealed memfd, and, for both sides, Ray's transfer of the object
to the node.

This file is also an example of a ``__main__`` script holding confidential functions: the executor
imports it under its stem ``executor``, so the block at the bottom never runs there.
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
import pyarrow as pa

import ray_confidential as rc

MiB = 1 << 20
RESULTS = Path(__file__).parent / "results" / "executor.json"


def total(x: Any) -> float:
    """Reads its whole input (a fair comparison: the plain task must touch its data too)."""
    if hasattr(x, "column"):
        import pyarrow.compute as pc

        return float(pc.sum(x.column("x")).as_py())
    return float(np.sum(x))


confidential_total = rc.remote(domain="bench")(total)


def _percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_ms": s[len(s) // 2] * 1e3, "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3}


def _time(fn: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _interleaved(a: Any, b: Any, n: int) -> tuple[list[float], list[float]]:
    """Time ``a`` and ``b`` alternately, so that both see the same load on a shared machine."""
    ta, tb = [], []
    for _ in range(n):
        ta += _time(a, 1)
        tb += _time(b, 1)
    return ta, tb


def _per(x: float, seconds: float) -> float:
    """``x / seconds``; infinite when nothing is left beyond decryption."""
    return x / seconds if seconds > 0 else float("inf")


def decrypt_times(size: int, *, idle_s: float = 0.0, n: int = 10) -> list[float]:
    """Seconds per decryption of ``size`` bytes (as the executor's workers decrypt: 4 MiB chunks on
    the thread pool), each after ``idle_s`` seconds asleep (0: back to back)."""
    from ray_confidential.crypto import stream

    key, prefix, aad = os.urandom(32), os.urandom(7), b"aad"
    data = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    sealed = bytearray(stream.sealed_length(size, 4 * MiB))
    stream.encrypt_segments(key, prefix, aad, [memoryview(data)], size, 4 * MiB, memoryview(sealed))
    out = bytearray(size)
    times = []
    for _ in range(n):
        time.sleep(idle_s)
        times += _time(lambda: stream.decrypt_into(key, prefix, aad, memoryview(sealed), size, 4 * MiB,
                                                   memoryview(out)), 1)  # fmt: skip
    return times


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

    n_small = 100 if args.quick else 400
    n_big = 5 if args.quick else 30  # 64 MiB calls take about 20 ms: enough for a stable median
    n_first = 2 if args.quick else 4
    cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, "num_cpus": 0})
    node = add_tee_node(cluster, tee="sev-snp", num_cpus=1, object_store_memory=600 * MiB)
    rc.init(address=cluster.address, dev=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc.create_domain("bench")
    plain_total = ray.remote(total).options(label_selector={"ray.io/node-id": node.node_id}, max_retries=0)
    results: dict[str, Any] = {"device": "CPU only", "node": "1 simulated sev-snp node (local Cluster)"}
    try:
        small = np.arange(16.0)
        sref, pref = rc.put(small, domain="bench"), ray.put(small)
        for _ in range(20):  # warm: worker processes, token, data key
            rc.get(confidential_total.remote(sref))
            ray.get(plain_total.remote(pref))
        conf, plain = _interleaved(lambda: rc.get(confidential_total.remote(sref)),
                                   lambda: ray.get(plain_total.remote(pref)), n_small)  # fmt: skip
        c, p = _percentiles(conf), _percentiles(plain)
        results["small"] = {"calls": n_small, "confidential": c, "plain": p,
                            "added_p50_ms": c["p50_ms"] - p["p50_ms"], "added_p99_ms": c["p99_ms"] - p["p99_ms"]}  # fmt: skip
        rows = 64 * MiB // 8
        table = pa.table({"x": np.arange(rows, dtype=np.int64)})
        first_conf, first_plain = [], []
        for _ in range(n_first):  # fresh objects: Ray moves them to the node, the shim copies into a memfd
            sref, pref = rc.put(table, domain="bench"), ray.put(table)
            first_conf += _time(lambda s=sref: rc.get(confidential_total.remote(s)), 1)
            first_plain += _time(lambda p=pref: ray.get(plain_total.remote(p)), 1)
        best_before = min(decrypt_times(64 * MiB))
        conf, plain = _interleaved(lambda: rc.get(confidential_total.remote(sref)),
                                   lambda: ray.get(plain_total.remote(pref)), n_big)  # fmt: skip
        # The best rate of two measurements around the calls: the smallest decryption time this
        # machine achieved, so the figure "beyond decryption" never credits a slow measurement.
        size = 64
        d = size / min(best_before, *decrypt_times(64 * MiB))
        # Diagnostic only (the goal is judged on ``d``): in the benchmark an executor worker decrypts
        # after idling while the plain call runs; the same decryption after that long asleep.
        after_idle = size / statistics.median(decrypt_times(64 * MiB, idle_s=statistics.median(plain)))

        def figures(conf: list[float], plain: list[float]) -> dict[str, float]:
            conf_s, plain_s = statistics.median(conf), statistics.median(plain)
            beyond = conf_s - size / d  # confidential time minus the decryption itself
            beyond_idle = conf_s - size / after_idle
            return {
                "confidential_mib_s": size / conf_s,
                "plain_mib_s": size / plain_s,
                "decrypt_mib_s": d,
                "confidential_beyond_decrypt_mib_s": _per(size, beyond),
                "ratio_beyond_decrypt": _per(plain_s, beyond),
                "decrypt_after_idle_mib_s": after_idle,
                "ratio_beyond_decrypt_after_idle": _per(plain_s, beyond_idle),
            }

        results["arrow_64mib"] = {**figures(conf, plain), "calls": n_big,
                                  "first_use": {**figures(first_conf, first_plain), "calls": n_first}}  # fmt: skip
    finally:
        rc.shutdown()
        ray.shutdown()
        stop_executors()
        cluster.shutdown()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    s, b = results["small"], results["arrow_64mib"]
    print(json.dumps(results))
    print(f"executor: small added p50 {s['added_p50_ms']:.2f} ms p99 {s['added_p99_ms']:.2f} ms "
          f"(goal <= 0.5 ms p50); 64 MiB arrow {b['confidential_mib_s']:.0f} MiB/s vs plain "
          f"{b['plain_mib_s']:.0f} MiB/s, beyond decryption {b['ratio_beyond_decrypt']:.2f}x of plain (goal >= 0.8x); "
          f"first use of an object {b['first_use']['ratio_beyond_decrypt']:.2f}x; decryption back to back "
          f"{b['decrypt_mib_s']:.0f} MiB/s, after idling as long as a plain call {b['decrypt_after_idle_mib_s']:.0f} MiB/s "
          f"(beyond that: {b['ratio_beyond_decrypt_after_idle']:.2f}x, diagnostic)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
