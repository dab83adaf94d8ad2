"""Placement without Ray: narrowing, refused options, selectors, and the bounded wait."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from ray._private.label_utils import validate_label_selector
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_confidential.domains import DomainPolicy
from ray_confidential.errors import NoAttestedNodeError
from scheduler.labels import NODE_ID_LABEL, POOL_LABEL, REGION_LABEL, TEE_LABEL
from scheduler.placement import Placer
from scheduler.pools import PoolsConfig
from scheduler.registry import RegistryEntry
from tests.scheduler.conftest import POOLS_YAML

NOW = 1_800_000_000.0


def entry(
    n: int, tee: str = "sev-snp", pool: str = "snp-eu", region: str = "eu-west-1", **claims: Any
) -> RegistryEntry:
    return RegistryEntry(
        node_id=f"{n:056x}",
        tee=tee,
        pool=pool,
        region=region,
        measurement=str(claims.pop("measurement", "m1")),
        claims={"env": "dev", **claims},
        expires_at=int(NOW) + 60,
        seq=1,
        issued_at=int(NOW),
    )


ENTRIES = [
    entry(1),
    entry(2, tee="tdx", pool="tdx-gpu", region="us-central1", gpu_cc=True),
    entry(3, tee="sev-snp", pool="snp-az", region="westeurope", instance_id="vm-1"),
    entry(4, tee="sgx", pool="sgx-dc1", region="dc1"),
]
DEV = DomainPolicy(dev=True)


def placer(entries: list[RegistryEntry] = ENTRIES, **kw: Any) -> Placer:
    return Placer(lambda now: [e for e in entries if e.expires_at > now], clock=lambda: NOW, **kw)


def ids(opts: dict[str, Any]) -> set[str]:
    value = opts["label_selector"][NODE_ID_LABEL]
    assert value.startswith("in(") and value.endswith(")")
    return set(value[3:-1].split(","))


def test_any_policy_selects_every_registered_node() -> None:
    opts = placer().options(DEV)
    assert ids(opts) == {e.node_id for e in ENTRIES}
    assert set(opts) == {"label_selector"}
    assert validate_label_selector(opts["label_selector"]) is None  # Ray accepts it


@pytest.mark.parametrize(
    ("kwargs", "expected", "labels"),
    [
        ({"tee": "tdx"}, {2}, {TEE_LABEL: "in(tdx)"}),
        ({"tee": ["sev-snp", "sgx"]}, {1, 3, 4}, {TEE_LABEL: "in(sev-snp,sgx)"}),
        ({"pools": "snp-az"}, {3}, {POOL_LABEL: "in(snp-az)"}),
        ({"regions": ("eu-west-1", "dc1")}, {1, 4}, {REGION_LABEL: "in(eu-west-1,dc1)"}),
        ({"gpu_cc": True}, {2}, {}),
        ({"tee": "*"}, {1, 2, 3, 4}, {}),
    ],
)
def test_narrowing(kwargs: dict[str, Any], expected: set[int], labels: dict[str, str]) -> None:
    opts = placer().options(DEV, **kwargs)
    assert ids(opts) == {f"{n:056x}" for n in expected}
    assert {k: v for k, v in opts["label_selector"].items() if k != NODE_ID_LABEL} == labels


def test_policy_restricts_and_options_may_only_narrow() -> None:
    policy = DomainPolicy(tee_kinds=("sev-snp",), pools=("snp-eu", "snp-az"), regions=("*",), dev=True)
    assert ids(placer().options(policy)) == {f"{1:056x}", f"{3:056x}"}
    with pytest.raises(
        ValueError, match=r"pools=\('tdx-gpu',\) is outside the domain policy's pools \('snp-eu', 'snp-az'\)"
    ):
        placer().options(policy, pools="tdx-gpu")
    with pytest.raises(ValueError, match=r"tee=\('tdx',\) is outside"):
        placer().options(policy, tee="tdx")
    with pytest.raises(ValueError, match="tee 'sev' is not one of"):
        placer().options(DEV, tee="sev")
    with pytest.raises(ValueError, match="is empty"):
        placer().options(DEV, pools=[])
    with pytest.raises(TypeError, match="string or a sequence of strings"):
        placer().options(DEV, regions=[1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="mixes"):
        placer().options(DEV, pools=["*", "snp-eu"])


def test_measurement_pins_and_production_env() -> None:
    """A genuine TEE with the wrong measurement, or a dev-token node for a prod policy, is never chosen."""
    entries = [
        entry(1, measurement="good", env="prod"),
        entry(2, measurement="bad", env="prod"),
        entry(3, measurement="good"),
    ]
    prod = DomainPolicy(bundles=("ab" * 32,), measurements={"sev-snp": ("good",)})
    assert ids(placer(entries).options(prod)) == {f"{1:056x}"}
    with pytest.raises(NoAttestedNodeError, match="measurements pinned for sev-snp"):
        placer(entries[1:2], wait_s=0).options(prod)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"fallback_strategy": [{"label_selector": {}}]}, "no soft fallback"),
        ({"scheduling_strategy": "SPREAD"}, "scheduling_strategy='SPREAD' is refused"),
        ({"scheduling_strategy": NodeAffinitySchedulingStrategy("ab" * 28, soft=True)}, "is refused"),
        ({"placement_group": object()}, "placement groups bypass"),
        ({"label_selector": {TEE_LABEL: "tdx"}}, r"tee_kinds=\('tdx',\) is outside"),
        ({"label_selector": {POOL_LABEL: "in(snp-eu,tdx-gpu)"}}, r"pools=\('snp-eu', 'tdx-gpu'\) is outside"),
        ({"label_selector": {REGION_LABEL: "!dc1"}}, "exclusions need the policy"),
        ({"label_selector": {"x": "in()"}}, "is not valid"),
        ({"label_selector": "ray.io/node-id=x"}, "must be a dict"),
    ],
)
def test_widening_options_are_refused(options: dict[str, Any], match: str) -> None:
    policy = DomainPolicy(tee_kinds=("sev-snp",), pools=("snp-eu", "snp-az"), dev=True)
    with pytest.raises((ValueError, TypeError), match=match):
        placer().options(policy, ray_options=options)


def test_label_selector_can_narrow() -> None:
    p = placer()
    # node-id selectors intersect; exclusions remove; other keys pass through (Ray ANDs them).
    opts = p.options(
        DEV, ray_options={"label_selector": {NODE_ID_LABEL: f"in({1:056x},{2:056x},{'ff' * 28})"}}
    )
    assert ids(opts) == {f"{1:056x}", f"{2:056x}"}
    opts = p.options(DEV, ray_options={"label_selector": {NODE_ID_LABEL: f"!{1:056x}", "team": "ml"}})
    assert ids(opts) == {f"{n:056x}" for n in (2, 3, 4)}
    assert opts["label_selector"]["team"] == "ml"
    policy = DomainPolicy(pools=("snp-eu", "snp-az"), dev=True)
    opts = p.options(
        policy, ray_options={"label_selector": {POOL_LABEL: "!snp-eu"}, "scheduling_strategy": "DEFAULT"}
    )
    assert ids(opts) == {f"{3:056x}"} and opts["label_selector"][POOL_LABEL] == "in(snp-az)"


def test_no_qualifying_node_waits_then_raises() -> None:
    t0 = time.monotonic()
    with pytest.raises(NoAttestedNodeError) as ei:
        placer(
            wait_s=0.3, poll_s=0.05, describe_cluster=lambda: "2 nodes labelled as TEEs hold no routing token"
        ).options(DEV, tee="nitro")
    assert 0.3 <= time.monotonic() - t0 < 2
    msg = str(ei.value)
    assert "after 0.3 s: required tee=nitro pools=any regions=any" in msg
    assert "1 x sev-snp/snp-az/westeurope" in msg and "1 x tdx/tdx-gpu/us-central1" in msg
    assert "2 nodes labelled as TEEs hold no routing token" in msg


def test_a_node_that_registers_during_the_wait_is_used() -> None:
    entries: list[RegistryEntry] = []
    calls = []

    def source(now: float) -> list[RegistryEntry]:
        calls.append(now)
        if len(calls) == 3:
            entries.append(entry(7, tee="nitro", pool="n", region="r"))
        return entries

    opts = Placer(source, wait_s=5, poll_s=0.01, clock=lambda: NOW).options(DEV, tee="nitro")
    assert ids(opts) == {f"{7:056x}"}


def test_expired_entries_do_not_qualify() -> None:
    late = Placer(lambda now: [e for e in ENTRIES if e.expires_at > now], wait_s=0, clock=lambda: NOW + 61)
    with pytest.raises(NoAttestedNodeError, match="holds no attested node"):
        late.options(DEV)


def test_pools_config_enforces_residency_and_pool_identity() -> None:
    cfg = PoolsConfig.from_yaml(POOLS_YAML)
    entries = [
        entry(1, chip_id="ab" * 64),  # snp-eu, allow-listed chip
        entry(2, chip_id="cd" * 64),  # snp-eu, chip not allow-listed
        entry(3, pool="snp-az", region="westeurope", instance_id="vm-1"),
        entry(4, pool="snp-az", region="westeurope", instance_id="vm-9"),  # not allow-listed
        entry(5, tee="tdx", pool="snp-eu", chip_id="ab" * 64),  # tee disagrees with the pool
        entry(6, pool="unknown-pool"),  # pool not in the owner's config
    ]
    opts = placer(entries, pools_config=cfg).options(DEV)
    assert ids(opts) == {f"{1:056x}", f"{3:056x}"}


def test_large_cluster_selector_bound() -> None:
    many = [entry(n) for n in range(1, 2001)]
    p = placer(many, max_selector_nodes=64, rng=random.Random(1))
    chosen = ids(p.options(DEV))
    assert len(chosen) == 64 and chosen <= {e.node_id for e in many}
    assert len(ids(placer(many).options(DEV))) == 2000
