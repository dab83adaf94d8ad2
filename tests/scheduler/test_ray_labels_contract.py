"""Contract with Ray 2.60's label-selector API: fails if what placement relies on changes.

Placement emits ``label_selector={"ray.io/node-id": "in(<id>,...)", ...}`` and refuses
``fallback_strategy``; both must keep meaning what they meant when this was written.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest
import ray
from ray._common.ray_option_utils import actor_options, task_options
from ray._private.label_utils import validate_label_selector, validate_node_label_syntax
from ray._private.parameter import RayParams

from scheduler.labels import (
    LABEL_VALUE_RE,
    NODE_ID_HEX_LEN,
    NODE_ID_LABEL,
    POOL_LABEL,
    REGION_LABEL,
    TEE_LABEL,
)


def test_node_id_label_key() -> None:
    key: str = ray._raylet.RAY_NODE_ID_KEY  # type: ignore[attr-defined]
    assert key == NODE_ID_LABEL == "ray.io/node-id"
    from ray.util.placement_group import NODE_ID_LABEL_KEY

    assert NODE_ID_LABEL_KEY == NODE_ID_LABEL
    assert len(ray.NodeID.from_random().hex()) == NODE_ID_HEX_LEN


def test_selector_syntax_accepted_and_refused() -> None:
    ids = [ray.NodeID.from_random().hex() for _ in range(3)]
    assert validate_label_selector({NODE_ID_LABEL: f"in({','.join(ids)})"}) is None
    assert validate_label_selector({NODE_ID_LABEL: f"!in({ids[0]})"}) is None
    assert (
        validate_label_selector({TEE_LABEL: "in(sev-snp,tdx)", POOL_LABEL: "snp-eu", REGION_LABEL: "!us"})
        is None
    )
    assert validate_label_selector({NODE_ID_LABEL: "in()"}) is not None
    assert validate_label_selector({NODE_ID_LABEL: "in(a,"}) is not None
    # Ray's label-value regex is the one scheduler.labels checks pool and region names with.
    assert ray._private.label_utils.LABEL_REGEX.pattern == f"({LABEL_VALUE_RE.pattern})"


def test_our_label_keys_are_valid_custom_labels() -> None:
    validate_node_label_syntax({TEE_LABEL: "sev-snp", POOL_LABEL: "snp-eu", REGION_LABEL: "eu-west-1"})
    with pytest.raises(ValueError):
        ray._private.label_utils.validate_node_labels({NODE_ID_LABEL: "x"})  # Ray reserves ray.io/


def test_options_exist_where_placement_expects_them() -> None:
    for opts in (task_options, actor_options):
        assert "label_selector" in opts and "fallback_strategy" in opts and "scheduling_strategy" in opts
    assert "labels" in inspect.signature(RayParams).parameters  # Cluster.add_node(labels=...)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[str]:
    ray.init(num_cpus=1, include_dashboard=False)
    yield str(ray.get_runtime_context().get_node_id())
    ray.shutdown()


@ray.remote(num_cpus=0.01, max_retries=0)
def _where() -> str:
    return str(ray.get_runtime_context().get_node_id())


@pytest.mark.ray
def test_selector_behaviour_on_a_live_node(local_ray: str) -> None:
    node = local_ray
    other = ray.NodeID.from_random().hex()
    labels = next(n["Labels"] for n in ray.nodes() if n["NodeID"] == node)  # type: ignore[no-untyped-call]
    assert labels[NODE_ID_LABEL] == node  # Ray sets the node-id label itself
    assert ray.get(_where.options(label_selector={NODE_ID_LABEL: f"in({other},{node})"}).remote()) == node
    # A selector no node matches waits forever: the reason placement bounds the wait itself.
    pending = _where.options(label_selector={POOL_LABEL: "no-such-pool"}).remote()
    ready, _ = ray.wait([pending], timeout=1.0)
    assert ready == []
    ray.cancel(pending, force=True)
