"""Rendered ray-up and KubeRay configs, checked against Ray's launcher schema and KubeRay's CRD fields."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from enclave_actors.cli import add_parser
from enclave_actors.shim import NODE_SOCKET
from scheduler import cli
from scheduler.labels import POOL_LABEL, REGION_LABEL, TEE_LABEL
from scheduler.pools import DEFAULT_LAUNCH_DATA, PoolsConfig
from scheduler.render import render, render_kuberay, render_ray_up
from tests.scheduler.conftest import POOLS_YAML

RAY_SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_CONTAINER = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "restartPolicy": {"enum": ["Always"]},
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "metadata": {"type": "object", "properties": {"labels": _STR_MAP, "annotations": _STR_MAP}},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "initContainers": {"type": "array", "items": _CONTAINER},
                "nodeSelector": _STR_MAP,
                "runtimeClassName": {"type": "string"},
                "volumes": {"type": "array"},
            },
        },
    },
}
# The fields of KubeRay's ray.io/v1 RayCluster CRD (ray-operator/apis/ray/v1/raycluster_types.go)
# that the rendering uses; additionalProperties: false so a misspelt field fails here, as it would be
# pruned (silently dropped) by the API server's structural schema.
KUBERAY_RAYCLUSTER = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["headGroupSpec"],
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "headGroupSpec": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["template"],
                    "properties": {"rayStartParams": _STR_MAP, "template": _POD_TEMPLATE},
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["groupName", "template"],
                        "properties": {
                            "groupName": {"type": "string"},
                            "replicas": _INT32,
                            "minReplicas": _INT32,
                            "maxReplicas": _INT32,
                            "rayStartParams": _STR_MAP,
                            "template": _POD_TEMPLATE,
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture
def cfg() -> PoolsConfig:
    return PoolsConfig.from_yaml(POOLS_YAML)


def test_ray_up_validates_against_rays_schema(cfg: PoolsConfig) -> None:
    docs = list(yaml.safe_load_all(render(cfg, "ray-up")))
    assert [d["cluster_name"] for d in docs] == [
        "hybrid",
        "hybrid-gcp-us-central1",
        "hybrid-azure-westeurope",
        "hybrid-on-prem-sgx-dc1",
    ]
    for doc in docs:
        jsonschema.validate(doc, RAY_SCHEMA)
        if doc["provider"]["type"] == "local":
            continue
        assert doc["head_node_type"] in doc["available_node_types"]
        for name, nt in doc["available_node_types"].items():
            if name == doc["head_node_type"]:
                assert "labels" not in nt  # the head is untrusted and never labelled as a TEE
                continue
            pool = cfg.pool(name)
            assert nt["labels"] == pool.ray_labels()
            assert (nt["min_workers"], nt["max_workers"]) == (pool.min_nodes, pool.max_nodes)
            [setup] = nt["worker_setup_commands"]
            args = _executor_args(setup)
            assert (args.tee, args.pool, args.region, args.node_id) == (pool.tee, name, pool.region, "auto")
    aws, gcp, azure, onprem = docs
    assert aws["provider"] == {"type": "aws", "region": "eu-west-1"}
    assert aws["available_node_types"]["snp-eu"]["node_config"]["CpuOptions"] == {"AmdSevSnp": "enabled"}
    gcp_nc = gcp["available_node_types"]["tdx-gpu"]["node_config"]
    assert gcp_nc["confidentialInstanceConfig"] == {"confidentialInstanceType": "TDX"}
    assert gcp["provider"]["project_id"] == "my-project"
    assert azure["provider"]["location"] == "westeurope"
    assert onprem["provider"] == {
        "type": "local",
        "head_ip": "10.0.0.4",
        "worker_ips": ["10.0.0.5", "10.0.0.6"],
    }
    args = _executor_args(onprem["worker_setup_commands"][0])
    assert (args.tee, args.pool, args.node_id) == ("sgx", "sgx-dc1", "auto")
    start = onprem["worker_start_ray_commands"][-1]
    assert (
        "--labels=ray-confidential.io/pool=sgx-dc1,ray-confidential.io/region=dc1,ray-confidential.io/tee=sgx"
        in start
    )


def test_ray_up_also_passes_rays_own_validator(cfg: PoolsConfig) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    for doc in render_ray_up(cfg):
        # prepare_config merges the provider's defaults (as `ray up` does) before validating.
        validate_config(prepare_config(doc))


def test_on_prem_head_needs_host() -> None:
    cfg = PoolsConfig.from_yaml(
        "version: 1\ncluster_name: c\npools:\n"
        "  - {name: s, provider: on-prem, region: dc1, node_kind: tdx, max_nodes: 1, hosts: [h1]}\n"
    )
    with pytest.raises(ValueError, match=r"set head\.host"):
        render_ray_up(cfg)


def test_cloud_keys_required() -> None:
    cfg = PoolsConfig.from_yaml(
        "version: 1\ncluster_name: c\npools:\n  - {name: s, provider: gcp, region: r1, node_kind: tdx, max_nodes: 1}\n"
    )
    with pytest.raises(ValueError, match=r"need provider_config keys \['project_id'\]"):
        render_ray_up(cfg)


def test_kuberay_matches_crd_fields(cfg: PoolsConfig) -> None:
    doc = yaml.safe_load(render(cfg, "kuberay"))
    jsonschema.validate(doc, KUBERAY_RAYCLUSTER)
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {p.name for p in cfg.pools}
    snp = groups["snp-eu"]
    labels = dict(kv.split("=") for kv in snp["rayStartParams"]["labels"].split(","))
    assert labels == {"team": "ml", TEE_LABEL: "sev-snp", POOL_LABEL: "snp-eu", REGION_LABEL: "eu-west-1"}
    assert snp["template"]["spec"]["runtimeClassName"] == "kata-qemu-snp"
    assert groups["tdx-gpu"]["template"]["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-confidential-nodes-instance-type": "TDX"
    }
    assert (
        groups["tdx-gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    )
    assert groups["snp-az"]["template"]["spec"]["nodeSelector"] == {
        "kubernetes.azure.com/agentpool": "cvmpool"
    }
    assert "nodeSelector" not in groups["sgx-dc1"]["template"]["spec"]
    for g in groups.values():
        [executor] = g["template"]["spec"]["initContainers"]
        assert executor["restartPolicy"] == "Always"  # sidecar: up before the Ray container
        assert executor["command"][:2] == ["ray-confidential", "executor"]
        args = _parse_executor(executor["command"][2:])
        assert args.node_id == "auto" and args.socket == NODE_SOCKET and args.socket_group == "ray"
        [ray_container] = g["template"]["spec"]["containers"]
        shared = {m["name"] for m in executor["volumeMounts"]} & {
            m["name"] for m in ray_container["volumeMounts"]
        }
        assert shared == {"rc-executor", "ray-session"}  # the socket, and Ray's session dir for the node id
    # The head is an ordinary node: no TEE labels, no executor.
    assert "labels" not in doc["spec"]["headGroupSpec"]["rayStartParams"]


def _parse_executor(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by the executor's own command line (what the node will run)."""
    parser = argparse.ArgumentParser(prog="ray-confidential", exit_on_error=False)
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["executor", *argv])


