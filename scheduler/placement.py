"""Placement: a domain policy and a call's narrowing options -> stock Ray scheduling options.

The output is ``{"label_selector": {"ray.io/node-id": "in(<id>,...)", <pool/region/tee labels>}}``:
a hard constraint over the trust registry's qualifying nodes, intersected with the nodes' own labels.
Ray's label selectors have no soft form once ``fallback_strategy`` is refused, so a call either runs
on a qualifying node or waits; :class:`Placer` bounds that wait and raises
:class:`~ray_confidential.errors.NoAttestedNodeError` instead of pending forever.

    >>> from ray_confidential.domains import DomainPolicy
    >>> from scheduler.registry import RegistryEntry
    >>> e = RegistryEntry(node_id="ab" * 28, tee="tdx", pool="tdx-eu", region="eu", measurement="",
    ...                   claims={}, expires_at=2000, seq=1, issued_at=1000)
    >>> placer = Placer(lambda now: [e], clock=lambda: 1500.0)
    >>> placer.options(DomainPolicy(tee_kinds=("tdx",)), pools="tdx-eu")["label_selector"]
    {'ray.io/node-id': 'in(abababababababababababababababababababababababababababab)', \
'ray-confidential.io/tee': 'in(tdx)', 'ray-confidential.io/pool': 'in(tdx-eu)'}
    >>> placer.options(DomainPolicy(pools=("tdx-eu",)), pools="gpu-us")
    Traceback (most recent call last):
    ...
    ValueError: pools=('gpu-us',) is outside the domain policy's pools ('tdx-eu',); narrowing options may only narrow

Placement is routing, not enforcement (design.md section 3): what this module does NOT do is decide
who gets keys. The broker does, from fresh evidence, whatever node a call lands on.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ray_confidential.domains import ANY, DomainPolicy
from ray_confidential.errors import NoAttestedNodeError, PolicyViolation
from scheduler.labels import (
    NODE_ID_LABEL,
    POOL_LABEL,
    REGION_LABEL,
    TEE_KINDS,
    TEE_LABEL,
    check_label_value,
)
from scheduler.pools import PoolsConfig
from scheduler.registry import RegistryEntry

log = logging.getLogger(__name__)

DEFAULT_WAIT_S: Final = 60.0
DEFAULT_POLL_S: Final = 0.2
REFUSED_OPTIONS: Final = {
    "fallback_strategy": "no soft fallback: a confidential call runs on a qualifying node or fails",
    "placement_group": "placement groups bypass the attested-node selector",
    "placement_group_bundle_index": "placement groups bypass the attested-node selector",
    "placement_group_capture_child_tasks": "placement groups bypass the attested-node selector",
    "_node_labels": "soft/legacy label scheduling could widen the attested-node selector",
}
"""Ray options that could place a call outside the policy, with the reason shown to the user."""

Names = str | Sequence[str] | None
EntrySource = Callable[[float], Iterable[RegistryEntry]]


def _names(value: Names, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else tuple(value)
    if not items:
        raise ValueError(f"{what}=() is empty; pass a name, a list of names, or leave it out")
    for x in items:
        if not isinstance(x, str):
            raise TypeError(f"{what} must be a string or a sequence of strings, got {type(x).__name__}")
    return items


def _narrow(policy_values: tuple[str, ...], requested: tuple[str, ...] | None, what: str) -> tuple[str, ...]:
    if requested is None or ANY in requested:
        if requested is not None and len(requested) > 1:
            raise ValueError(f"{what}={requested!r} mixes '*' with names; use one or the other")
        return policy_values
    if ANY not in policy_values:
        outside = [x for x in requested if x not in policy_values]
        if outside:
            raise ValueError(
                f"{what}={requested!r} is outside the domain policy's {what} {policy_values!r}; "
                "narrowing options may only narrow"
            )
    return tuple(dict.fromkeys(requested))


@dataclass(frozen=True, slots=True, kw_only=True)
class Requirement:
    """What a node must be for one call: the domain policy narrowed by the call's options.

    ``("*",)`` = any. ``node_ids`` / ``excluded_node_ids`` come from a caller's ``label_selector`` on
    ``ray.io/node-id`` (which may only narrow).
    """

    tee_kinds: tuple[str, ...] = (ANY,)
    pools: tuple[str, ...] = (ANY,)
    regions: tuple[str, ...] = (ANY,)
    gpu_cc: bool = False
    measurements: Mapping[str, tuple[str, ...]] | None = None
    production: bool = False
    node_ids: frozenset[str] | None = None
    excluded_node_ids: frozenset[str] = frozenset()

    def describe(self) -> str:
        def show(v: tuple[str, ...]) -> str:
            return "any" if ANY in v else ",".join(v)

        parts = [f"tee={show(self.tee_kinds)}", f"pools={show(self.pools)}", f"regions={show(self.regions)}"]
        if self.gpu_cc:
            parts.append("gpu_cc")
        if self.measurements:
            parts.append(f"measurements pinned for {','.join(sorted(self.measurements))}")
        if self.node_ids is not None:
            parts.append(f"node ids within {len(self.node_ids)} given")
        return " ".join(parts)

    def why_not(self, e: RegistryEntry) -> str | None:
        """The first reason ``e`` does not qualify, or ``None`` when it does."""
        if ANY not in self.tee_kinds and e.tee not in self.tee_kinds:
            return "tee"
        if ANY not in self.pools and e.pool not in self.pools:
            return "pool"
        if ANY not in self.regions and e.region not in self.regions:
            return "region"
        if self.gpu_cc and e.claims.get("gpu_cc") is not True:
            return "gpu_cc"
        if self.measurements and e.measurement not in self.measurements.get(e.tee, ()):
            return "measurement"
        if self.production and e.claims.get("env") != "prod":
            return "env"
        if self.node_ids is not None and e.node_id not in self.node_ids:
            return "node id"
        if e.node_id in self.excluded_node_ids:
            return "node id"
        return None


def narrow(
    policy: DomainPolicy,
    *,
    tee: Names = None,
    pools: Names = None,
    regions: Names = None,
    gpu_cc: bool | None = None,
) -> Requirement:
    """Intersect a domain policy with a call's options; an option outside the policy is an error.

    Raises:
        ValueError: an option names a TEE kind, pool or region the policy does not allow.
        TypeError: an option is not a string or a sequence of strings.
    """
    tee_kinds = _narrow(policy.tee_kinds, _names(tee, "tee"), "tee")
    for t in tee_kinds:
        if t != ANY and t not in TEE_KINDS:
            raise ValueError(f"tee {t!r} is not one of {list(TEE_KINDS)}")
    req_pools = _narrow(policy.pools, _names(pools, "pools"), "pools")
    req_regions = _narrow(policy.regions, _names(regions, "regions"), "regions")
    for v in (*req_pools, *req_regions):
        if v != ANY:
            check_label_value(v, what="pool/region")
    if gpu_cc is not None and not isinstance(gpu_cc, bool):
        raise TypeError(f"gpu_cc must be True, False or None, got {gpu_cc!r}")
    return Requirement(
        tee_kinds=tee_kinds,
        pools=req_pools,
        regions=req_regions,
        gpu_cc=bool(gpu_cc),
        measurements=policy.measurements or None,
        production=not policy.is_development,
    )


def _parse_selector_value(value: str) -> tuple[bool, tuple[str, ...]]:
    """``"x"`` / ``"in(x,y)"`` / ``"!x"`` / ``"!in(x,y)"`` -> (negated, values) (Ray 2.60 syntax)."""
    neg = value.startswith("!")
    body = value[1:] if neg else value
    if body.startswith("in(") and body.endswith(")"):
        vals = tuple(v.strip() for v in body[3:-1].split(","))
    else:
        vals = (body,)
    if not all(vals):
        raise ValueError(
            f"label selector value {value!r} is not valid: use 'v', '!v', 'in(a,b)' or '!in(a,b)'"
        )
    return neg, vals


def check_refused_options(ray_options: Mapping[str, Any]) -> None:
    """Refuse Ray options that could place a call outside the policy (no policy needed: decoration
    time). Also checks the syntax of a ``label_selector``.

    Raises:
        ValueError: ``fallback_strategy``, a scheduling strategy other than the default, placement
            groups, legacy node labels, or a malformed ``label_selector`` value.
        TypeError: ``label_selector`` is not a dict of strings.
    """
    for key, why in REFUSED_OPTIONS.items():
        v = ray_options.get(key)
        if (
            v is not None
            and v != "default"
            and not (key == "placement_group_capture_child_tasks" and v is False)
        ):
            raise ValueError(f"option {key}={v!r} is refused for confidential calls: {why}")
    strategy = ray_options.get("scheduling_strategy")
    if strategy not in (None, "DEFAULT"):
        raise ValueError(
            f"scheduling_strategy={strategy!r} is refused for confidential calls: placement sets a hard "
            "label_selector; to narrow to nodes, pass label_selector={'ray.io/node-id': 'in(<id>,...)'}"
        )
    selector = ray_options.get("label_selector") or {}
    if not isinstance(selector, Mapping):
        raise TypeError("label_selector must be a dict of label key -> selector value")
    for key, value in selector.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("label_selector keys and values must be strings")
        _parse_selector_value(value)


def apply_ray_options(
    req: Requirement, ray_options: Mapping[str, Any] | None
) -> tuple[Requirement, dict[str, str]]:
    """Check a caller's Ray options; fold a ``label_selector`` into the requirement.

    Returns the narrowed requirement and the caller's extra selector entries (other label keys,
    which Ray ANDs, so they can only narrow).

    Raises:
        ValueError: an option could widen placement (``fallback_strategy``, a scheduling strategy,
            placement groups), or the ``label_selector`` names a TEE kind, pool or region outside the
            requirement.
    """
    if not ray_options:
        return req, {}
    check_refused_options(ray_options)
    selector = ray_options.get("label_selector") or {}
    if not isinstance(selector, Mapping):
        raise TypeError("label_selector must be a dict of label key -> selector value")
    extra: dict[str, str] = {}
    node_ids, excluded = req.node_ids, set(req.excluded_node_ids)
    fields = {TEE_LABEL: "tee_kinds", POOL_LABEL: "pools", REGION_LABEL: "regions"}
    narrowed: dict[str, Any] = {}
    for key, value in selector.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("label_selector keys and values must be strings")
        neg, vals = _parse_selector_value(value)
        if key == NODE_ID_LABEL:
            if neg:
                excluded.update(vals)
            else:
                node_ids = frozenset(vals) if node_ids is None else node_ids & frozenset(vals)
        elif key in fields:
            current: tuple[str, ...] = getattr(req, fields[key])
            if neg:
                if ANY in current:
                    raise ValueError(
                        f"label_selector {key}={value!r}: exclusions need the policy to name its "
                        f"{fields[key]}; list the allowed ones with in(...) instead"
                    )
                narrowed[fields[key]] = tuple(x for x in current if x not in vals) or ("",)
            else:
                narrowed[fields[key]] = _narrow(current, vals, fields[key])
        else:
            extra[key] = value
    out = Requirement(
        tee_kinds=narrowed.get("tee_kinds", req.tee_kinds),
        pools=narrowed.get("pools", req.pools),
        regions=narrowed.get("regions", req.regions),
        gpu_cc=req.gpu_cc,
        measurements=req.measurements,
        production=req.production,
        node_ids=node_ids,
        excluded_node_ids=frozenset(excluded),
    )
    return out, extra


def qualifying(
    req: Requirement, entries: Iterable[RegistryEntry], *, pools_config: PoolsConfig | None = None
) -> list[RegistryEntry]:
    """Entries that satisfy ``req`` (and, with ``pools_config``, their pool's tee and residency)."""
    out = []
    for e in entries:
        if req.why_not(e) is not None:
            continue
        if pools_config is not None:
            try:
                pool = pools_config.pool(e.pool)
            except KeyError:
                continue  # fail closed: a pool the owner's config does not list
            if pool.tee != e.tee or pool.region != e.region:
                continue
            try:
                pool.check_residency(e.claims)
            except PolicyViolation as exc:
                log.info("placement: node %s excluded: %s", e.node_id, exc)
                continue
        out.append(e)
    return out


def label_selector(
    req: Requirement,
    nodes: Sequence[RegistryEntry],
    *,
    extra: Mapping[str, str] | None = None,
    max_nodes: int | None = None,
    rng: random.Random | None = None,
    labels: bool = True,
) -> dict[str, str]:
    """The stock Ray ``label_selector`` for ``nodes`` (already qualified) and ``req``'s labels.

    ``max_nodes`` bounds the selector for large clusters: a random subset of that many qualifying
    nodes (a subset of qualifying nodes is still only qualifying nodes; see docs/placement.md).
    ``labels=False`` leaves out the tee/pool/region keys (nodes Ray could not label, e.g. the driver's
    node under ``rc.init(dev=True)`` in a running cluster: the registry's node ids alone select).
    """
    if not nodes:
        raise ValueError("no qualifying node to select")
    ids = sorted(e.node_id for e in nodes)
    if max_nodes is not None and len(ids) > max_nodes:
        ids = sorted((rng or random.SystemRandom()).sample(ids, max_nodes))
    sel = {NODE_ID_LABEL: f"in({','.join(ids)})"}
    for key, values in ((TEE_LABEL, req.tee_kinds), (POOL_LABEL, req.pools), (REGION_LABEL, req.regions)):
        if labels and ANY not in values:
            sel[key] = f"in({','.join(values)})"
    for k, v in (extra or {}).items():
        sel.setdefault(k, v)
    return sel


def describe_entries(entries: Iterable[RegistryEntry]) -> str:
    counts = Counter(f"{e.tee}/{e.pool}/{e.region}" for e in entries)
    if not counts:
        return "the trust registry holds no attested node"
    return "the trust registry holds " + ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))


