"""Look for plaintext where Ray keeps data: the plasma object store, spill files, logs.

Used by the demo and the tests to show (and assert) that a marker planted in sealed data appears
nowhere Ray can see, while the same scan finds a plain ``ray.put`` control (proving it can see).
Reading another process's mappings needs the same user or CAP_SYS_PTRACE.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "f").write_bytes(b"xx MARK yy")
    >>> [p.name for p in files_containing(d, b"MARK")]
    ['f']
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

_CHUNK = 8 << 20
_PLASMA_MAP = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ (\d+)\s+(/dev/shm/plasma\S*)")


def _contains(f: object, marker: bytes, size: int | None = None) -> bool:
    """Stream a file object in chunks (with overlap) looking for ``marker``."""
    read = f.read  # type: ignore[attr-defined]
    tail = b""
    remaining = size
    while remaining is None or remaining > 0:
        want = _CHUNK if remaining is None else min(_CHUNK, remaining)
        block = read(want)
        if not block:
            return False
        if marker in tail + block:
            return True
        tail = block[-(len(marker) - 1) :] if len(marker) > 1 else b""
        if remaining is not None:
            remaining -= len(block)
    return False


def plasma_mappings() -> list[Path]:
    """The plasma store files mapped by Ray processes on this host, one path per distinct file."""
    seen: set[tuple[str, str]] = set()
    found: list[Path] = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            m = _PLASMA_MAP.match(line)
            if m and (m.group(3), m.group(4)) not in seen:
                seen.add((m.group(3), m.group(4)))
                found.append(Path(f"/proc/{pid}/map_files/{m.group(1)}-{m.group(2)}"))
    return found


def plasma_contains(marker: bytes) -> bool:
    """True when any plasma store file on this host holds ``marker`` (reads only data extents)."""
    for path in plasma_mappings():
        try:
            with open(path, "rb") as f:
                if _sparse_contains(f.fileno(), marker):
                    return True
        except OSError:
            continue
    return False


def _sparse_contains(fd: int, marker: bytes) -> bool:
    end = os.fstat(fd).st_size
    pos = 0
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            stop = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError:
            return False
        os.lseek(fd, start, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            f.seek(start)
            if _contains(f, marker, stop - start):
                return True
        pos = stop
    return False


def files_containing(root: str | os.PathLike[str], marker: bytes) -> list[Path]:
    """Every regular file under ``root`` whose bytes contain ``marker``."""
    hits = []
    for path in _walk(Path(root)):
        try:
            with open(path, "rb") as f:
                if _contains(f, marker):
                    hits.append(path)
        except OSError:
            continue
    return hits


def _walk(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            yield Path(dirpath) / name
