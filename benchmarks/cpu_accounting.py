"""CPU time per process role on this host, from ``/proc/<pid>/stat`` (utime + stime), for benchmarks
that ask where a call's CPU goes: the driver, Ray workers (the shims and plain tasks), the rest of
Ray, the executor daemon and the executor's workers.

    before = snapshot()
    ...                                   # run n calls
    per_call_ms(before, snapshot(), n)    # {"driver": 0.9, "ray_workers": 1.2, ...}

Linux only. Processes that start or end between the snapshots count only for the time they were
seen in both; processes of other programs on the host are counted under ``other``.
"""

from __future__ import annotations

import os
from typing import Final

ROLES: Final = ("driver", "ray_workers", "ray_system", "executor_daemon", "executor_workers", "other")
EXECUTOR_ROLES: Final = ("executor_daemon", "executor_workers")
_RAY_AGENTS: Final = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
"""Ray's per-node agents: named like workers, counted with the rest of Ray (metrics, runtime envs)."""


def _role(pid: int, cmdline: str) -> str:
    if pid == os.getpid():
        return "driver"
    if "enclave_actors.worker" in cmdline:
        return "executor_workers"
    if "enclave_actors.cli" in cmdline or "ray-confidential executor" in cmdline:
        return "executor_daemon"
    if cmdline.startswith("ray::") and not cmdline.startswith(_RAY_AGENTS):
        return "ray_workers"
    if "ray" in cmdline:
        return "ray_system"
    return "other"


def snapshot() -> dict[int, tuple[str, float]]:
    """(role, CPU seconds so far) of every process this user can read."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(name)] = (_role(int(name), cmdline), (int(fields[11]) + int(fields[12])) / tick)
    return out


def per_call_ms(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], calls: int
) -> dict[str, float]:
    """Milliseconds of CPU per call by role between two snapshots; ``total`` leaves out ``other``."""
    ms = dict.fromkeys(ROLES, 0.0)
    for pid, (role, cpu) in after.items():
        if pid in before:
            ms[role] += (cpu - before[pid][1]) * 1e3 / calls
    ms["total"] = sum(ms[r] for r in ROLES if r != "other")
    return ms
