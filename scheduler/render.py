"""Render a pools file as Ray cluster-launcher configs (``ray up``) or a KubeRay ``RayCluster``.

    >>> from scheduler.pools import PoolsConfig
    >>> cfg = PoolsConfig.from_yaml('''
    ... version: 1
    ... cluster_name: demo
    ... pools:
    ...   - {name: snp-eu, provider: aws, region: eu-west-1, node_kind: sev-snp, max_nodes: 4,
    ...      instance_type: m6a.4xlarge, resources: {CPU: 16}}
    ... ''')
    >>> doc = render_ray_up(cfg)[0]
    >>> doc["available_node_types"]["snp-eu"]["labels"]["ray-confidential.io/pool"]
    'snp-eu'
    >>> render_kuberay(cfg)["spec"]["workerGroupSpecs"][0]["rayStartParams"]["labels"]
    'ray-confidential.io/pool=snp-eu,ray-confidential.io/region=eu-west-1,ray-confidential.io/tee=sev-snp'

Ray-up: the cluster launcher has one ``provider`` per config, so pools are grouped by provider and
region and each group becomes one launcher document (a YAML stream); the head group (``head.provider``
/ ``head.region``, else the first pool's) comes first. Node-type ``labels`` reach ``ray start`` through
the launcher (it exports them as ``RAY_OVERRIDE_LABELS``, Ray 2.60 ``autoscaler/_private/updater.py``);
the per-type ``worker_setup_commands`` start the enclave executor in the background before the global
``ray start``; it waits for that node's id (``--node-id auto``) and then attests.

KubeRay: one worker group per pool; ``rayStartParams.labels`` carries the labels; confidential node
pools are selected with ``nodeSelector`` (AKS confidential-VM agent pools, Confidential GKE Nodes) or
a ``runtimeClassName`` (Confidential Containers, kata-cc); the executor runs as a native sidecar
(an init container with ``restartPolicy: Always``) that shares the socket directory and Ray's
``/tmp/ray`` with the Ray container, so it learns the node id when Ray starts there.

What this does NOT do: check that the image is measured or that the cloud offers the instance type;
labels are routing hints, the key broker enforces (design.md section 3).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from scheduler.pools import NodePool, PoolsConfig

HEAD_TYPE: Final = "ray.head.default"
HEAD_PORT: Final = 6379
EXECUTOR_SOCKET_DIR: Final = "/run/ray-confidential"
EXECUTOR_SOCKET: Final = f"{EXECUTOR_SOCKET_DIR}/executor.sock"
RAY_TMP_DIR: Final = "/tmp/ray"  # noqa: S108 - Ray's own default temp dir, where its session directory is
"""Must equal ``enclave_actors.shim.NODE_SOCKET`` (checked by tests/scheduler/test_render.py)."""
KUBERAY_API_VERSION: Final = "ray.io/v1"
GKE_CONFIDENTIAL_LABEL: Final = "cloud.google.com/gke-confidential-nodes-instance-type"
AKS_AGENTPOOL_LABEL: Final = "kubernetes.azure.com/agentpool"
_GCP_CVM_TYPE: Final = {"sev-snp": "SEV_SNP", "tdx": "TDX"}
_COCO_RUNTIME: Final = {"sev-snp": "kata-qemu-snp", "tdx": "kata-qemu-tdx"}
_PROVIDER_TYPE: Final = {"aws": "aws", "azure": "azure", "gcp": "gcp", "on-prem": "local"}


def executor_command(cfg: PoolsConfig, pool: NodePool) -> str:
    """The shell command that starts the pool's enclave executor (quoted): on the socket shims look for
    (``enclave_actors.shim.NODE_SOCKET``), with the image's launch data, taking the node id of the
    ``ray start`` that follows on this host (``--node-id auto``, ``enclave_actors/local_node.py``)."""
    parts = [
        *shlex.split(cfg.executor.command),
        "--socket",
        EXECUTOR_SOCKET,
        "--launch-data",
        cfg.executor.launch_data,
        "--node-id",
        "auto",
        "--tee",
        pool.tee,
        "--pool",
        pool.name,
        "--region",
        pool.region,
    ]
    if cfg.executor.socket_group:
        parts += ["--socket-group", cfg.executor.socket_group]
    return shlex.join(parts)


def _background(command: str) -> str:
    """``command`` started in the background of a launcher setup step, its output in a log file."""
    return f"mkdir -p {EXECUTOR_SOCKET_DIR} && (nohup {command} > /tmp/ray-confidential-executor.log 2>&1 &)"


def _labels_param(labels: Mapping[str, str]) -> str:
    """``ray start --labels`` syntax: ``k1=v1,k2=v2`` (Ray 2.60 ``parse_node_labels_string``)."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


