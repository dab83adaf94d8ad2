"""Pools YAML: parsing, one error per bad input, labels and residency."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from ray_confidential.errors import PolicyViolation
from scheduler.labels import POOL_LABEL, REGION_LABEL, TEE_LABEL
from scheduler.pools import PoolsConfig
from tests.scheduler.conftest import POOLS_YAML


def _cfg(**pool: Any) -> dict[str, Any]:
    base = {"name": "p", "provider": "aws", "region": "eu-west-1", "node_kind": "sev-snp", "max_nodes": 2}
    base.update(pool)
    return {"version": 1, "cluster_name": "c", "pools": [{k: v for k, v in base.items() if v is not ...}]}


def test_parse_example() -> None:
    cfg = PoolsConfig.from_yaml(POOLS_YAML)
    assert [p.tee for p in cfg.pools] == ["sev-snp", "tdx", "sev-snp", "sgx"]
    snp = cfg.pool("snp-eu")
    assert snp.ray_labels() == {
        "team": "ml",
        TEE_LABEL: "sev-snp",
        POOL_LABEL: "snp-eu",
        REGION_LABEL: "eu-west-1",
    }
    assert [p.residency_basis for p in cfg.pools] == ["evidence", "labels", "provider-identity", "labels"]
    assert cfg.pool("tdx-gpu").gpu_cc
    with pytest.raises(KeyError, match="no pool 'x'"):
        cfg.pool("x")


def test_label_keys_are_exact() -> None:
    assert (TEE_LABEL, POOL_LABEL, REGION_LABEL) == (
        "ray-confidential.io/tee",
        "ray-confidential.io/pool",
        "ray-confidential.io/region",
    )


@pytest.mark.parametrize(
    ("pool", "match"),
    [
        ({"provider": "ibm"}, r"provider: 'ibm' is not one of"),
        ({"node_kind": "sev"}, r"node_kind: 'sev' is not one of"),
        ({"node_kind": "none"}, r"needs enclave_service"),
        ({"node_kind": "none", "enclave_service": "trustzone"}, r"enclave_service: 'trustzone'"),
        ({"enclave_service": "sgx"}, r"enclave_service is for node_kind 'none'"),
        (
            {"node_kind": "none", "enclave_service": "nitro", "gpu_cc": True},
            r"gpu_cc needs a confidential VM",
        ),
        ({"gpu_cc": True}, r"resources.GPU is not set"),
        ({"gpu_cc": "yes"}, r"gpu_cc: expected true or false"),
        ({"min_nodes": 3}, r"min_nodes 3 > max_nodes 2"),
        ({"max_nodes": -1}, r"max_nodes: expected an integer"),
        ({"max_nodes": ...}, r"max_nodes: expected an integer"),
        ({"max_nodes": True}, r"max_nodes: expected an integer"),
        ({"region": "eu west"}, r"not a valid label value"),
        ({"name": "Snp_EU"}, r"lower-case letters"),
        ({"labels": {"ray.io/node-id": "x"}}, r"reserved prefix"),
        ({"labels": {"ray-confidential.io/tee": "sgx"}}, r"reserved prefix"),
        ({"labels": {"team": "a b"}}, r"not a valid label value"),
        ({"residency": {"chip_ids": ["ab"]}}, r"not a 64-byte hex SEV-SNP CHIP_ID"),
        ({"node_kind": "tdx", "residency": {"chip_ids": ["ab" * 64]}}, r"this pool is not sev-snp"),
        ({"residency": {"nitro_module_ids": ["i-1"]}}, r"need enclave_service: nitro"),
        ({"residency": {"chips": []}}, r"unknown keys \['chips'\]"),
        ({"provider": "on-prem"}, r"on-prem pools list their hosts"),
        ({"hosts": ["10.0.0.1"]}, r"hosts is for on-prem pools"),
        ({"resources": {"CPU": 1.5}}, r"resources.CPU: expected an integer"),
        ({"kubernetes": {"platform": "eks"}}, r"platform: 'eks' is not one of"),
        ({"typo_key": 1}, r"unknown keys \['typo_key'\]"),
    ],
)
def test_bad_pool_is_refused(pool: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PoolsConfig.from_dict(_cfg(**pool))


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"version": 2, "cluster_name": "c", "pools": []}, r"expected version: 1"),
        ({"version": 1, "cluster_name": "c", "pools": []}, r"non-empty list of pools"),
        ({"version": 1, "pools": [{}]}, r"cluster_name: expected a non-empty string"),
        ({"version": 1, "cluster_name": "c", "pools": [], "extra": 1}, r"unknown keys \['extra'\]"),
        ([1, 2], r"expected a mapping"),
    ],
)
def test_bad_top_level(doc: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PoolsConfig.from_dict(doc)


def test_duplicate_pool_names() -> None:
    d = _cfg()
    d["pools"] = d["pools"] * 2
    with pytest.raises(ValueError, match="duplicate pool name 'p'"):
        PoolsConfig.from_dict(d)


def test_yaml_errors_and_safe_loader() -> None:
    with pytest.raises(ValueError, match="not valid YAML"):
        PoolsConfig.from_yaml("pools: [")
    # The safe loader never constructs Python objects from tags.
    with pytest.raises((ValueError, yaml.YAMLError)):
        PoolsConfig.from_yaml("!!python/object/apply:os.system ['true']")


def test_residency_checks_evidence_bound_ids() -> None:
    cfg = PoolsConfig.from_yaml(POOLS_YAML)
    snp = cfg.pool("snp-eu")
    snp.check_residency({"chip_id": "AB" * 64})  # case-insensitive hex
    with pytest.raises(PolicyViolation, match=r"residency\.chip_id") as ei:
        snp.check_residency({"chip_id": "cd" * 64})
    assert ei.value.violations[0].field == "residency.chip_id"
    with pytest.raises(PolicyViolation, match=r"residency\.chip_id"):
        snp.check_residency({})  # missing claim fails closed
    az = cfg.pool("snp-az")
    az.check_residency({"instance_id": "vm-2"})
    with pytest.raises(PolicyViolation, match=r"residency\.instance_id"):
        az.check_residency({"instance_id": "vm-9"})
    cfg.pool("sgx-dc1").check_residency({})  # labels-only pool: nothing to check
