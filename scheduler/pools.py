"""Node pools: where confidential nodes come from, what they are, and where they may be (design.md s.7).

One entry point, :meth:`PoolsConfig.from_yaml` / :meth:`PoolsConfig.from_dict`; unknown keys and bad
values are errors naming the pool and field, so a typo never widens what a pool admits.

    >>> cfg = PoolsConfig.from_yaml('''
    ... version: 1
    ... cluster_name: demo
    ... pools:
    ...   - {name: snp-eu, provider: azure, region: westeurope, node_kind: sev-snp, max_nodes: 4}
    ...   - {name: sgx-onprem, provider: on-prem, region: dc1, node_kind: none, enclave_service: sgx,
    ...      max_nodes: 2, hosts: [10.0.0.5, 10.0.0.6]}
    ... ''')
    >>> [(p.name, p.tee) for p in cfg.pools]
    [('snp-eu', 'sev-snp'), ('sgx-onprem', 'sgx')]
    >>> cfg.pool("snp-eu").ray_labels()["ray-confidential.io/tee"]
    'sev-snp'

Residency: a pool's ``residency`` allow-lists identifiers. ``chip_ids`` (SEV-SNP CHIP_ID, signed by the
chip's VCEK) and ``nitro_module_ids`` (Nitro attestation document ``module_id``, signed by the AWS Nitro
PKI) are bound to the evidence. ``instance_ids`` rest on the provider's identity documents (the cloud
operator vouches for them; they are outside the TEE threat model). A pool with neither rests on labels
and on which node the broker was told it is: see :attr:`NodePool.residency_basis` and docs/placement.md.

What this module does NOT check: that a provider offers the named node kind in the region, or that an
instance type is confidential; those are the provider's API's errors at launch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import yaml

from ray_confidential.attestation.claims import Violation
from ray_confidential.errors import PolicyViolation
from scheduler.labels import (
    POOL_LABEL,
    REGION_LABEL,
    RESERVED_LABEL_PREFIXES,
    TEE_LABEL,
    check_label_value,
)

SCHEMA_VERSION: Final = 1
PROVIDERS: Final = ("on-prem", "aws", "azure", "gcp")
NODE_KINDS: Final = ("sev-snp", "tdx", "none")
ENCLAVE_SERVICES: Final = ("sgx", "nitro")
K8S_PLATFORMS: Final = ("aks-cvm", "gke-confidential", "coco", "none")
DEFAULT_IMAGE: Final = "rayproject/ray:2.60.0-py311"
DEFAULT_EXECUTOR_COMMAND: Final = "ray-confidential executor"
DEFAULT_LAUNCH_DATA: Final = "/etc/ray-confidential/launch.json"
MAX_NODES_LIMIT: Final = 100_000
SNP_CHIP_ID_HEX_LEN: Final = 128
"""SEV-SNP ATTESTATION_REPORT.CHIP_ID is 64 bytes (SEV-SNP ABI spec, Table 23)."""

ResidencyBasis = Literal["evidence", "provider-identity", "labels"]

_POOL_KEYS: Final = (
    "name", "provider", "region", "node_kind", "enclave_service", "gpu_cc", "labels", "min_nodes",
    "max_nodes", "resources", "instance_type", "node_config", "provider_config", "hosts", "residency",
    "kubernetes",
)  # fmt: skip
_NAME_RE: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HEX_RE: Final = re.compile(r"[0-9a-f]+")


def _err(where: str, msg: str) -> ValueError:
    return ValueError(f"pools config: {where}: {msg}")


def _take(data: Mapping[str, Any], known: Sequence[str], where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise _err(where, f"expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise _err(where, f"unknown keys {unknown}; known keys: {sorted(known)}")
    return dict(data)


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise _err(where, f"expected a non-empty string, got {v!r}")
    return v


def _str_list(v: Any, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str) or not isinstance(v, Sequence):
        raise _err(where, f"expected a list of strings, got {v!r}")
    return tuple(_str(x, where) for x in v)


def _str_map(v: Any, where: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, Mapping) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise _err(where, f"expected a mapping of strings to strings, got {v!r}")
    return dict(v)


def _int(v: Any, where: str, *, lo: int = 0, hi: int = MAX_NODES_LIMIT) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _err(where, f"expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def _one_of(v: Any, choices: Sequence[str], where: str) -> str:
    if v not in choices:
        raise _err(where, f"{v!r} is not one of {list(choices)}")
    return str(v)


@dataclass(frozen=True, slots=True, kw_only=True)
class Residency:
    """Owner allow-lists of where a pool's nodes may be. Empty tuple = that identifier is not checked.

    Attributes:
        chip_ids: SEV-SNP CHIP_ID values (128 lower-case hex characters), evidence-bound.
        nitro_module_ids: Nitro attestation-document ``module_id`` values, evidence-bound.
        instance_ids: cloud instance ids from the provider's signed identity document (AWS instance
            identity document, GCP instance identity token, Azure IMDS attested data): the provider
            vouches for them, the TEE does not.
    """

    chip_ids: tuple[str, ...] = ()
    nitro_module_ids: tuple[str, ...] = ()
    instance_ids: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str) -> Residency:
        if data is None:
            return cls()
        d = _take(data, ("chip_ids", "nitro_module_ids", "instance_ids"), where)
        chip_ids = tuple(x.lower() for x in _str_list(d.get("chip_ids"), f"{where}.chip_ids"))
        for c in chip_ids:
            if len(c) != SNP_CHIP_ID_HEX_LEN or not _HEX_RE.fullmatch(c):
                raise _err(f"{where}.chip_ids", f"{c[:20]!r}... is not a 64-byte hex SEV-SNP CHIP_ID")
        return cls(
            chip_ids=chip_ids,
            nitro_module_ids=_str_list(d.get("nitro_module_ids"), f"{where}.nitro_module_ids"),
            instance_ids=_str_list(d.get("instance_ids"), f"{where}.instance_ids"),
        )

    def to_dict(self) -> dict[str, list[str]]:
        return {k: list(getattr(self, k)) for k in ("chip_ids", "nitro_module_ids", "instance_ids")}


@dataclass(frozen=True, slots=True, kw_only=True)
class KubernetesPool:
    """How a pool maps onto Kubernetes node pools for the KubeRay rendering.

    Attributes:
        platform: ``aks-cvm`` (AKS node pool of confidential VM sizes, selected by agent-pool name),
            ``gke-confidential`` (Confidential GKE Nodes, selected by instance type label), ``coco``
            (Confidential Containers: each pod is a kata-cc confidential VM), or ``none``.
        node_selector: extra ``nodeSelector`` entries (override the platform's).
        runtime_class_name: ``runtimeClassName`` (``coco`` default: ``kata-qemu-snp`` / ``kata-qemu-tdx``).
        node_pool: cloud node-pool name (AKS agent pool) where the platform selects by it.
    """

    platform: str = "none"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    runtime_class_name: str | None = None
    node_pool: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str) -> KubernetesPool:
        if data is None:
            return cls()
        d = _take(data, ("platform", "node_selector", "runtime_class_name", "node_pool"), where)
        rcn = d.get("runtime_class_name")
        pool = d.get("node_pool")
        return cls(
            platform=_one_of(d.get("platform", "none"), K8S_PLATFORMS, f"{where}.platform"),
            node_selector=_str_map(d.get("node_selector"), f"{where}.node_selector"),
            runtime_class_name=None if rcn is None else _str(rcn, f"{where}.runtime_class_name"),
            node_pool=None if pool is None else _str(pool, f"{where}.node_pool"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NodePool:
    """One pool of nodes of the same kind, provider and region.

    Attributes:
        name: pool name (label value; lower-case letters, digits, '-').
        provider: ``on-prem``, ``aws``, ``azure`` or ``gcp``.
        region: provider region (label value).
        node_kind: ``sev-snp`` or ``tdx`` (confidential VM), or ``none`` with an ``enclave_service``.
        enclave_service: ``sgx`` or ``nitro`` on an ordinary node; ``None`` for confidential VMs.
        gpu_cc: the nodes carry GPUs in confidential-computing mode (CVM kinds only).
        labels: extra node labels (keys may not start with ``ray.io/`` or ``ray-confidential.io/``).
        min_nodes, max_nodes: worker count bounds (0 <= min <= max).
        resources: Ray resources per node (integers, e.g. ``{CPU: 8, GPU: 1}``).
        instance_type: provider instance type / VM size.
        node_config, provider_config: passed through to the Ray cluster launcher.
        hosts: on-prem worker addresses (cluster launcher ``local`` provider).
        residency: owner allow-lists (:class:`Residency`).
        kubernetes: KubeRay mapping (:class:`KubernetesPool`).
    """

    name: str
    provider: str
    region: str
    node_kind: str
    enclave_service: str | None = None
    gpu_cc: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    min_nodes: int = 0
    max_nodes: int
    resources: Mapping[str, int] = field(default_factory=dict)
    instance_type: str | None = None
    node_config: Mapping[str, Any] = field(default_factory=dict)
    provider_config: Mapping[str, Any] = field(default_factory=dict)
    hosts: tuple[str, ...] = ()
    residency: Residency = field(default_factory=Residency)
    kubernetes: KubernetesPool = field(default_factory=KubernetesPool)

    @property
    def tee(self) -> str:
        """The TEE kind of this pool's executors (value of the ``ray-confidential.io/tee`` label)."""
        return self.enclave_service if self.node_kind == "none" else self.node_kind  # type: ignore[return-value]

    @property
    def residency_basis(self) -> ResidencyBasis:
        """What this pool's residency rests on: evidence-bound ids, provider identity, or labels only."""
        r = self.residency
        if r.chip_ids or r.nitro_module_ids:
            return "evidence"
        if r.instance_ids:
            return "provider-identity"
        return "labels"

    def ray_labels(self) -> dict[str, str]:
        """The node labels a node of this pool starts with (routing hints, never proof)."""
        return {**self.labels, TEE_LABEL: self.tee, POOL_LABEL: self.name, REGION_LABEL: self.region}

    def check_residency(self, claims: Mapping[str, Any]) -> None:
        """Check a registry entry's claims against this pool's allow-lists.

        ``claims`` keys: ``chip_id`` (hex), ``nitro_module_id``, ``instance_id``. A missing claim for an
        allow-listed identifier is a violation (fail closed).

        Raises:
            PolicyViolation: listing every mismatch.
        """
        r = self.residency
        bad: list[Violation] = []
        for key, allowed in (
            ("chip_id", r.chip_ids),
            ("nitro_module_id", r.nitro_module_ids),
            ("instance_id", r.instance_ids),
        ):
            if not allowed:
                continue
            got = claims.get(key)
            got_s = got.lower() if isinstance(got, str) and key == "chip_id" else got
            if got_s not in allowed:
                bad.append(
                    Violation(field=f"residency.{key}", got=repr(got), want=f"one of {len(allowed)} allowed")
                )
        if bad:
            raise PolicyViolation(bad, f"pool {self.name!r} residency: " + "; ".join(map(str, bad)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> NodePool:
        d = _take(data, _POOL_KEYS, where)
        name = _str(d.get("name"), f"{where}.name")
        if not _NAME_RE.fullmatch(name):
            raise _err(
                f"{where}.name", f"{name!r}: use 1-63 lower-case letters, digits and '-' (e.g. 'snp-eu')"
            )
        where = f"pool {name!r}"
        provider = _one_of(d.get("provider"), PROVIDERS, f"{where}.provider")
        region = check_label_value(_str(d.get("region"), f"{where}.region"), what=f"{where}: region")
        node_kind = _one_of(d.get("node_kind"), NODE_KINDS, f"{where}.node_kind")
        service = d.get("enclave_service")
        if node_kind == "none":
            if service is None:
                raise _err(where, f"node_kind 'none' needs enclave_service: one of {list(ENCLAVE_SERVICES)}")
            service = _one_of(service, ENCLAVE_SERVICES, f"{where}.enclave_service")
        elif service is not None:
            raise _err(
                where, f"enclave_service is for node_kind 'none'; a {node_kind} node's executor is the CVM"
            )
        gpu_cc = d.get("gpu_cc", False)
        if not isinstance(gpu_cc, bool):
            raise _err(f"{where}.gpu_cc", "expected true or false")
        if gpu_cc and node_kind == "none":
            raise _err(where, "gpu_cc needs a confidential VM (node_kind sev-snp or tdx)")
        labels = _str_map(d.get("labels"), f"{where}.labels")
        for k, v in labels.items():
            if k.startswith(RESERVED_LABEL_PREFIXES):
                raise _err(
                    f"{where}.labels", f"key {k!r} uses a reserved prefix {list(RESERVED_LABEL_PREFIXES)}"
                )
            check_label_value(v, what=f"{where}: label {k}")
        max_nodes = _int(d.get("max_nodes"), f"{where}.max_nodes")
        min_nodes = _int(d.get("min_nodes", 0), f"{where}.min_nodes")
        if min_nodes > max_nodes:
            raise _err(where, f"min_nodes {min_nodes} > max_nodes {max_nodes}")
        resources_raw = d.get("resources") or {}
        if not isinstance(resources_raw, Mapping):
            raise _err(f"{where}.resources", "expected a mapping such as {CPU: 8, GPU: 1}")
        resources = {
            _str(k, f"{where}.resources"): _int(v, f"{where}.resources.{k}", hi=1 << 20)
            for k, v in resources_raw.items()
        }
        if gpu_cc and resources.get("GPU", 0) < 1:
            raise _err(where, "gpu_cc is true but resources.GPU is not set (e.g. resources: {GPU: 1})")
        for key in ("node_config", "provider_config"):
            if not isinstance(d.get(key) or {}, Mapping):
                raise _err(f"{where}.{key}", "expected a mapping")
        hosts = _str_list(d.get("hosts"), f"{where}.hosts")
        if provider == "on-prem" and len(hosts) < max_nodes:
            raise _err(where, f"on-prem pools list their hosts: {len(hosts)} hosts for max_nodes {max_nodes}")
        if provider != "on-prem" and hosts:
            raise _err(where, "hosts is for on-prem pools; cloud pools are launched by the provider")
        residency = Residency.from_dict(d.get("residency"), f"{where}.residency")
        if residency.chip_ids and node_kind != "sev-snp":
            raise _err(where, "residency.chip_ids are SEV-SNP CHIP_IDs; this pool is not sev-snp")
        if residency.nitro_module_ids and service != "nitro":
            raise _err(where, "residency.nitro_module_ids need enclave_service: nitro")
        itype = d.get("instance_type")
        return cls(
            name=name,
            provider=provider,
            region=region,
            node_kind=node_kind,
            enclave_service=service,
            gpu_cc=gpu_cc,
            labels=labels,
            min_nodes=min_nodes,
            max_nodes=max_nodes,
            resources=resources,
            instance_type=None if itype is None else _str(itype, f"{where}.instance_type"),
            node_config=dict(d.get("node_config") or {}),
            provider_config=dict(d.get("provider_config") or {}),
            hosts=hosts,
            residency=residency,
            kubernetes=KubernetesPool.from_dict(d.get("kubernetes"), f"{where}.kubernetes"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadConfig:
    """The head node: an ordinary, untrusted node (design.md s.3); it carries no TEE labels.

    Attributes:
        provider, region: where the head runs (ray-up groups pools by provider and region).
        resources: Ray resources of the head (default ``{CPU: 0}``: no work scheduled on it).
        instance_type, node_config, provider_config: passed through to the launcher.
        host: on-prem head address.
    """

    provider: str | None = None
    region: str | None = None
    resources: Mapping[str, int] = field(default_factory=lambda: {"CPU": 0})
    instance_type: str | None = None
    node_config: Mapping[str, Any] = field(default_factory=dict)
    provider_config: Mapping[str, Any] = field(default_factory=dict)
    host: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> HeadConfig:
        if data is None:
            return cls()
        keys = ("provider", "region", "resources", "instance_type", "node_config", "provider_config", "host")
        d = _take(data, keys, "head")
        res = d.get("resources", {"CPU": 0})
        if not isinstance(res, Mapping):
            raise _err("head.resources", "expected a mapping")
        return cls(
            provider=None
            if d.get("provider") is None
            else _one_of(d["provider"], PROVIDERS, "head.provider"),
            region=None if d.get("region") is None else _str(d["region"], "head.region"),
            resources={str(k): _int(v, f"head.resources.{k}", hi=1 << 20) for k, v in res.items()},
            instance_type=d.get("instance_type"),
            node_config=dict(d.get("node_config") or {}),
            provider_config=dict(d.get("provider_config") or {}),
            host=d.get("host"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutorConfig:
    """How rendered nodes start the enclave executor (from the measured image).

    Attributes:
        command: executor command; render appends ``--socket --launch-data --node-id auto --tee
            --pool --region`` (``scheduler/render.py``).
        launch_data: the image's 0600 launch-data file: the broker's address, pinned release key and
            CA, the cluster id (docs/executor.md "Running it").
        socket_group: the Ray user's group, given to the executor's socket when the executor runs as
            another user (``--socket-group``); None: the executor's own group.
        broker: the key broker the launch data names, for the reader of the pools file only: the
            executor takes its broker from the launch data in the image, never from here.
    """

    command: str = DEFAULT_EXECUTOR_COMMAND
    launch_data: str = DEFAULT_LAUNCH_DATA
    socket_group: str | None = None
    broker: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ExecutorConfig:
        if data is None:
            return cls()
        d = _take(data, ("command", "launch_data", "socket_group", "broker"), "executor")
        broker, group = d.get("broker"), d.get("socket_group")
        return cls(
            command=_str(d.get("command", DEFAULT_EXECUTOR_COMMAND), "executor.command"),
            launch_data=_str(d.get("launch_data", DEFAULT_LAUNCH_DATA), "executor.launch_data"),
            socket_group=None if group is None else _str(group, "executor.socket_group"),
            broker=None if broker is None else _str(broker, "executor.broker"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolsConfig:
    """A validated pools file (schema version 1)."""

    cluster_name: str
    pools: tuple[NodePool, ...]
    head: HeadConfig = field(default_factory=HeadConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    image: str = DEFAULT_IMAGE

    def pool(self, name: str) -> NodePool:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(f"no pool {name!r}; pools: {[p.name for p in self.pools]}")

    @classmethod
    def from_yaml(cls, text: str | bytes) -> PoolsConfig:
        """Parse a pools YAML document (safe loader only)."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"pools config: not valid YAML: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoolsConfig:
        """Build from a mapping; every error names the pool and field and shows the fix."""
        d = _take(data, ("version", "cluster_name", "pools", "head", "executor", "image"), "top level")
        if d.get("version") != SCHEMA_VERSION:
            raise _err("version", f"expected version: {SCHEMA_VERSION}, got {d.get('version')!r}")
        name = _str(d.get("cluster_name"), "cluster_name")
        if not _NAME_RE.fullmatch(name):
            raise _err("cluster_name", f"{name!r}: use lower-case letters, digits and '-'")
        raw_pools = d.get("pools")
        if not isinstance(raw_pools, Sequence) or isinstance(raw_pools, str) or not raw_pools:
            raise _err("pools", "expected a non-empty list of pools")
        pools = tuple(NodePool.from_dict(p, f"pools[{i}]") for i, p in enumerate(raw_pools))
        seen: set[str] = set()
        for p in pools:
            if p.name in seen:
                raise _err("pools", f"duplicate pool name {p.name!r}")
            seen.add(p.name)
        image = d.get("image", DEFAULT_IMAGE)
        return cls(
            cluster_name=name,
            pools=pools,
            head=HeadConfig.from_dict(d.get("head")),
            executor=ExecutorConfig.from_dict(d.get("executor")),
            image=_str(image, "image"),
        )
