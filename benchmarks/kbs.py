"""Key broker throughput and latency over loopback gRPC with TLS (issue 4 "Benchmark").

    python benchmarks/kbs.py [--seconds 4] [--kind tdx] [--out benchmarks/results/kbs.json]

The broker runs in a child process (its own interpreter: a second core, its own GIL) with a
throwaway TLS CA, the real audit log on disk (group commit, fsync) and rate limits off; the load
generator runs simulated executors in this process. One *round trip* = GetChallenge + evidence
generation + Attest + Unwrap (a fresh executor key, token and release each time).

Measured: closed loop with 1, 4, 16, 64 clients (round trips/s, mean latency, broker CPU ms and load
generator CPU ms per release); open loop at a fixed arrival rate (p50, p99 from the scheduled start,
so queueing counts); cached-token unwraps/s (16 threads, one token); broker memory per 10,000
outstanding sessions (challenges, tracemalloc). Writes JSON and prints a one-line summary. Goals:
>= 300 round trips/s at 16 clients; open loop 150/s p99 <= 20 ms; cached unwraps >= 2,000/s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import warnings
from concurrent import futures
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", category=UserWarning)

from ray_confidential.kbs.challenges import ChallengeStore  # noqa: E402
from ray_confidential.kbs.client import KBSClient  # noqa: E402
from ray_confidential.testing.simulated import DevRootOfTrust  # noqa: E402
from tests.kbs.broker_env import PKI, Executor, pinned_policy  # noqa: E402

DOMAIN = "bench"


def _serve(conn: Any, pki_pem: dict[str, Any], launch: bytes, audit_dir: str) -> None:
    """Child: a broker with TLS + mTLS owners, real audit log, no rate limit; reports ports and keys."""
    from ray_confidential.kbs.audit import AuditLog
    from ray_confidential.kbs.broker import Broker, BrokerSettings
    from ray_confidential.kbs.config import public_pem
    from ray_confidential.kbs.server import KBSServer, TLSFiles
    from ray_confidential.kbs.store import MemoryStore
    from ray_confidential.kbs.tokens import new_signing_key

    trust = DevRootOfTrust.from_launch_data(launch).trust_config()
    audit = AuditLog(Path(audit_dir) / "audit.log", new_signing_key(), group_commit=True)
    release = new_signing_key()
    broker = Broker(BrokerSettings(env="dev", issuer="bench", audience="bench", challenge_ttl=30),
                    store=MemoryStore(), audit=audit, trust=trust, token_key=new_signing_key(),
                    release_key=release)  # fmt: skip
    tls = TLSFiles(pki_pem["cert"], pki_pem["key"], pki_pem["ca"])
    server = KBSServer(broker, address="127.0.0.1:0", tls=tls, owner_address="127.0.0.1:0", max_workers=32)
    server.start()
    conn.send({"port": server.port, "owner_port": server.owner_port, "release": public_pem(release)})
    conn.recv()  # any message: stop
    server.stop(1)
    broker.close()


def _cpu(pid: int) -> float:
    """utime + stime of ``pid``, seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _round_trip(client: KBSClient, kind: str, blob: bytes) -> None:
    ex = Executor.create(kind)
    token = ex.attest(client, domains=(DOMAIN,))
    client.unwrap(token, blob, ex.key)


def closed_loop(clients: list[KBSClient], kind: str, blob: bytes, seconds: float, pid: int) -> dict[str, Any]:
    stop = time.monotonic() + seconds
    counts, latencies = [0] * len(clients), []
    lock = threading.Lock()

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            _round_trip(clients[i], kind, blob)
            dt = time.perf_counter() - t0
            counts[i] += 1
            with lock:
                latencies.append(dt)

    s0, c0, w0 = _cpu(pid), time.process_time(), time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, n = time.monotonic() - w0, sum(counts)
    return {
        "clients": len(clients),
        "round_trips": n,
        "per_second": n / wall,
        "mean_latency_ms": 1e3 * statistics.fmean(latencies),
        "p99_latency_ms": 1e3 * sorted(latencies)[int(0.99 * (len(latencies) - 1))],
        "broker_cpu_ms_per_release": 1e3 * (_cpu(pid) - s0) / n,
        "loadgen_cpu_ms_per_release": 1e3 * (time.process_time() - c0) / n,
    }


