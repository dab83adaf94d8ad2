"""Contract with Ray: fails when an API this project relies on changes.

Covered: the pinned version, bootstrap-address discovery (``ray._private.services``), out-of-band
pickle-5 buffers surviving ``ray.put``/``ray.get`` (the sealed payload is one PickleBuffer), the
``ray.io/node-id`` label, the per-node port files in the session directory that name the node id
(``_ray_compat.NODE_PORT_FILE``), and ``ray.cluster_utils.Cluster`` arguments used by the tests.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import ray
import ray._private.services as services
from ray.cluster_utils import Cluster

from ray_confidential import _ray_compat
from ray_confidential.api import _SealedPayload


def test_ray_version_pinned() -> None:
    assert ray.__version__.startswith("2.60."), ray.__version__


def test_bootstrap_address_discovery_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "temp_dir" in inspect.signature(services.canonicalize_bootstrap_address).parameters
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6999")
    assert _ray_compat.running_cluster_address() == "127.0.0.1:6999"


def test_auth_token_setup_contract() -> None:
    from ray._private.authentication import authentication_token_setup as setup

    params = inspect.signature(setup.ensure_token_if_auth_enabled).parameters
    assert list(params)[:2] == ["system_config", "create_token_if_missing"]


def test_cluster_utils_accepts_labels_and_resources() -> None:
    params = inspect.signature(Cluster.add_node).parameters
    assert "node_args" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@pytest.mark.ray
def test_out_of_band_buffer_and_node_label() -> None:
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        payload = bytearray(b"\x01" * (1 << 20))
        ref = ray.put(_SealedPayload(payload))
        back = ray.get(ref)
        assert isinstance(back, _SealedPayload)
        view = memoryview(back.data)
        assert view.readonly and bytes(view) == bytes(payload)  # zero-copy view into plasma
        node = ray.nodes()[0]
        assert node["Labels"]["ray.io/node-id"] == node["NodeID"]
        # An executor started before `ray start` learns the node id from the session directory.
        from enclave_actors.local_node import wait_for_local_node_id

        session_dir = Path(ray._private.worker.global_worker.node.get_session_dir_path())
        assert wait_for_local_node_id(session_dir, wait_s=10) == node["NodeID"]
    finally:
        ray.shutdown()
