"""Sealed vs plain Ray object store throughput and memory, side by side in one run.

    python benchmarks/object_store.py            # 1, 16, 256 MiB tables, 3 runs; writes benchmarks/results/object_store.json
    python benchmarks/object_store.py --quick    # 1 and 16 MiB only

Measured in the same run, on this machine:
  e = AES-256-GCM encrypt_into on 2 threads over 4 MiB chunks into a reused buffer,
  d = decrypt_into likewise, c = warm single-thread memcpy (np.copyto into a preallocated array).
Acceptance (issue 2): sealed put >= 0.8 x the two-pass bound e*c/(e+c); sealed get >= 0.8 x d.
Reported beside them: what plain Ray leaves possible here (plain ray.put vs the bound; the ceilings
e*p/(e+p) for a sealed put and size/(payload fetch + size/d) for a sealed get), and the first open of
an object (no cached unwrap). Each ratio is taken within one run; the JSON holds the medians.
Cross-node figures (2-node Cluster on one host) are informative only.
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
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

MiB = 1 << 20
RESULTS = Path(__file__).parent / "results" / "object_store.json"
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def table_of(size: int) -> pa.Table:
    n = size // 16
    rng = np.random.default_rng(0)
    return pa.table({"a": rng.random(n), "b": np.arange(n, dtype=np.int64)})


_RATE_BUFFERS: dict[int, tuple[np.ndarray, bytearray, bytearray]] = {}


def machine_rates(size: int = 256 * MiB) -> dict[str, float]:
    """e, d, c in bytes/s, measured as the issue defines them."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    chunk = 4 * MiB
    n = size // chunk
    if size not in _RATE_BUFFERS:  # generated once: random data for 256 MiB takes a second
        src = np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8)
        _RATE_BUFFERS[size] = (src, bytearray(size + 16 * n), bytearray(size))
    src, ct, pt = _RATE_BUFFERS[size]
    aead = AESGCM(os.urandom(32))
    ctv, ptv, srcv = memoryview(ct), memoryview(pt), memoryview(src)

    def enc(i: int) -> None:
        aead.encrypt_into(
            i.to_bytes(12, "big"),
            srcv[i * chunk : (i + 1) * chunk],
            b"",
            ctv[i * (chunk + 16) : (i + 1) * (chunk + 16)],
        )

    def dec(i: int) -> None:
        aead.decrypt_into(
            i.to_bytes(12, "big"),
            ctv[i * (chunk + 16) : (i + 1) * (chunk + 16)],
            b"",
            ptv[i * chunk : (i + 1) * chunk],
        )

    def rate(fn: Any) -> float:
        best = float("inf")
        with ThreadPoolExecutor(2) as pool:
            for _ in range(5):
                t = time.perf_counter()
                list(pool.map(fn, range(n)))
                best = min(best, time.perf_counter() - t)
        return size / best

    e = rate(enc)
    d = rate(dec)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return {"e": e, "d": d, "c": size / best}


def timed(fn: Any, repeats: int) -> float:
    """Best of ``repeats``: on a shared 2-core machine the minimum is the least noisy estimate,
    and both the sealed and the plain path are measured the same way."""
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return min(samples)


def best_rates(*samples: dict[str, float]) -> dict[str, float]:
    """Per rate, the best of several samples (other processes on a shared machine only slow it)."""
    return {k: max(s[k] for s in samples) for k in samples[0]}


def local_figures(sizes: list[int], between: Any = None) -> list[dict[str, Any]]:
    """Put/get timings per size; ``between()`` runs after each size (to sample the machine rates
    throughout the run, so that they see the same contention as the timings)."""
    import ray

    import ray_confidential as rc

    rows = []
    for size in sizes:
        table = table_of(size)
        nbytes = table.nbytes
        repeats = 25 if size <= 16 * MiB else 5
        # Warm both paths (allocator, thread pool, plasma pages).
        for _ in range(2):
            ray.get(ray.put(table))
            rc.get(rc.put(table, domain="bench"))
        plain_put = timed(lambda t=table: ray.put(t), repeats)
        sealed_put = timed(lambda t=table: rc.put(t, domain="bench"), repeats)
        pref = ray.put(table)
        sref = rc.put(table, domain="bench")
        plain_get = timed(lambda r=pref: ray.get(r), repeats)
        sealed_get = timed(lambda r=sref: rc.get(r), repeats)
        # Ray's own share of a sealed get: fetching the ciphertext view (no decryption).
        payload_get = timed(lambda r=sref: ray.get(r.object_ref), repeats)
        # First open of each object: no cached unwrap (a fresh HPKE open per object).
        fresh = [rc.put(table, domain="bench") for _ in range(8 if size <= 16 * MiB else 2)]
        cold_get = min(timed(lambda r=r: rc.get(r), 1) for r in fresh)
        del pref, sref, fresh
        rows.append(
            {
                "size_mib": size // MiB,
                "table_bytes": nbytes,
                "plain_put_gbps": nbytes / plain_put / 1e9,
                "sealed_put_gbps": nbytes / sealed_put / 1e9,
                "plain_get_gbps": nbytes / plain_get / 1e9,
                "sealed_get_gbps": nbytes / sealed_get / 1e9,
                "sealed_get_cold_gbps": nbytes / cold_get / 1e9,
                "payload_get_us": payload_get * 1e6,
            }
        )
        print(
            f"  {size // MiB:>4} MiB: put {rows[-1]['sealed_put_gbps']:.2f} vs plain {rows[-1]['plain_put_gbps']:.2f} GB/s; "
            f"get {rows[-1]['sealed_get_gbps']:.2f} (first open {rows[-1]['sealed_get_cold_gbps']:.2f}) "
            f"vs plain {rows[-1]['plain_get_gbps']:.2f} GB/s",
            flush=True,
        )
        if between is not None:
            between()
    return rows