def _executor_args(setup: str) -> argparse.Namespace:
    """The executor arguments in a rendered launcher setup command (started in the background)."""
    words = shlex.split(setup)
    at = words.index("executor")
    assert words[at - 1] == "ray-confidential" and words[0] == "mkdir" and words[at - 2] == "(nohup"
    args = _parse_executor(words[at + 1 : words.index(">", at)])
    assert args.socket == NODE_SOCKET and args.launch_data == Path(DEFAULT_LAUNCH_DATA)
    assert args.socket_group == "ray"  # from the pools file's executor.socket_group
    return args


def test_kuberay_label_string_parses_with_ray(cfg: PoolsConfig) -> None:
    from ray._private.label_utils import parse_node_labels_string

    for g in render_kuberay(cfg)["spec"]["workerGroupSpecs"]:
        assert (
            parse_node_labels_string(g["rayStartParams"]["labels"]) == cfg.pool(g["groupName"]).ray_labels()
        )


def test_kuberay_platform_mismatch() -> None:
    cfg = PoolsConfig.from_yaml(
        "version: 1\ncluster_name: c\npools:\n  - {name: s, provider: aws, region: r1, node_kind: none,"
        " enclave_service: nitro, max_nodes: 1, kubernetes: {platform: coco}}\n"
    )
    with pytest.raises(ValueError, match="platform coco needs node_kind sev-snp or tdx"):
        render_kuberay(cfg)


def test_cli_render_and_validate(
    pools_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k.yaml"
    assert cli.main(["pools", "render", "--format", "kuberay", str(pools_file), "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["kind"] == "RayCluster"
    assert cli.main(["pools", "render", "--format", "ray-up", str(pools_file)]) == 0
    assert len(list(yaml.safe_load_all(capsys.readouterr().out))) == 4
    assert cli.main(["pools", "validate", str(pools_file)]) == 0
    assert "residency=evidence" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ncluster_name: c\npools: [{name: x}]\n")
    assert cli.main(["pools", "render", "--format", "ray-up", str(bad)]) == 2
    assert "pool 'x'.provider" in capsys.readouterr().err


def test_add_parser_wires_into_a_parent() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pools", "render", "--format", "kuberay", "x.yaml"])
    assert args.func is not None and args.format == "kuberay"
