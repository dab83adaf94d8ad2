"""``ray-confidential`` command line.

    ray-confidential demo                       # local confidential demo on the embedded default
    ray-confidential open FILE [--out PATH]     # owner opens exported sealed bytes off-cluster
    ray-confidential recipient new KEYFILE      # a result-recipient key pair (policy `recipients`)
    ray-confidential open FILE --recipient-key KEYFILE   # a recipient opens a result sealed to it
    ray-confidential domain list | export NAME  # development domains in the per-user state dir
    ray-confidential evidence verify --tee ...  # verify TEE evidence (see --help)

Imports are deferred to each command, so ``ray-confidential evidence ...`` starts without Ray.
Exit codes: 0 success, 1 a check failed, 2 unusable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _cmd_demo(args: argparse.Namespace) -> int:
    from ray_confidential import demo

    return demo.run(rows=args.rows)


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if hasattr(value, "num_rows"):
        return f"{type(value).__name__}: {value.num_rows:,} rows, columns {value.column_names}"
    if shape is not None:
        return f"{type(value).__name__}: shape {tuple(shape)}, dtype {getattr(value, 'dtype', '?')}"
    if isinstance(value, bytes):
        return f"bytes: {len(value):,} bytes"
    return f"{type(value).__name__}: {json.dumps(value)[:200]}"


def _write(value: Any, out: Path) -> None:
    import numpy as np
    import pyarrow as pa

    if isinstance(value, (pa.Table, pa.RecordBatch)):
        with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_file(sink, value.schema) as writer:
            writer.write(value)
    elif isinstance(value, np.ndarray):
        np.save(out, value, allow_pickle=False)
    elif isinstance(value, bytes):
        out.write_bytes(value)
    else:
        try:
            out.write_text(json.dumps(value))
        except TypeError:
            raise ValueError(f"cannot write a {type(value).__name__} to a file; use the Python API") from None


def _cmd_open(args: argparse.Namespace) -> int:
    from ray_confidential.errors import ConfidentialError
    from ray_confidential.keyservice import DevKeyService
    from ray_confidential.sealed import open_as_recipient, open_sealed

    path = Path(args.file)
    if not path.is_file():
        print(f"error: {path} is not a file", file=sys.stderr)
        return 2
    recipient_key = None
    if args.recipient_key:
        try:
            recipient_key = _load_recipient_key(Path(args.recipient_key))
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: unusable recipient key file {args.recipient_key}: {exc}", file=sys.stderr)
            return 2
    try:
        if recipient_key is not None:
            value = open_as_recipient(path.read_bytes(), recipient_key)
        else:
            value = open_sealed(path.read_bytes(), DevKeyService(args.state_dir))
    except ConfidentialError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(_describe(value))
    if args.out:
        _write(value, Path(args.out))
        print(f"wrote {args.out}")
    return 0


def _load_recipient_key(path: Path) -> Any:
    from ray_confidential.crypto.hpke import PrivateKeyHandle

    data = json.loads(path.read_text())
    return PrivateKeyHandle(str(data["suite"]), bytes.fromhex(str(data["private_key"])))


def _cmd_recipient(args: argparse.Namespace) -> int:
    """Write a new recipient private key (mode 0600, never overwritten) and print its public half."""
    import os

    from ray_confidential.crypto import hpke

    key = hpke.generate_private_key(args.suite)
    body = json.dumps({"suite": key.suite, "private_key": key.export_private_bytes().hex()})
    try:
        fd = os.open(args.keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"error: {args.keyfile} exists; a recipient key is never overwritten", file=sys.stderr)
        return 2
    with os.fdopen(fd, "w") as f:
        f.write(body)
    public = key.public_key()
    print(f"{public.suite}:{public.raw.hex()}")
    print(f"private key in {args.keyfile} (mode 0600); list the line above in a domain policy's recipients",
          file=sys.stderr)  # fmt: skip
    return 0


def _cmd_domain(args: argparse.Namespace) -> int:
    from ray_confidential.keyservice import DevKeyService

    service = DevKeyService(args.state_dir)
    if args.domain_cmd == "list":
        for name in service.domains():
            desc = service.descriptor(name)
            print(f"{name}\tversion {desc.version}\t{desc.public_key.suite}\tpolicy {desc.policy_hash[:16]}")
        return 0
    try:
        descs = [service.descriptor(n).to_dict() for n in args.names]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"domains": descs}, indent=2))
    return 0


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, plugin subcommands other than ``only`` stay unbuilt."""
    parser = argparse.ArgumentParser(prog="ray-confidential", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the local confidential demo (local Ray + dev key service)")
    demo.add_argument("--rows", type=int, default=200_000, help="rows in the demo table")
    demo.set_defaults(func=_cmd_demo)

    opener = sub.add_parser("open", help="open exported sealed bytes as the domain owner")
    opener.add_argument("file")
    opener.add_argument("--out", help="write the plaintext (Arrow IPC file, .npy, raw bytes or JSON)")
    opener.add_argument("--state-dir", help="development key state directory (default: per-user)")
    opener.add_argument("--recipient-key", help="open as a policy-listed recipient with this key file "
                        "(from `ray-confidential recipient new`)")  # fmt: skip
    opener.set_defaults(func=_cmd_open)

    recipient = sub.add_parser("recipient", help="result-recipient keys (domain policy `recipients`)")
    rsub = recipient.add_subparsers(dest="recipient_cmd", required=True)
    new_key = rsub.add_parser("new", help="create a key file (0600) and print its public key 'suite:hex'")
    new_key.add_argument("keyfile")
    new_key.add_argument("--suite", default="x25519", choices=["x25519", "mlkem768-x25519"])
    new_key.set_defaults(func=_cmd_recipient)

    domain = sub.add_parser("domain", help="development domains held in the per-user state directory")
    dsub = domain.add_subparsers(dest="domain_cmd", required=True)
    dsub.add_parser("list", help="list domains").set_defaults(func=_cmd_domain)
    exp = dsub.add_parser("export", help="print published descriptors (public keys) as JSON")
    exp.add_argument("names", nargs="+")
    exp.set_defaults(func=_cmd_domain)
    for p in dsub.choices.values():
        p.add_argument("--state-dir", help="development key state directory (default: per-user)")

    for name, (module_name, help_text) in _PLUGINS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text)  # listed in --help; built when invoked
            continue
        module = _plugin(module_name)
        if module is None:
            continue
        module.add_parser(sub)
    return parser


# Subcommands whose modules are imported only when invoked (``evidence`` must start without Ray or
# grpc). Each module provides ``add_parser(subparsers)`` setting ``func`` on its parsers.
_PLUGINS: dict[str, tuple[str, str]] = {
    "evidence": ("ray_confidential.attestation.cli", "verify TEE evidence"),
    "kbs": ("ray_confidential.kbs.cli", "the key broker service"),
    "audit": ("ray_confidential.kbs.audit_cli", "verify the broker's audit log"),
    "executor": ("enclave_actors.cli", "the enclave executor daemon (started by the node image)"),
    "pools": ("scheduler.cli", "render node pools for the Ray cluster launcher or KubeRay"),
    "status": ("scheduler.status_cli", "nodes, pools, TEE kinds and executor attestation state"),
}


def _plugin(module_name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None  # that part is not installed in this build
        raise


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in _PLUGINS else ("" if first else None))
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.error(f"{args.command}: this part is not installed or needs a subcommand")
    return int(func(args))


if __name__ == "__main__":
    sys.exit(main())