def open_loop(
    clients: list[KBSClient], kind: str, blob: bytes, rate: float, seconds: float
) -> dict[str, Any]:
    total = int(rate * seconds)
    latencies: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter() + 0.05

    def one(i: int) -> None:
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        _round_trip(clients[i % len(clients)], kind, blob)
        with lock:
            latencies.append(time.perf_counter() - scheduled)

    with futures.ThreadPoolExecutor(max_workers=len(clients)) as pool:
        list(pool.map(one, range(total)))
    lat = sorted(latencies)
    return {
        "rate_per_second": rate,
        "requests": total,
        "p50_ms": 1e3 * lat[len(lat) // 2],
        "p99_ms": 1e3 * lat[int(0.99 * (len(lat) - 1))],
    }


def cached_unwraps(
    clients: list[KBSClient], kind: str, blob: bytes, seconds: float, pid: int
) -> dict[str, Any]:
    ex = Executor.create(kind)
    token = ex.attest(clients[0], domains=(DOMAIN,))
    stop = time.monotonic() + seconds
    counts = [0] * len(clients)

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            clients[i].unwrap(token, blob, ex.key)
            counts[i] += 1

    s0, w0 = _cpu(pid), time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n = sum(counts)
    return {"threads": len(clients), "unwraps": n, "per_second": n / (time.monotonic() - w0),
            "broker_cpu_ms_per_unwrap": 1e3 * (_cpu(pid) - s0) / n}  # fmt: skip


def memory_per_10k_sessions() -> dict[str, Any]:
    store = ChallengeStore(ttl=30, clock=time.time, max_outstanding=20_000)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(10_000):
        store.issue()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "outstanding_challenges": len(store),
        "bytes": after - before,
        "bytes_per_session": (after - before) / 1e4,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--kind", default="tdx", choices=["sev-snp", "tdx", "sgx", "nitro"])
    parser.add_argument("--open-rate", type=float, default=150.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kbs.json"))
    args = parser.parse_args()

    pki = PKI.create(owners=("owner",))
    roots = DevRootOfTrust.for_process()
    launch = roots.to_launch_data([args.kind])
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    with tempfile.TemporaryDirectory(prefix="kbs-bench-") as audit_dir:
        proc = ctx.Process(target=_serve, args=(child, {"cert": pki.server.cert_chain, "key": pki.server.private_key,
                                                         "ca": pki.ca_pem}, launch, audit_dir))  # fmt: skip
        proc.start()
        info = parent.recv()
        assert proc.pid is not None
        pid = proc.pid
        target = f"127.0.0.1:{info['port']}"
        cert, key = pki.owners["owner"]
        owner = KBSClient(f"127.0.0.1:{info['owner_port']}", release_public_key=info["release"],
                          ca_cert=pki.ca_pem, client_cert=cert, client_key=key)  # fmt: skip
        owner.create_domain(DOMAIN, pinned_policy(args.kind))
        from ray_confidential.sealed.format import DomainPublicKey, seal

        d = owner.descriptor(DOMAIN)
        blob = bytes(
            seal(b"x" * 1024, DomainPublicKey(domain=DOMAIN, version=d.version, public_key=d.public_key))
        )
        pool = [KBSClient(target, release_public_key=info["release"], ca_cert=pki.ca_pem, timeout=30)
                for _ in range(64)]  # fmt: skip
        for c in pool[:4]:
            _round_trip(c, args.kind, blob)  # warm up channels and caches
        results: dict[str, Any] = {"closed_loop": []}
        for n in (1, 4, 16, 64):
            results["closed_loop"].append(closed_loop(pool[:n], args.kind, blob, args.seconds, pid))
        results["open_loop"] = open_loop(pool, args.kind, blob, args.open_rate, args.seconds)
        results["cached_token_unwraps"] = cached_unwraps(pool[:16], args.kind, blob, args.seconds, pid)
        results["memory_per_10k_sessions"] = memory_per_10k_sessions()
        parent.send("stop")
        proc.join(30)
        for c in [*pool, owner]:
            c.close()
    results["config"] = {"kind": args.kind, "seconds": args.seconds, "tls": True, "audit": "file, group commit",
                         "cpus": os.cpu_count(), "python": platform.python_version(),
                         "machine": platform.machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    results["goals"] = {
        "closed_16_ge_300_per_s": results["closed_loop"][2]["per_second"] >= 300,
        "open_150_p99_le_20ms": results["open_loop"]["p99_ms"] <= 20,
        "cached_unwraps_ge_2000_per_s": results["cached_token_unwraps"]["per_second"] >= 2000,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    cl = {r["clients"]: r for r in results["closed_loop"]}
    print(
        f"kbs ({args.kind}, TLS, {os.cpu_count()} CPUs): closed loop "
        + ", ".join(f"{n}c {cl[n]['per_second']:.0f}/s" for n in cl)
        + f"; broker CPU {cl[16]['broker_cpu_ms_per_release']:.2f} ms/release"
        + f"; open {args.open_rate:.0f}/s p50 {results['open_loop']['p50_ms']:.1f} ms p99 {results['open_loop']['p99_ms']:.1f} ms"
        + f"; cached unwraps {results['cached_token_unwraps']['per_second']:.0f}/s"
        + f"; {results['memory_per_10k_sessions']['bytes'] / 1e6:.1f} MB per 10k sessions"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
