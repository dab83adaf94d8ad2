"""An unprivileged attacker process: tries to read another process's memory through /proc/PID/mem.

python -m tests.executor.attacker PID MARKER   -> prints one JSON line {"opened": bool, "found": bool, "error": str}
"""

from __future__ import annotations

import json
import re
import sys


def read_memory(pid: int, marker: bytes) -> dict[str, object]:
    try:
        maps = open(f"/proc/{pid}/maps").read()
        mem = open(f"/proc/{pid}/mem", "rb", buffering=0)
    except OSError as exc:
        return {"opened": False, "found": False, "error": type(exc).__name__}
    found = False
    with mem:
        for line in maps.splitlines():
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) r", line)
            if not m:
                continue
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            if end - start > 512 << 20:
                continue
            try:
                mem.seek(start)
                if marker in mem.read(end - start):
                    found = True
                    break
            except OSError:
                continue
    return {"opened": True, "found": found, "error": ""}


if __name__ == "__main__":
    print(json.dumps(read_memory(int(sys.argv[1]), sys.argv[2].encode())))