# ---------------------------------------------------------------------------------------------- ray up


def _node_config(
    provider: str, pool: NodePool | None, instance_type: str | None, extra: Mapping[str, Any]
) -> dict[str, Any]:
    kind = pool.node_kind if pool is not None else "none"
    cfg: dict[str, Any] = {}
    if provider == "aws":
        if instance_type:
            cfg["InstanceType"] = instance_type
        if kind == "sev-snp":
            cfg["CpuOptions"] = {"AmdSevSnp": "enabled"}  # EC2 RunInstances CpuOptions.AmdSevSnp
    elif provider == "gcp":
        if instance_type:
            cfg["machineType"] = instance_type
        if kind in _GCP_CVM_TYPE:
            cfg["confidentialInstanceConfig"] = {"confidentialInstanceType": _GCP_CVM_TYPE[kind]}
            cfg["scheduling"] = {"onHostMaintenance": "TERMINATE"}  # CVMs cannot live-migrate
    elif provider == "azure" and instance_type:
        cfg["azure_arm_parameters"] = {"vmSize": instance_type}
    cfg.update(extra)
    return cfg


def _provider_section(
    provider: str, region: str, cfg: PoolsConfig, pools: list[NodePool], with_head: bool
) -> dict[str, Any]:
    section: dict[str, Any] = {"type": _PROVIDER_TYPE[provider]}
    if provider in ("aws", "gcp"):
        section["region"] = region
    elif provider == "azure":
        section["location"] = region
    for p in pools:
        section.update(p.provider_config)
    if with_head:
        section.update(cfg.head.provider_config)
    if provider == "on-prem":
        head_ip = cfg.head.host if with_head and cfg.head.host else section.get("head_ip")
        if not head_ip:
            raise ValueError(
                f"on-prem group {region!r}: set head.host, or provider_config.head_ip for a group "
                "without the head (the launcher's local provider needs head_ip)"
            )
        section["head_ip"] = head_ip
        section["worker_ips"] = [h for p in pools for h in p.hosts]
    required = {"azure": ("resource_group",), "gcp": ("project_id",)}.get(provider, ())
    missing = [k for k in required if k not in section]
    if missing:
        raise ValueError(
            f"{provider} pools in {region!r} need provider_config keys {missing} "
            f"(e.g. provider_config: {{{missing[0]}: ...}})"
        )
    return section


def _start_commands(worker_labels: Mapping[str, str] | None) -> dict[str, list[str]]:
    worker = f"ray start --address=$RAY_HEAD_IP:{HEAD_PORT} --disable-usage-stats"
    if worker_labels is not None:
        worker += f" --labels={shlex.quote(_labels_param(worker_labels))}"
    return {
        "head_start_ray_commands": [
            "ray stop",
            f"ray start --head --port={HEAD_PORT} --autoscaling-config=~/ray_bootstrap_config.yaml "
            "--dashboard-host=127.0.0.1 --disable-usage-stats",
        ],
        "worker_start_ray_commands": ["ray stop", worker],
    }


