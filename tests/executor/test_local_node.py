"""--node-id auto: the executor takes its node id from this host's Ray session directory."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from enclave_actors.local_node import local_node_ids, wait_for_local_node_id
from tests.executor.conftest import executor_start

A, B = "ab" * 28, "cd" * 28


def test_the_one_node_of_the_session_directory(tmp_path: Path) -> None:
    for name in (
        f"metrics_agent_port_{A}",
        f"runtime_env_agent_port_{A}",
        "logs",
        "sockets",
        "ports_by_node.json",
    ):
        (tmp_path / name).touch()
    assert local_node_ids(tmp_path) == {A}
    assert wait_for_local_node_id(tmp_path, wait_s=0) == A
    assert local_node_ids(tmp_path / "missing") == set()


def test_waits_for_ray_to_start_and_refuses_ambiguity(tmp_path: Path) -> None:
    later = threading.Timer(0.3, lambda: (tmp_path / f"metrics_agent_port_{B}").touch())
    later.start()
    assert wait_for_local_node_id(tmp_path, wait_s=10, poll_s=0.05) == B
    later.join()
    (tmp_path / f"metrics_agent_port_{A}").touch()  # a second raylet on the same host
    with pytest.raises(ValueError, match="2 Ray nodes"):
        wait_for_local_node_id(tmp_path, wait_s=1)
    with pytest.raises(TimeoutError, match="no Ray node started"):
        wait_for_local_node_id(tmp_path / "empty", wait_s=0.2, poll_s=0.05)


def test_the_executor_gives_up_clearly_when_ray_never_starts(tmp_path: Path) -> None:
    run = executor_start(tmp_path, "--tee", "sev-snp", "--node-id", "auto", "--ray-session-dir", str(tmp_path),
                         "--node-id-wait", "0.3", "--kbs", "127.0.0.1:1", "--release-key", str(tmp_path / "k"))  # fmt: skip
    assert run.returncode == 2 and "--node-id auto: no Ray node started" in run.stderr


def test_shims_find_the_node_images_executor_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside rc.init's development executors, a shim finds the executor where the rendered node
    configs start it (NODE_SOCKET), unless RAY_CONFIDENTIAL_EXECUTOR_SOCKET names another."""
    from enclave_actors import shim
    from ray_confidential.errors import KeyReleaseDenied

    monkeypatch.delenv(shim.SOCKET_ENV, raising=False)
    monkeypatch.setattr(shim, "NODE_SOCKET", str(tmp_path / "executor.sock"))
    with pytest.raises(KeyReleaseDenied, match="does not exist"):
        shim.resolve_socket_path()
    (tmp_path / "executor.sock").touch()
    assert shim.resolve_socket_path() == str(tmp_path / "executor.sock")
    monkeypatch.setenv(shim.SOCKET_ENV, "/elsewhere.sock")
    assert shim.resolve_socket_path() == "/elsewhere.sock"
    import ray

    assert not ray.is_initialized()  # looking for the socket never starts a Ray of its own