class Placer:
    """Computes Ray options for confidential calls from a live view of the trust registry.

    Args:
        source: ``source(now)`` returns the current registry entries (verified, unexpired, alive).
        wait_s: how long to wait for a qualifying node before :class:`NoAttestedNodeError`.
        poll_s: how often to re-read ``source`` while waiting.
        pools_config: the owner's pools file; entries outside it, or failing residency, are excluded.
        max_selector_nodes: bound on node ids per selector (``None`` = all qualifying nodes).
        describe_cluster: extra text for the error (e.g. nodes labelled as TEEs but not registered).
        labels: intersect with the nodes' tee/pool/region labels (see :func:`label_selector`).
        on_miss: called when no node qualifies, before waiting (e.g. drop a cached registry view).
        clock, monotonic, sleep: injected time (tests pass fakes).
    """

    def __init__(
        self,
        source: EntrySource,
        *,
        wait_s: float = DEFAULT_WAIT_S,
        poll_s: float = DEFAULT_POLL_S,
        pools_config: PoolsConfig | None = None,
        max_selector_nodes: int | None = None,
        describe_cluster: Callable[[], str] | None = None,
        labels: bool = True,
        on_miss: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if wait_s < 0 or poll_s <= 0:
            raise ValueError("wait_s must be >= 0 and poll_s > 0")
        if max_selector_nodes is not None and max_selector_nodes < 1:
            raise ValueError("max_selector_nodes must be >= 1 or None")
        self.source = source
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.pools_config = pools_config
        self.max_selector_nodes = max_selector_nodes
        self.describe_cluster = describe_cluster
        self.labels = labels
        self.on_miss = on_miss
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._rng = rng

    def requirement(
        self,
        policy: DomainPolicy,
        *,
        tee: Names = None,
        pools: Names = None,
        regions: Names = None,
        gpu_cc: bool | None = None,
        ray_options: Mapping[str, Any] | None = None,
    ) -> tuple[Requirement, dict[str, str]]:
        """Validate options (no waiting): the requirement and the caller's extra selector entries."""
        req = narrow(policy, tee=tee, pools=pools, regions=regions, gpu_cc=gpu_cc)
        return apply_ray_options(req, ray_options)

    def options(
        self,
        policy: DomainPolicy,
        *,
        tee: Names = None,
        pools: Names = None,
        regions: Names = None,
        gpu_cc: bool | None = None,
        ray_options: Mapping[str, Any] | None = None,
        wait_s: float | None = None,
    ) -> dict[str, Any]:
        """Ray options (``{"label_selector": ...}``) for one call, waiting (bounded) for a node.

        Raises:
            ValueError / TypeError: an option would widen the policy, or is malformed.
            NoAttestedNodeError: no qualifying node within ``wait_s`` (default: the placer's).
        """
        req, extra = self.requirement(
            policy, tee=tee, pools=pools, regions=regions, gpu_cc=gpu_cc, ray_options=ray_options
        )
        budget = self.wait_s if wait_s is None else wait_s
        deadline = self._monotonic() + budget
        while True:
            entries = list(self.source(self._clock()))
            nodes = qualifying(req, entries, pools_config=self.pools_config)
            if nodes:
                return {
                    "label_selector": label_selector(
                        req,
                        nodes,
                        extra=extra,
                        max_nodes=self.max_selector_nodes,
                        rng=self._rng,
                        labels=self.labels,
                    )
                }
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                break
            if self.on_miss is not None:
                self.on_miss()
            self._sleep(min(self.poll_s, remaining))
        detail = describe_entries(entries)
        if self.describe_cluster is not None:
            detail += "; " + self.describe_cluster()
        raise NoAttestedNodeError(
            f"no attested node qualifies after {budget:g} s: required {req.describe()}; {detail}"
        )