def render_ray_up(cfg: PoolsConfig) -> list[dict[str, Any]]:
    """Cluster-launcher configs: one per cloud (provider, region) group and one per on-prem pool.

    The head's group comes first and is named ``cluster_name``; the others ``cluster_name-<group>``.
    Ray's ``local`` (on-prem) provider accepts no ``available_node_types``, so an on-prem pool's
    labels go on its ``ray start --labels`` and its executor in ``worker_setup_commands``.
    """
    groups: dict[tuple[str, str], list[NodePool]] = {}
    for p in cfg.pools:
        groups.setdefault((p.provider, p.name if p.provider == "on-prem" else p.region), []).append(p)
    head_key = next(iter(groups))
    if cfg.head.provider is not None:
        matches = [
            k
            for k, ps in groups.items()
            if k[0] == cfg.head.provider and ps[0].region == (cfg.head.region or ps[0].region)
        ]
        if not matches:
            raise ValueError(f"head provider/region {(cfg.head.provider, cfg.head.region)} has no pool")
        head_key = matches[0]
    docs = []
    for key in [head_key, *[k for k in groups if k != head_key]]:
        provider, pools = key[0], groups[key]
        region = pools[0].region
        is_head_group = key == head_key
        doc: dict[str, Any] = {
            "cluster_name": cfg.cluster_name if is_head_group else f"{cfg.cluster_name}-{provider}-{key[1]}",
            "max_workers": sum(p.max_nodes for p in pools),
            "provider": _provider_section(provider, region, cfg, pools, is_head_group),
        }
        if provider == "on-prem":
            [pool] = pools
            # Runs before worker_start_ray_commands: the executor waits for the node id of that ray start.
            doc["worker_setup_commands"] = [_background(executor_command(cfg, pool))]
            doc.update(_start_commands(pool.ray_labels()))
            docs.append(doc)
            continue
        node_types: dict[str, Any] = {
            HEAD_TYPE: {
                "resources": dict(cfg.head.resources),
                "node_config": _node_config(provider, None, cfg.head.instance_type, cfg.head.node_config),
                "min_workers": 0,
                "max_workers": 0,
            }
        }
        for p in pools:
            node_types[p.name] = {
                "min_workers": p.min_nodes,
                "max_workers": p.max_nodes,
                "resources": dict(p.resources),
                # The launcher hands these to `ray start` as RAY_OVERRIDE_LABELS.
                "labels": p.ray_labels(),
                "node_config": _node_config(provider, p, p.instance_type, p.node_config),
                # Runs before worker_start_ray_commands: the executor waits in the background for the
                # node id of that ray start, then attests (the node is routed to once admitted).
                "worker_setup_commands": [_background(executor_command(cfg, p))],
            }
        doc["available_node_types"] = node_types
        doc["head_node_type"] = HEAD_TYPE
        doc.update(_start_commands(None))
        docs.append(doc)
    return docs


# ---------------------------------------------------------------------------------------------- KubeRay


def _k8s_placement(pool: NodePool) -> tuple[dict[str, str], str | None]:
    k = pool.kubernetes
    selector: dict[str, str] = {}
    runtime = k.runtime_class_name
    if k.platform == "aks-cvm":
        if pool.node_kind not in ("sev-snp", "tdx"):
            raise ValueError(f"pool {pool.name!r}: platform aks-cvm needs node_kind sev-snp or tdx")
        selector[AKS_AGENTPOOL_LABEL] = k.node_pool or pool.name.replace("-", "")[:12]
    elif k.platform == "gke-confidential":
        if pool.node_kind not in _GCP_CVM_TYPE:
            raise ValueError(f"pool {pool.name!r}: platform gke-confidential needs node_kind sev-snp or tdx")
        selector[GKE_CONFIDENTIAL_LABEL] = _GCP_CVM_TYPE[pool.node_kind]
    elif k.platform == "coco":
        if pool.node_kind not in _COCO_RUNTIME:
            raise ValueError(f"pool {pool.name!r}: platform coco needs node_kind sev-snp or tdx")
        runtime = runtime or _COCO_RUNTIME[pool.node_kind]
    selector.update(k.node_selector)
    return selector, runtime


