"""Process hardening for the executor and its workers: not dumpable, no core files, limits.

``prctl(PR_SET_DUMPABLE, 0)`` makes ``/proc/<pid>/mem``, ``ptrace`` attach and core dumps need
CAP_SYS_PTRACE even for processes of the same user (proc(5), ptrace(2) "ptrace access mode
checking"); it is reset by ``execve``, so every executor process calls :func:`harden` itself.

    >>> harden()            # doctest: +SKIP
    >>> is_dumpable()       # doctest: +SKIP
    False
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PR_SET_PDEATHSIG = 1


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    result = int(libc.prctl(option, arg, 0, 0, 0))
    if result < 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")
    return result


def harden(*, memory_limit_bytes: int | None = None) -> None:
    """Not dumpable, RLIMIT_CORE 0, and optionally an address-space limit.

    Raises:
        OSError: the kernel refused (the executor must not run unhardened).
    """
    _prctl(PR_SET_DUMPABLE, 0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))


def is_dumpable() -> bool:
    return _prctl(PR_GET_DUMPABLE) != 0


def die_with_parent(signal_number: int) -> None:
    """Deliver ``signal_number`` to this process when its parent exits (PR_SET_PDEATHSIG)."""
    _prctl(PR_SET_PDEATHSIG, signal_number)


__all__ = ["die_with_parent", "harden", "is_dumpable"]
