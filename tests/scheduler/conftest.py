"""Shared fixtures for the scheduler tests."""

from __future__ import annotations

from pathlib import Path

import pytest

POOLS_YAML = """
version: 1
cluster_name: hybrid
image: example.org/ray-confidential:1
executor: {command: ray-confidential executor, socket_group: ray, broker: "https://kbs.example:8443"}
head: {provider: aws, region: eu-west-1, instance_type: m6i.large}
pools:
  - name: snp-eu
    provider: aws
    region: eu-west-1
    node_kind: sev-snp
    instance_type: m6a.4xlarge
    resources: {CPU: 16}
    labels: {team: ml}
    min_nodes: 1
    max_nodes: 4
    residency: {chip_ids: ["%s"]}
    kubernetes: {platform: coco}
  - name: tdx-gpu
    provider: gcp
    region: us-central1
    node_kind: tdx
    gpu_cc: true
    instance_type: a3-highgpu-1g
    resources: {CPU: 26, GPU: 1}
    max_nodes: 2
    provider_config: {project_id: my-project, availability_zone: us-central1-a}
    kubernetes: {platform: gke-confidential}
  - name: snp-az
    provider: azure
    region: westeurope
    node_kind: sev-snp
    instance_type: Standard_DC8as_v5
    max_nodes: 3
    provider_config: {resource_group: rc-rg}
    residency: {instance_ids: [vm-1, vm-2]}
    kubernetes: {platform: aks-cvm, node_pool: cvmpool}
  - name: sgx-dc1
    provider: on-prem
    region: dc1
    node_kind: none
    enclave_service: sgx
    max_nodes: 2
    hosts: [10.0.0.5, 10.0.0.6]
    provider_config: {head_ip: 10.0.0.4}
""" % ("ab" * 64)


@pytest.fixture
def pools_file(tmp_path: Path) -> Path:
    p = tmp_path / "pools.yaml"
    p.write_text(POOLS_YAML)
    return p
