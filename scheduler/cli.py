"""``ray-confidential pools ...`` subcommands (the lead wires :func:`add_parser` into the main CLI).

    ray-confidential pools validate POOLS.yaml
    ray-confidential pools render --format ray-up POOLS.yaml > cluster.yaml
    ray-confidential pools render --format kuberay POOLS.yaml | kubectl apply -f -

Exit codes: 0 success, 2 unusable input (the message names the pool and field).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _cmd_validate(args: argparse.Namespace) -> int:
    from scheduler.pools import PoolsConfig

    try:
        cfg = PoolsConfig.from_yaml(Path(args.pools).read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in cfg.pools:
        print(
            f"{p.name}\t{p.provider}/{p.region}\ttee={p.tee}\tgpu_cc={str(p.gpu_cc).lower()}\t"
            f"nodes={p.min_nodes}..{p.max_nodes}\tresidency={p.residency_basis}"
        )
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from scheduler.render import cmd_render

    return cmd_render(args)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``pools`` (``validate``, ``render``) to the ``ray-confidential`` subparsers."""
    pools: argparse.ArgumentParser = subparsers.add_parser(
        "pools", help="node pools: validate a pools file, render cluster configs"
    )
    psub = pools.add_subparsers(dest="pools_cmd", required=True)
    val = psub.add_parser("validate", help="check a pools file and print one line per pool")
    val.add_argument("pools", metavar="POOLS.yaml")
    val.set_defaults(func=_cmd_validate)
    ren = psub.add_parser("render", help="render a Ray cluster-launcher config or a KubeRay RayCluster")
    ren.add_argument("--format", required=True, choices=("ray-up", "kuberay"))
    ren.add_argument("--out", help="write to this file instead of stdout")
    ren.add_argument("pools", metavar="POOLS.yaml")
    ren.set_defaults(func=_cmd_render)
    return pools


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m scheduler.cli pools render ...``) until the lead wires it in."""
    parser = argparse.ArgumentParser(prog="ray-confidential")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
