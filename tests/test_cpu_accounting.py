"""benchmarks/cpu_accounting.py: CPU per call by process role, as benchmarks/tasks.py reports it."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks import cpu_accounting


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_roles_by_command_line() -> None:
    assert cpu_accounting._role(12345, "ray::_shim_task") == "ray_workers"
    assert cpu_accounting._role(12345, "ray::DashboardAgent") == "ray_system"
    assert cpu_accounting._role(12345, "/usr/bin/python -m enclave_actors.worker 5 0") == "executor_workers"
    assert cpu_accounting._role(12345, "/usr/bin/python -m enclave_actors.cli executor --tee sev-snp") == (
        "executor_daemon"
    )
    assert cpu_accounting._role(12345, "/site-packages/ray/core/src/ray/raylet/raylet --node") == "ray_system"
    assert cpu_accounting._role(12345, "/usr/sbin/sshd") == "other"


def test_counts_this_process_and_a_child_by_role() -> None:
    # A child whose command line names the executor's worker module is counted as one.
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
         "time.sleep(30)", "enclave_actors.worker"]
    )  # fmt: skip
    try:
        time.sleep(0.05)
        before = cpu_accounting.snapshot()
        _burn(0.3)
        time.sleep(0.5)  # the child burns its 0.3 s meanwhile
        ms = cpu_accounting.per_call_ms(before, cpu_accounting.snapshot(), 10)
    finally:
        child.kill()
        child.wait()
    assert 20 <= ms["driver"] <= 40  # 0.3 s over 10 calls, in 10 ms ticks
    assert 10 <= ms["executor_workers"] <= 40
    assert ms["total"] == sum(ms[r] for r in cpu_accounting.ROLES if r != "other")