def _container_resources(resources: Mapping[str, int]) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    if resources.get("CPU"):
        limits["cpu"] = str(resources["CPU"])
    if resources.get("GPU"):
        limits["nvidia.com/gpu"] = resources["GPU"]
    return {"limits": limits, "requests": dict(limits)} if limits else {}


def render_kuberay(cfg: PoolsConfig, *, namespace: str | None = None) -> dict[str, Any]:
    """A KubeRay ``ray.io/v1`` RayCluster with one worker group per pool."""
    socket_mount = {"name": "rc-executor", "mountPath": EXECUTOR_SOCKET_DIR}
    # The sidecar reads the Ray container's session directory for its node id (--node-id auto).
    session_mount = {"name": "ray-session", "mountPath": RAY_TMP_DIR}
    groups = []
    for p in cfg.pools:
        selector, runtime = _k8s_placement(p)
        pod_spec: dict[str, Any] = {
            "initContainers": [
                {
                    "name": "rc-executor",
                    "image": cfg.image,
                    "command": shlex.split(executor_command(cfg, p)),
                    "restartPolicy": "Always",  # native sidecar: started, and kept, before ray-worker
                    "volumeMounts": [socket_mount, session_mount],
                }
            ],
            "containers": [
                {
                    "name": "ray-worker",
                    "image": cfg.image,
                    "resources": _container_resources(p.resources),
                    "volumeMounts": [socket_mount, session_mount],
                }
            ],
            "volumes": [
                {"name": "rc-executor", "emptyDir": {"medium": "Memory"}},
                {"name": "ray-session", "emptyDir": {}},
            ],
        }
        if selector:
            pod_spec["nodeSelector"] = selector
        if runtime:
            pod_spec["runtimeClassName"] = runtime
        params = {"labels": _labels_param(p.ray_labels())}
        if "CPU" in p.resources:
            params["num-cpus"] = str(p.resources["CPU"])
        groups.append(
            {
                "groupName": p.name,
                "replicas": p.min_nodes,
                "minReplicas": p.min_nodes,
                "maxReplicas": p.max_nodes,
                "rayStartParams": params,
                "template": {
                    "metadata": {"labels": {"app.kubernetes.io/part-of": "ray-confidential"}},
                    "spec": pod_spec,
                },
            }
        )
    metadata: dict[str, Any] = {"name": cfg.cluster_name}
    if namespace:
        metadata["namespace"] = namespace
    head_params = {"dashboard-host": "127.0.0.1", "num-cpus": str(cfg.head.resources.get("CPU", 0))}
    return {
        "apiVersion": KUBERAY_API_VERSION,
        "kind": "RayCluster",
        "metadata": metadata,
        "spec": {
            "rayVersion": "2.60.0",
            "enableInTreeAutoscaling": True,
            "headGroupSpec": {
                "rayStartParams": head_params,
                "template": {"spec": {"containers": [{"name": "ray-head", "image": cfg.image}]}},
            },
            "workerGroupSpecs": groups,
        },
    }


# ---------------------------------------------------------------------------------------------- text


def render(cfg: PoolsConfig, fmt: str) -> str:
    """Render as YAML text: ``ray-up`` (a stream of launcher documents) or ``kuberay``."""
    if fmt == "ray-up":
        return str(yaml.safe_dump_all(render_ray_up(cfg), sort_keys=False))
    if fmt == "kuberay":
        return str(yaml.safe_dump(render_kuberay(cfg), sort_keys=False))
    raise ValueError(f"unknown format {fmt!r}; use 'ray-up' or 'kuberay'")


def cmd_render(args: argparse.Namespace) -> int:
    """``ray-confidential pools render --format {ray-up,kuberay} POOLS.yaml [--out FILE]``."""
    try:
        cfg = PoolsConfig.from_yaml(Path(args.pools).read_text())
        text = render(cfg, args.format)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
