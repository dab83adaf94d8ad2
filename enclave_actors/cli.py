"""``ray-confidential executor``: run the enclave executor daemon of this node.

    ray-confidential executor --socket /run/ray-confidential/executor.sock --tee sev-snp \\
        --node-id HEX --cluster-id ID --simulated-launch-data FILE --dev-key-state DIR

The node image starts it (not Ray); in tests ``ray_confidential.testing.add_tee_node`` does.
Until the key broker client is wired, the only releaser is the DEVELOPMENT
``UnsafeLocalKeyReleaser`` (``--dev-key-state``). Wire into ``ray_confidential.cli`` with
:func:`add_parser`; ``python -m enclave_actors.cli executor ...`` works on its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``executor`` subcommand to ``subparsers`` (an ``argparse`` subparsers action)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "executor", help="run the enclave executor daemon of this TEE node"
    )
    p.add_argument("--socket", required=True, help="Unix socket for shims (created mode 0660)")
    p.add_argument("--socket-mode", default="660", help="octal mode of the shim socket (default 660)")
    p.add_argument("--tee", required=True, choices=("sev-snp", "tdx", "sgx", "nitro"))
    p.add_argument("--node-id", required=True, help="hex Ray node id of this node")
    p.add_argument("--cluster-id", default="dev", help="cluster identity bound into evidence")
    p.add_argument("--pool", default="")
    p.add_argument("--region", default="")
    p.add_argument("--device-socket", help="simulated attestation device socket (default: SOCKET.device)")
    p.add_argument(
        "--simulated-launch-data",
        type=Path,
        help="DEVELOPMENT: file holding DevRootOfTrust launch data; enables the simulated device",
    )
    p.add_argument("--untrusted-device", action="store_true",
                   help="TESTS: sign evidence under a root nobody trusts (a node that lies about being a TEE)")  # fmt: skip
    p.add_argument(
        "--dev-key-state", type=Path, help="DEVELOPMENT: DevKeyService state dir (UnsafeLocalKeyReleaser)"
    )
    p.add_argument("--audit-log", type=Path, help="JSON-lines audit log of grants and denials")
    p.add_argument("--token-lifetime", type=float, default=300.0)
    p.add_argument("--poll-interval", type=float, default=5.0, help="revocation poll interval (<= 10 s)")
    p.add_argument("--broker-wait", type=float, default=15.0, help="seconds before failing closed")
    p.add_argument("--call-timeout", type=float, default=300.0)
    p.add_argument("--memory-limit-mb", type=int, default=0, help="RLIMIT_AS per worker (0 = none)")
    p.add_argument("--die-with-parent", action="store_true", help="exit when the starting process exits")
    p.set_defaults(func=run_executor)
    return p


def run_executor(args: argparse.Namespace) -> int:
    from enclave_actors.daemon import Executor, ExecutorServer, Limits
    from enclave_actors.device import SimulatedDevice, request_evidence
    from enclave_actors.harden import die_with_parent, harden
    from enclave_actors.keys import NodeFacts, UnsafeLocalKeyReleaser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s executor %(levelname)s %(message)s")
    if args.die_with_parent:
        die_with_parent(signal.SIGTERM)
    harden()
    facts = NodeFacts(
        tee=args.tee, node_id=args.node_id, cluster_id=args.cluster_id, pool=args.pool, region=args.region
    )
    device_path = args.device_socket or args.socket + ".device"
    device = None
    if args.simulated_launch_data is None:
        print("executor: no attestation device configured (hardware collectors: see docs/executor.md)",
              file=sys.stderr)  # fmt: skip
        return 2
    from ray_confidential.testing.simulated import DevRootOfTrust, SimulatedTEE

    data = args.simulated_launch_data.read_bytes()
    roots = DevRootOfTrust.from_launch_data(data)
    tee = SimulatedTEE(args.tee, root=f"untrusted-{args.node_id}" if args.untrusted_device else roots)
    device = SimulatedDevice(device_path, tee)
    device.start()
    if args.dev_key_state is None:
        print("executor: no key broker configured; pass --dev-key-state for development", file=sys.stderr)
        return 2
    releaser = UnsafeLocalKeyReleaser(
        args.dev_key_state,
        facts=facts,
        evidence=lambda binding: request_evidence(device_path, binding),
        trust=roots.trust_config([args.tee]),
        token_lifetime=args.token_lifetime,
        audit_path=args.audit_log,
    )
    executor = Executor(
        releaser,
        facts,
        limits=Limits(call_timeout=args.call_timeout, memory_limit_bytes=args.memory_limit_mb << 20),
        broker_wait=args.broker_wait,
    )
    server = ExecutorServer(
        executor, args.socket, mode=int(args.socket_mode, 8), poll_interval=args.poll_interval
    )

    def _stop(signum: int, frame: Any) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.start()
    logging.getLogger(__name__).info(
        "executor ready on %s (pid %d, tee %s)", args.socket, os.getpid(), args.tee
    )
    server.wait()
    device.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ray-confidential")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
