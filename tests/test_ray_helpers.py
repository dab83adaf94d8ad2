"""Test infrastructure: the multi-node fixtures' guard against a Ray node that dies by itself during
set-up, and stopping simulated executors."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray._private.ray_constants import PROCESS_TYPE_RAYLET as RAYLET
from ray.cluster_utils import Cluster

from tests.ray_helpers import NODE_LOST, check_cluster_processes

pytestmark = pytest.mark.ray


def test_a_raylet_that_died_by_itself_fails_set_up_with_the_rerun_message() -> None:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        node = c.add_node(num_cpus=1)
        check_cluster_processes(c)  # all alive: no error
        node.all_processes[RAYLET][0].process.kill()  # not through Ray: as if it crashed
        node.all_processes[RAYLET][0].process.wait(10)
        with pytest.raises(RuntimeError, match=NODE_LOST) as info:
            check_cluster_processes(c)
        assert node.node_id[:12] in str(info.value) and RAYLET in str(info.value)
    finally:
        c.shutdown()  # type: ignore[no-untyped-call]


def test_pyproject_reruns_exactly_on_that_message() -> None:
    pyproject = Path(__file__).parents[1].joinpath("pyproject.toml").read_text()
    assert f'--only-rerun "{NODE_LOST}"' in pyproject


def test_an_executor_that_reuses_a_stopped_executors_pid_is_still_stopped() -> None:
    import subprocess
    import sys

    from ray_confidential.testing.tee_node import ExecutorProcess, stop_executor

    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    second = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    class Reused(ExecutorProcess):  # the kernel gave the later executor the earlier one's pid
        @property
        def pid(self) -> int:
            return int(first.pid)

    def executor(proc: subprocess.Popen[bytes]) -> ExecutorProcess:
        return Reused("n" * 56, "sev-snp", "/nonexistent", "/nonexistent.device", "/dev/null", proc,
                      broker=None, shared_broker=False)  # fmt: skip

    try:
        stop_executor(executor(first))
        assert first.returncode is not None
        stop_executor(executor(second))
        assert second.returncode is not None  # stopped, not skipped as "already stopped"
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