def ratios(row: dict[str, Any], rates: dict[str, float]) -> dict[str, Any]:
    """The acceptance ratios of one run, and the ceilings plain Ray leaves on this machine:
    a sealed put must encrypt (rate e) and then store the bytes, which plain ``ray.put`` does at
    its measured rate p, so it cannot beat e*p/(e+p); a sealed get must fetch the ciphertext view
    (Ray's fixed ``payload_get_us``) and decrypt at d."""
    e, d, c = rates["e"], rates["d"], rates["c"]
    bound = e * c / (e + c)
    nbytes = row["table_bytes"]
    p = row["plain_put_gbps"] * 1e9
    put_ceiling = e * p / (e + p)
    get_ceiling = nbytes / (row["payload_get_us"] * 1e-6 + nbytes / d)
    return {
        **row,
        "sealed_put_vs_bound": row["sealed_put_gbps"] * 1e9 / bound,
        "sealed_get_vs_d": row["sealed_get_gbps"] * 1e9 / d,
        "sealed_get_cold_vs_d": row["sealed_get_cold_gbps"] * 1e9 / d,
        "sealed_put_vs_plain": row["sealed_put_gbps"] / row["plain_put_gbps"],
        "plain_put_vs_bound": p / bound,
        "put_ceiling_vs_bound": put_ceiling / bound,
        "sealed_put_vs_ceiling": row["sealed_put_gbps"] * 1e9 / put_ceiling,
        "get_ceiling_vs_d": get_ceiling / d,
        "sealed_get_vs_ceiling": row["sealed_get_gbps"] * 1e9 / get_ceiling,
    }


