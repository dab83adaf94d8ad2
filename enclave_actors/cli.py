"""``ray-confidential executor``: run the enclave executor daemon of this node.

    ray-confidential executor --socket /run/ray-confidential/executor.sock --tee sev-snp \\
        --node-id HEX --launch-data /run/ray-confidential/launch-data.json
    ray-confidential executor ... --kbs kbs.example:8443 --release-key release.pem --ca-cert kbs-ca.pem \\
        --cluster-id prod-1

The node image starts it (not Ray); in development ``rc.init`` and ``testing.add_tee_node`` do, with
launch data from the embedded development broker (``ray_confidential.kbs.embedded``). Keys come only
from the key broker over gRPC (:class:`~enclave_actors.keys.KBSKeyReleaser`), whose address, release
key and CA come from these flags or the 0600 launch-data file, never from Ray. Wire into
``ray_confidential.cli`` with :func:`add_parser`; ``python -m enclave_actors.cli executor ...`` works
on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``executor`` subcommand to ``subparsers`` (an ``argparse`` subparsers action)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "executor", help="run the enclave executor daemon of this TEE node"
    )
    p.add_argument("--socket", required=True, help="Unix socket for shims (created mode 0660)")
    p.add_argument("--socket-mode", default="660", help="octal mode of the shim socket (default 660)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="group of the shim socket (name or id): the Ray user's, when the executor runs as "
                        "another user (default: the executor's own)")  # fmt: skip
    p.add_argument("--tee", required=True, choices=("sev-snp", "tdx", "sgx", "nitro"))
    p.add_argument("--node-id", required=True,
                   help="hex Ray node id of this node, or auto: wait for `ray start` on this host and take the "
                        "id its session directory names (enclave_actors/local_node.py)")  # fmt: skip
    p.add_argument("--ray-session-dir", type=Path, default=None, metavar="DIR",
                   help="with --node-id auto: Ray's session directory (default /tmp/ray/session_latest)")  # fmt: skip
    p.add_argument("--node-id-wait", type=float, default=600.0, metavar="S",
                   help="with --node-id auto: how long to wait for Ray to start here (default 600 s)")  # fmt: skip
    p.add_argument(
        "--cluster-id", help="cluster identity bound into evidence (default: launch data, else dev)"
    )
    p.add_argument("--pool", default="")
    p.add_argument("--region", default="")
    p.add_argument("--attestation", default="auto",
                   choices=("auto", "simulated", "configfs-tsm", "sev-guest", "gramine", "nsm"),
                   help="evidence source: auto = the simulated device when the launch data has development "
                        "roots, else this TEE's guest interface (configfs-tsm, /dev/sev-guest, Gramine, "
                        "/dev/nsm; docs/collectors.md)")  # fmt: skip
    p.add_argument("--privlevel", type=int, default=0, choices=range(4), metavar="0-3",
                   help="SEV-SNP: the VMPL the executor runs at, reported in its evidence (default 0)")  # fmt: skip
    p.add_argument("--tee-cert", type=Path, action="append", default=[], metavar="FILE",
                   help="SEV-SNP: VCEK/VLEK chain certificate (DER or PEM), repeatable, for hosts that "
                        "provide no certificate table")  # fmt: skip
    p.add_argument("--device-socket", help="simulated attestation device socket (default: SOCKET.device)")
    p.add_argument("--launch-data", type=Path,
                   help="0600 JSON file: broker target, pinned release key, CA, cluster id, simulated roots")  # fmt: skip
    p.add_argument("--kbs", metavar="HOST:PORT", help="the key broker (instead of --launch-data)")
    p.add_argument("--release-key", type=Path, metavar="PEM", help="the broker's release public key (pinned)")
    p.add_argument("--ca-cert", type=Path, metavar="PEM",
                   help="CA of the broker's TLS certificate (omit only for a loopback development broker)")  # fmt: skip
    p.add_argument(
        "--simulated-launch-data",
        type=Path,
        help="DEVELOPMENT: DevRootOfTrust launch data (with --kbs); enables the simulated device",
    )
    p.add_argument("--untrusted-device", action="store_true",
                   help="TESTS: sign evidence under a root nobody trusts (a node that lies about being a TEE)")  # fmt: skip
    p.add_argument("--measurement", metavar="HEX",
                   help="TESTS: the simulated TEE's measurement (default: the kind's default measurement)")  # fmt: skip
    p.add_argument("--debug-tee", action="store_true", help="TESTS: the simulated TEE reports debug mode")
    p.add_argument("--poll-interval", type=float, default=5.0, help="revocation poll interval (<= 10 s)")
    p.add_argument("--broker-wait", type=float, default=15.0, help="seconds before failing closed")
    p.add_argument("--call-timeout", type=float, default=300.0)
    p.add_argument("--memory-limit-mb", type=int, default=0, help="RLIMIT_AS per worker (0 = none)")
    p.add_argument("--workers-per-bundle", type=_positive_int, default=None, metavar="N",
                   help="calls of one (domains, bundle) pair run in parallel in at most N worker "
                        "subprocesses (default: CPUs, at most 16)")  # fmt: skip
    p.add_argument("--die-with-parent", action="store_true", help="exit when the starting process exits")
    p.set_defaults(func=run_executor)
    return p


def _launch_data(args: argparse.Namespace) -> Any:
    """The broker connection from ``--launch-data`` or ``--kbs``/``--release-key``/``--ca-cert``."""
    from enclave_actors.keys import LaunchData

    if args.launch_data is not None:
        if args.kbs or args.release_key:
            raise ValueError("pass either --launch-data or --kbs/--release-key/--ca-cert, not both")
        data = LaunchData.from_file(args.launch_data)
        if args.cluster_id and args.cluster_id != data.cluster_id:
            raise ValueError("--cluster-id differs from the launch data's cluster id")
        return data
    if not args.kbs or args.release_key is None:
        raise ValueError("no key broker configured: pass --launch-data FILE, or --kbs HOST:PORT with "
                         "--release-key PEM (and --ca-cert PEM unless the broker is on 127.0.0.1)")  # fmt: skip
    roots = args.simulated_launch_data.read_bytes() if args.simulated_launch_data else None
    return LaunchData(target=args.kbs, release_public_key=args.release_key.read_bytes(),
                      ca_cert=args.ca_cert.read_bytes() if args.ca_cert else None,
                      cluster_id=args.cluster_id or "dev", dev_roots=roots)  # fmt: skip


def _group_id(group: str | None) -> int | None:
    """The id of ``group`` (a name or a number), None for None.

    Raises:
        ValueError: no such group.
    """
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"--socket-group: no group {group!r}") from None


def _evidence_source(args: argparse.Namespace, launch: Any) -> tuple[Callable[[Any], Any], Any]:
    """``(evidence(binding), simulated device or None)`` for ``--attestation``: the simulated device
    when the launch data carries development roots (``auto`` or ``simulated``), else this TEE's guest
    interface (``enclave_actors.hardware``).

    Raises:
        ValueError: the choice cannot serve this node (no interface, no development roots, ...).
        OSError: a certificate file cannot be read.
    """
    if args.attestation == "simulated" or (args.attestation == "auto" and launch.dev_roots is not None):
        if launch.dev_roots is None:
            raise ValueError("--attestation simulated needs development roots (launch data dev_roots or "
                             "--simulated-launch-data)")  # fmt: skip
        from enclave_actors.device import SimulatedDevice, request_evidence
        from ray_confidential.testing.simulated import DevRootOfTrust, SimulatedTEE

        roots = DevRootOfTrust.from_launch_data(launch.dev_roots)
        tee = SimulatedTEE(args.tee, root=f"untrusted-{args.node_id}" if args.untrusted_device else roots,
                           measurement=bytes.fromhex(args.measurement) if args.measurement else None,
                           debug=args.debug_tee)  # fmt: skip
        device_path = args.device_socket or args.socket + ".device"
        device = SimulatedDevice(device_path, tee)
        device.start()
        return (lambda binding: request_evidence(device_path, binding)), device
    from enclave_actors.hardware import hardware_evidence

    certs = tuple(path.read_bytes() for path in args.tee_cert)
    return hardware_evidence(args.tee, args.attestation, privlevel=args.privlevel, certs=certs), None


def run_executor(args: argparse.Namespace) -> int:
    from enclave_actors.daemon import Executor, ExecutorServer, Limits
    from enclave_actors.harden import die_with_parent, harden
    from enclave_actors.keys import KBSKeyReleaser, NodeFacts

    logging.basicConfig(level=logging.INFO, format="%(asctime)s executor %(levelname)s %(message)s")
    if args.die_with_parent:
        die_with_parent(signal.SIGTERM)
    harden()
    try:
        group = _group_id(args.socket_group)
    except ValueError as exc:
        print(f"executor: {exc}", file=sys.stderr)
        return 2
    if args.node_id == "auto":
        from enclave_actors.local_node import DEFAULT_SESSION_DIR, wait_for_local_node_id

        try:
            args.node_id = wait_for_local_node_id(args.ray_session_dir or DEFAULT_SESSION_DIR,
                                                  wait_s=args.node_id_wait)  # fmt: skip
        except (TimeoutError, ValueError) as exc:
            print(f"executor: --node-id auto: {exc}", file=sys.stderr)
            return 2
        logging.getLogger(__name__).info("executor: this host's Ray node is %s", args.node_id)
    try:
        launch = _launch_data(args)
    except (OSError, ValueError) as exc:
        print(f"executor: {exc}", file=sys.stderr)
        return 2
    facts = NodeFacts(
        tee=args.tee, node_id=args.node_id, cluster_id=launch.cluster_id, pool=args.pool, region=args.region
    )
    try:
        evidence, device = _evidence_source(args, launch)
    except (OSError, ValueError) as exc:
        print(f"executor: {exc}", file=sys.stderr)
        return 2
    try:
        releaser = KBSKeyReleaser(
            lambda: launch.connect(timeout=min(5.0, max(0.5, args.broker_wait))),
            facts=facts,
            evidence=evidence,
            owner_ca=launch.owner_ca,
        )
    except ValueError as exc:
        print(f"executor: {exc}", file=sys.stderr)
        if device is not None:
            device.close()
        return 2
    limits = Limits(call_timeout=args.call_timeout, memory_limit_bytes=args.memory_limit_mb << 20)
    if args.workers_per_bundle is not None:
        limits = dataclasses.replace(limits, workers_per_bundle=args.workers_per_bundle)
    executor = Executor(
        releaser,
        facts,
        limits=limits,
        broker_wait=args.broker_wait,
    )
    server = ExecutorServer(executor, args.socket, mode=int(args.socket_mode, 8), poll_interval=args.poll_interval,
                            group=group)  # fmt: skip

    def _stop(signum: int, frame: Any) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.start()
    logging.getLogger(__name__).info(
        "executor ready on %s (pid %d, tee %s)", args.socket, os.getpid(), args.tee
    )
    server.wait()
    if device is not None:
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
