"""A 2-node Cluster: sealed objects cross nodes as ciphertext and open at the owner."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import ray
from ray.cluster_utils import Cluster

import ray_confidential as rc
from ray_confidential.api import seal_and_put
from ray_confidential.domains import DomainDescriptor
from tests.ray_helpers import marked_table

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Cluster]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1, resources={"node_b": 1})
    c.wait_for_nodes()
    rc.init(address=c.address, dev=True)
    rc.create_domain("x-node")
    yield c
    rc.shutdown()
    ray.shutdown()
    c.shutdown()


@ray.remote(resources={"node_b": 1})
def _seal_on_b(descriptor: DomainDescriptor, marker: str) -> tuple[rc.SealedRef, str]:
    """An untrusted worker on node B seals with the public descriptor only."""
    ref = seal_and_put(marked_table(marker, 20_000), descriptor)
    return ref, ray.get_runtime_context().get_node_id()


@ray.remote(resources={"node_b": 1})
def _digest_on_b(ref: rc.SealedRef) -> tuple[str, str]:
    data = rc.export(ref)
    return hashlib.sha256(data).hexdigest(), ray.get_runtime_context().get_node_id()


def test_cross_node_transfer_and_open(two_nodes: Cluster) -> None:
    from ray_confidential.api import _session_or_die

    head_id = ray.get_runtime_context().get_node_id()
    descriptor = _session_or_die().key_service.descriptor("x-node")
    ref, sealed_on = ray.get(_seal_on_b.remote(descriptor, "XNODE"))
    assert sealed_on != head_id
    table = rc.get(ref)  # pulled from node B to the driver's node, opened by the owner
    assert table.equals(marked_table("XNODE", 20_000))

    mine = rc.put(marked_table("BACK", 20_000), domain="x-node")
    digest, ran_on = ray.get(_digest_on_b.remote(mine))
    assert ran_on != head_id
    assert digest == hashlib.sha256(rc.export(mine)).hexdigest()  # node B received the same ciphertext