def median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per size, the median of every figure over the runs (each ratio taken within its own run)."""
    out = []
    for rows in zip(*runs, strict=True):
        out.append(
            {k: (statistics.median(r[k] for r in rows) if k != "size_mib" else rows[0][k]) for k in rows[0]}
        )
    return out


def cross_node(size: int) -> dict[str, float]:
    """Driver fetches an object created on node B: sealed (rc.get) vs plain (ray.get)."""
    import ray
    from ray.cluster_utils import Cluster

    import ray_confidential as rc
    from ray_confidential.api import _session_or_die, seal_and_put

    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "object_store_memory": 1 << 30},
    )
    c.add_node(num_cpus=1, resources={"b": 1}, object_store_memory=1 << 30)
    c.wait_for_nodes()
    rc.init(address=c.address, dev=True)
    try:
        rc.create_domain("bench")
        desc = _session_or_die().key_service.descriptor("bench")

        @ray.remote(resources={"b": 1})
        def make(sealed: bool) -> Any:
            t = table_of(size)
            return seal_and_put(t, desc) if sealed else [ray.put(t)]

        plain, sealed = [], []
        for _ in range(3):
            inner = ray.get(make.remote(False))[0]
            t = time.perf_counter()
            ray.get(inner)
            plain.append(time.perf_counter() - t)
            sref = ray.get(make.remote(True))
            t = time.perf_counter()
            rc.get(sref)
            sealed.append(time.perf_counter() - t)
        nbytes = table_of(size).nbytes
        return {
            "size_mib": size // MiB,
            "plain_gbps": nbytes / statistics.median(plain) / 1e9,
            "sealed_gbps": nbytes / statistics.median(sealed) / 1e9,
        }
    finally:
        rc.shutdown()
        ray.shutdown()
        c.shutdown()


PEAK_CHILD = r"""
import json, sys
sys.path.insert(0, {repo!r})
import ray, ray_confidential as rc
from benchmarks.object_store import table_of

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
rc.init(address={address!r}, dev=True)
rc.create_domain("bench")
table = table_of({size})
warm = rc.get(rc.put(table, domain="bench")) if {sealed} else ray.get(ray.put(table))
del warm
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
base = status("VmRSS")
out = rc.get(rc.put(table, domain="bench")) if {sealed} else ray.get(ray.put(table))
assert out.num_rows == table.num_rows
print(json.dumps({{"extra_peak_mib": status("VmHWM") - base}}))
"""


def peak_memory(address: str, size: int) -> dict[str, float]:
    """Extra peak RSS of a driver doing one (warm) put + get, beyond holding the table itself.

    Plasma pages mapped into the driver count as RSS for both paths; the sealed path adds its
    staging buffer (reused) and the decrypted output (the returned table owns it)."""
    out = {}
    for mode in ("plain", "sealed"):
        code = PEAK_CHILD.format(
            repo=str(Path(__file__).resolve().parents[1]), address=address, size=size, sealed=mode == "sealed"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
        )
        out[f"{mode}_extra_peak_mib"] = json.loads(proc.stdout.strip().splitlines()[-1])["extra_peak_mib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 16 MiB only, no cross-node run")
    parser.add_argument("--runs", type=int, default=3, help="local runs; the JSON holds their medians")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    sizes = [1 * MiB, 16 * MiB] if args.quick else [1 * MiB, 16 * MiB, 256 * MiB]

    import ray

    import ray_confidential as rc

    # A new local cluster even if another one runs on this host (it would be shared otherwise).
    rc.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=3 << 30)
    runs, all_rates = [], []
    try:
        rc.create_domain("bench")
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}: machine rates ...", flush=True)
            samples = [machine_rates()]
            print("local put/get ...", flush=True)
            rows = local_figures(sizes, between=lambda s=samples: s.append(machine_rates()))
            rates = best_rates(*samples)
            bound = rates["e"] * rates["c"] / (rates["e"] + rates["c"])
            print(
                f"  e={rates['e'] / 1e9:.2f} d={rates['d'] / 1e9:.2f} c={rates['c'] / 1e9:.2f} GB/s "
                f"(best of {len(samples)} samples in this run); two-pass bound {bound / 1e9:.2f} GB/s"
            )
            runs.append([ratios(row, rates) for row in rows])
            all_rates.append(rates)
        address = ray.get_runtime_context().gcs_address
        peak = peak_memory(address, sizes[-1])
    finally:
        rc.shutdown()
    local = median_rows(runs)
    rates = {k: statistics.median(r[k] for r in all_rates) for k in ("e", "d", "c")}
    bound = rates["e"] * rates["c"] / (rates["e"] + rates["c"])
    xnode = None if args.quick else cross_node(64 * MiB)
    result = {
        "benchmark": "object_store",
        "runs": args.runs,
        "machine": {
            "cpus": os.cpu_count(),
            "e_gbps": rates["e"] / 1e9,
            "d_gbps": rates["d"] / 1e9,
            "c_gbps": rates["c"] / 1e9,
            "two_pass_bound_gbps": bound / 1e9,
        },
        "local": local,
        "cross_node": xnode,
        "peak_memory": {"size_mib": sizes[-1] // MiB, **peak},
        "acceptance": {
            "put_vs_bound_min": min(r["sealed_put_vs_bound"] for r in local),
            "get_vs_d_min": min(r["sealed_get_vs_d"] for r in local),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for row in local:
        print(
            f"  {row['size_mib']:>4} MiB (median of {args.runs}): put {row['sealed_put_vs_bound']:.2f}x bound "
            f"(plain ray.put {row['plain_put_vs_bound']:.2f}x; ceiling {row['put_ceiling_vs_bound']:.2f}x), "
            f"get {row['sealed_get_vs_d']:.2f}x d (first open {row['sealed_get_cold_vs_d']:.2f}x; "
            f"ceiling {row['get_ceiling_vs_d']:.2f}x)"
        )
    big = local[-1]
    summary = (
        f"object_store: {big['size_mib']} MiB sealed put {big['sealed_put_vs_bound']:.2f}x of e*c/(e+c) "
        f"({big['sealed_put_vs_plain']:.2f}x plain put), sealed get {big['sealed_get_vs_d']:.2f}x of d; "
        f"min over sizes put {result['acceptance']['put_vs_bound_min']:.2f}x, get {result['acceptance']['get_vs_d_min']:.2f}x; "
        f"extra peak RSS sealed {peak['sealed_extra_peak_mib']:.0f} MiB vs plain {peak['plain_extra_peak_mib']:.0f} MiB"
        + (
            f"; cross-node 64 MiB sealed {xnode['sealed_gbps']:.2f} vs plain {xnode['plain_gbps']:.2f} GB/s"
            if xnode
            else ""
        )
    )
    print(summary)


if __name__ == "__main__":
    main()
