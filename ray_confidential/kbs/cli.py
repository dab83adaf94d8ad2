"""``ray-confidential kbs ...`` subcommands (the lead wires :func:`add_parser` into the main CLI).

    ray-confidential kbs serve --config kbs.yaml
    ray-confidential kbs serve --dev --port 50051 [--write-launch-data launch.json]

Exit codes: 0 clean shutdown (SIGTERM/SIGINT), 2 unusable configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``kbs`` (with ``serve``) to ``subparsers`` of the main parser."""
    kbs: argparse.ArgumentParser = subparsers.add_parser("kbs", help="key broker service")
    sub = kbs.add_subparsers(dest="kbs_command", required=True)
    serve = sub.add_parser("serve", help="run the key broker")
    mode = serve.add_mutually_exclusive_group(required=True)
    mode.add_argument("--config", help="production configuration (kbs.yaml, docs/kbs.md)")
    mode.add_argument(
        "--dev", action="store_true", help="development broker: plaintext on 127.0.0.1, no persistence"
    )
    serve.add_argument("--port", type=int, default=50051, help="--dev: port on 127.0.0.1 (0 = any free port)")
    serve.add_argument("--host", default="127.0.0.1", help="--dev: loopback address to bind (others refused)")
    serve.add_argument("--audit", help="--dev: audit log path (default: a new temporary directory)")
    serve.add_argument("--write-launch-data", metavar="PATH",
                       help="--dev: write the executor launch data (address, release key, simulated roots)")  # fmt: skip
    serve.add_argument(
        "--print-launch-data", action="store_true", help="--dev: print the launch data as JSON"
    )
    serve.set_defaults(func=cmd_serve)
    return kbs


def cmd_serve(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    from ray_confidential.kbs.config import DEV_BANNER, BrokerConfig, ConfigError, build, launch_data
    from ray_confidential.kbs.store import KeyStoreError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.dev:
            config = BrokerConfig.development(port=args.port, host=args.host, audit_path=args.audit)
        else:
            config = BrokerConfig.from_yaml(args.config)
        server, broker = build(config)
        server.install_signal_handlers()
        port = server.start()
    except (ConfigError, KeyStoreError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.dev:
        print(DEV_BANNER, file=sys.stderr)
        data = launch_data(config, port)
        if args.write_launch_data:
            path = Path(args.write_launch_data)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
        if args.print_launch_data:
            print(json.dumps(data), flush=True)
        print(f"dev key broker listening on {data['target']} (audit log {config.audit_path})", flush=True)
    else:
        print(f"key broker listening on {config.listen} (port {port})", flush=True)
    server.wait()
    broker.close()
    print("key broker stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m ray_confidential.kbs.cli kbs serve --dev``)."""
    parser = argparse.ArgumentParser(prog="ray-confidential")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
