"""``ray-confidential status``: nodes, pools, TEE kinds and executor attestation state, as a table.

    ray-confidential status [--address ADDR] [--json] [--statement-key PEM --cluster-id ID]

Each Ray node is listed with its self-declared labels (``ray-confidential.io/tee|pool|region``) and,
from the trust registry actor, whether its executor holds a routing token (``attested``) and until
when. Registry statements are verified against the pinned statement key (``--statement-key`` or
``$RAY_CONFIDENTIAL_STATEMENT_KEY``, with ``--cluster-id`` / ``$RAY_CONFIDENTIAL_CLUSTER_ID``);
without a pin the attestation column says ``unverified``: the registry actor is an ordinary Ray
actor, and what it says proves nothing until checked against the broker's key.

Exit codes: 0 success, 2 cannot connect or a bad key file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from scheduler.calls import CLUSTER_ID_ENV, STATEMENT_KEY_ENV
from scheduler.labels import POOL_LABEL, REGION_LABEL, TEE_LABEL


def _statements(verifier: Any) -> tuple[dict[str, dict[str, Any]], str | None, dict[str, Any] | None]:
    """node id -> admit body (newest), an error text if the registry could not be read, and the broker
    feed the registry follows (None: statements are submitted to it, e.g. by a development broker)."""
    import ray

    from scheduler.registry import SignedStatement, StatementRejected
    from scheduler.registry_actor import REGISTRY_ACTOR_NAME, REGISTRY_NAMESPACE

    try:
        actor = ray.get_actor(REGISTRY_ACTOR_NAME, namespace=REGISTRY_NAMESPACE)
        raw: list[bytes] = ray.get(actor.statements.remote(), timeout=10)
        following: dict[str, Any] | None = ray.get(actor.following.remote(), timeout=10)
    except Exception as exc:
        return {}, f"trust registry unavailable: {type(exc).__name__}", None
    out: dict[str, dict[str, Any]] = {}
    for data in raw:
        try:
            st = SignedStatement.from_bytes(data)
            if verifier is not None:
                body = verifier.verify(st, now=0, fresh=False)
                entry = {"tee": body.tee, "pool": body.pool, "region": body.region, "seq": body.seq,
                         "measurement": body.measurement, "exp": body.exp, "verified": True}  # fmt: skip
            else:
                p = json.loads(st.payload)
                entry = {k: p.get(k) for k in ("tee", "pool", "region", "seq", "measurement", "exp")}
                entry["verified"] = False
        except (StatementRejected, ValueError, KeyError):
            continue  # does not verify under the pin: not attested, whatever the actor says
        node = str(json.loads(st.payload).get("node_id"))
        if entry.get("exp", 0) and (node not in out or entry["seq"] > out[node]["seq"]):
            out[node] = entry
    return out, None, following


def collect(verifier: Any, *, now: float | None = None) -> dict[str, Any]:
    """The status document (``--json`` prints it): nodes with labels and attestation state."""
    import ray

    t = time.time() if now is None else now
    admits, error, following = _statements(verifier)
    nodes = []
    for n in ray.nodes():  # type: ignore[no-untyped-call]
        labels = n.get("Labels") or {}
        node_id = str(n["NodeID"])
        admit = admits.get(node_id)
        live = admit is not None and float(admit["exp"]) > t
        admit = admit if live else None
        state = "no" if admit is None else ("attested" if admit["verified"] else "unverified")
        nodes.append({
            "node_id": node_id,
            "alive": bool(n.get("Alive")),
            "labels": {"tee": labels.get(TEE_LABEL), "pool": labels.get(POOL_LABEL),
                       "region": labels.get(REGION_LABEL)},
            "attestation": state,
            "attested": None if admit is None else {k: admit[k] for k in ("tee", "pool", "region", "measurement")},
            "expires_at": None if admit is None else int(admit["exp"]),
        })  # fmt: skip
    pools: dict[str, int] = {}
    for e in nodes:
        a: Any = e["attested"]
        if a and e["alive"]:
            key = f"{a['tee']}/{a['pool']}/{a['region']}"
            pools[key] = pools.get(key, 0) + 1
    return {"verified_with": None if verifier is None else verifier.fingerprint, "registry_error": error,
            "registry_follows": following, "nodes": nodes, "attested_by_pool": pools, "now": int(t)}  # fmt: skip


def render(doc: dict[str, Any]) -> str:
    """The human-readable table."""
    rows = [("NODE", "ALIVE", "TEE(label)", "POOL", "REGION", "ATTESTATION", "TEE(attested)", "MEASUREMENT",
             "EXPIRES")]  # fmt: skip
    for e in sorted(doc["nodes"], key=lambda e: (not e["alive"], e["node_id"])):
        a, lab = e["attested"] or {}, e["labels"]
        left = "-" if e["expires_at"] is None else f"in {max(0, e['expires_at'] - doc['now'])} s"
        rows.append((e["node_id"][:12], "yes" if e["alive"] else "no", lab["tee"] or "-",
                     (a.get("pool") or lab["pool"] or "-"), (a.get("region") or lab["region"] or "-"),
                     e["attestation"], a.get("tee") or "-", (a.get("measurement") or "-")[:12], left))  # fmt: skip
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if doc["registry_error"]:
        lines.append(doc["registry_error"])
    if doc["verified_with"] is None:
        lines.append("attestation state unverified: no statement key pinned (--statement-key, "
                     f"${STATEMENT_KEY_ENV}); the registry actor's word proves nothing")  # fmt: skip
    else:
        lines.append(f"registry statements verified with statement key {doc['verified_with'][:16]}")
    feed = doc.get("registry_follows")
    if feed:
        lines.append(f"registry follows the statement feed of {feed['target']} ({feed['applied']} statements applied"
                     + (f"; last error: {feed['last_error']})" if feed["last_error"] else ")"))  # fmt: skip
    if doc["attested_by_pool"]:
        lines.append(
            "attested nodes: " + ", ".join(f"{n} x {k}" for k, n in sorted(doc["attested_by_pool"].items()))
        )
    return "\n".join(lines)


def _verifier(args: argparse.Namespace) -> Any:
    path = args.statement_key or os.environ.get(STATEMENT_KEY_ENV)
    cluster = args.cluster_id or os.environ.get(CLUSTER_ID_ENV)
    if not path:
        return None
    if not cluster:
        raise ValueError(f"--statement-key needs --cluster-id (or ${CLUSTER_ID_ENV})")
    from scheduler.registry import RegistryVerifier

    with open(path, "rb") as f:
        return RegistryVerifier.from_pem(f.read(), registry_id=cluster)


def cmd_status(args: argparse.Namespace) -> int:
    import ray

    try:
        verifier = _verifier(args)
    except (OSError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    connected_here = not ray.is_initialized()
    try:
        if connected_here:
            ray.init(address=args.address or "auto", logging_level=40, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        print(f"error: cannot connect to Ray: {exc}", file=sys.stderr)
        return 2
    try:
        doc = collect(verifier)
    finally:
        if connected_here:
            ray.shutdown()
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else render(doc))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``status`` to the ``ray-confidential`` subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "status", help="nodes, pools, TEE kinds and executor attestation state"
    )
    p.add_argument("--address", help="Ray cluster address (default: auto)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--statement-key", help=f"PEM of the broker's statement key (or ${STATEMENT_KEY_ENV})")
    p.add_argument("--cluster-id", help=f"registry id (or ${CLUSTER_ID_ENV})")
    p.set_defaults(func=cmd_status)
    return p


__all__ = ["add_parser", "cmd_status", "collect", "render"]
