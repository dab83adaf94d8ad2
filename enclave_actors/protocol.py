"""Wire format between shims, the executor daemon and its workers (docs/executor.md, "Protocol").

One message on a Unix stream socket::

    version u8 (0x01) || header_len u32 || frame_count u16 || header (UTF-8 JSON object)
                      || frame_count x (u64 length || bytes)

File descriptors (sealed memfds of large inputs and outputs) travel as SCM_RIGHTS ancillary data
with the first bytes of the message; the header's ``fds`` field says how many to expect. Every
length has a checked maximum; anything malformed raises :class:`ProtocolError` and the connection
is dropped.

    >>> import socket
    >>> a, b = socket.socketpair()
    >>> send(a, {"op": "ping"}, [b"x"])
    >>> recv(b)
    Message(header={'op': 'ping'}, frames=[b'x'], fds=[])

What it does NOT do: authenticate the peer (socket permissions admit only the Ray user, and
anything a shim sends is untrusted input to the executor).
"""

from __future__ import annotations

import array
import json
import mmap
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

VERSION: Final = 0x01
MAX_HEADER: Final = 1 << 20
MAX_FRAMES: Final = 1024
MAX_FRAME: Final = 64 << 20
MAX_TOTAL_FRAMES: Final = 128 << 20
MAX_FDS: Final = 64
_PREFIX = struct.Struct(">BIH")
_PACK_LIMIT: Final = 64 << 10
"""Frames up to this size are copied after the header (one buffer); larger ones are sent in place."""
_IOV_BATCH: Final = 256
_U64 = struct.Struct(">Q")
_REQUIRED_SEALS: Final = (
    getattr(os, "F_SEAL_WRITE", 8) | getattr(os, "F_SEAL_SHRINK", 2) | getattr(os, "F_SEAL_GROW", 4)
)
_F_GET_SEALS: Final = 1034
_F_ADD_SEALS: Final = 1033
_F_SEAL_SEAL: Final = 1
_POPULATE: Final = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
"""Map memfds pre-faulted: one kernel call instead of a page fault per 4 KiB (large sealed inputs)."""


class ProtocolError(Exception):
    """A malformed or oversized message (the connection is closed)."""


@dataclass(slots=True)
class Message:
    header: dict[str, Any]
    frames: list[bytes] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


def send(
    sock: socket.socket, header: dict[str, Any], frames: Sequence[Any] = (), fds: Sequence[int] = ()
) -> None:
    """Send one message with as few ``sendmsg`` calls as the kernel allows (usually one).

    Small frames are packed after the header; large ones go as their own buffers (never copied), so
    the receiver wakes up once for a whole small message instead of once per part.
    """
    body = json.dumps({**header, "fds": len(fds)} if fds else header, separators=(",", ":")).encode()
    if len(body) > MAX_HEADER or len(frames) > MAX_FRAMES or len(fds) > MAX_FDS:
        raise ProtocolError("message over the protocol limits")
    head = bytearray(_PREFIX.pack(VERSION, len(body), len(frames)))
    head += body
    parts: list[Any] = []
    for frame in frames:
        view = memoryview(frame).cast("B")
        head += _U64.pack(len(view))
        if len(view) <= _PACK_LIMIT:
            head += view
        else:
            parts.append(memoryview(head))
            parts.append(view)
            head = bytearray()
    if head:
        parts.append(memoryview(head))
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while parts:
        sent = sock.sendmsg(parts[:_IOV_BATCH], ancillary)
        ancillary = []  # descriptors travel with the first bytes only
        while parts and sent >= len(parts[0]):
            sent -= len(parts.pop(0))
        if parts and sent:
            parts[0] = parts[0][sent:]


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k
    return buf


def recv(sock: socket.socket) -> Message:
    """Receive one message.

    Raises:
        ConnectionError: the peer closed the connection before a whole message arrived.
        ProtocolError: bad version, sizes over the limits, or a header that is not a JSON object.
    """
    fds: list[int] = []
    first, ancdata, _flags, _addr = sock.recvmsg(
        _PREFIX.size, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    )
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    try:
        if not first:
            raise ConnectionError("peer closed the connection")
        prefix = bytes(first) + bytes(_recv_exact(sock, _PREFIX.size - len(first)))
        version, header_len, frame_count = _PREFIX.unpack(prefix)
        if version != VERSION or header_len > MAX_HEADER or frame_count > MAX_FRAMES:
            raise ProtocolError("bad message prefix")
        # Each read also takes the next frame's length: one recv per part instead of two.
        part = _recv_exact(sock, header_len + (_U64.size if frame_count else 0))
        try:
            header = json.loads(bytes(part[:header_len]))
        except ValueError:
            raise ProtocolError("header is not JSON") from None
        if not isinstance(header, dict):
            raise ProtocolError("header is not a JSON object")
        frames: list[bytes] = []
        total = 0
        for i in range(frame_count):
            (size,) = _U64.unpack_from(part, len(part) - _U64.size)
            total += size
            if size > MAX_FRAME or total > MAX_TOTAL_FRAMES:
                raise ProtocolError("frame over the size limit")
            more = _U64.size if i + 1 < frame_count else 0
            part = _recv_exact(sock, size + more)
            frames.append(bytes(memoryview(part)[:size]) if more else bytes(part))
        if header.pop("fds", 0) != len(fds):
            raise ProtocolError("file descriptor count does not match the header")
        return Message(header, frames, fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


# -- sealed memfds: immutable buffers passed by descriptor ------------------------------------------


def sealed_memfd(data: Any, name: str = "rc-sealed") -> int:
    """A memfd holding a copy of ``data``, sealed against writes, shrinking and growing.

    The receiver checks the seals (:func:`map_sealed_memfd`), so the sender cannot change the bytes
    while the executor reads them (no time-of-check/time-of-use on ciphertext).
    """
    view = memoryview(data).cast("B")
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        # write(2), not a mapping: the kernel copies into fresh pages without a user page fault per
        # 4 KiB (2.4x faster for 64 MiB here: benchmarks/executor.py).
        done = 0
        while done < len(view):
            done += os.write(fd, view[done : done + (1 << 30)])
        seal_memfd(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


class MemfdWriter:
    """An ``allocate(size)`` callback for ``seal``: writes straight into a new memfd mapping."""

    def __init__(self, name: str = "rc-out") -> None:
        self.fd = -1
        self._map: mmap.mmap | None = None
        self._name = name

    def __call__(self, size: int) -> memoryview:
        self.fd = os.memfd_create(self._name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        if size:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size, flags=_POPULATE)
            return memoryview(self._map)
        return memoryview(bytearray(0))

    def finish(self) -> int:
        """Unmap, seal and return the descriptor (the caller owns it)."""
        if self._map is not None:
            self._map.close()
            self._map = None
        seal_memfd(self.fd)
        return self.fd


def seal_memfd(fd: int) -> None:
    import fcntl

    fcntl.fcntl(fd, _F_ADD_SEALS, _REQUIRED_SEALS | _F_SEAL_SEAL)


def check_sealed_memfd(fd: int) -> int:
    """Check that ``fd`` is a memfd sealed against write, shrink and grow; return its size.

    Raises:
        ProtocolError: the descriptor is not a memfd sealed against write, shrink and grow.
    """
    import fcntl

    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError:
        raise ProtocolError("input descriptor is not a sealed memfd") from None
    if seals & _REQUIRED_SEALS != _REQUIRED_SEALS:
        raise ProtocolError("input memfd is not sealed against writes")
    return os.fstat(fd).st_size


def read_sealed_prefix(fd: int, n: int) -> bytes:
    """The first ``n`` bytes (or fewer, if shorter) of a sealed memfd, read without mapping it
    (the executor parses only the sealed header; the worker maps the rest)."""
    size = check_sealed_memfd(fd)
    return os.pread(fd, min(n, size), 0)


def map_sealed_memfd(fd: int) -> memoryview:
    """Map a received memfd read-only after checking it is sealed immutable.

    Raises:
        ProtocolError: the descriptor is not a memfd sealed against write, shrink and grow.
    """
    size = check_sealed_memfd(fd)
    if size == 0:
        return memoryview(b"")
    return memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=_POPULATE))


class SealedMapCache:
    """Read-only mappings of the sealed memfds of the last call, kept by inode for the next one.

    A memfd sealed against write, shrink and grow never changes, and holding its mapping keeps its
    inode alive, so a descriptor with the same (device, inode) and size is the same immutable
    bytes: an input passed again costs no new mapping of every page. Only the last call's inputs are
    kept (:meth:`end_call`), so a worker holds at most one call's ciphertext. (Even a wrapped inode
    number could only substitute another sealed object with the same header, data key and
    commitment: the AEAD opens nothing else.)
    """

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int, int], memoryview] = {}
        self._used: set[tuple[int, int, int]] = set()

    def map(self, fd: int) -> memoryview:
        """:func:`map_sealed_memfd`, reusing the last call's mapping of the same sealed memfd.

        Raises:
            ProtocolError: as :func:`map_sealed_memfd`.
        """
        size = check_sealed_memfd(fd)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, size)
        view = self._maps.get(key)
        if view is None:
            view = map_sealed_memfd(fd)
            if size:
                self._maps[key] = view
        self._used.add(key)
        return view

    def end_call(self) -> None:
        """Drop the mappings this call did not use."""
        for key in [k for k in self._maps if k not in self._used]:
            del self._maps[key]
        self._used.clear()


__all__ = [
    "MemfdWriter",
    "Message",
    "ProtocolError",
    "SealedMapCache",
    "check_sealed_memfd",
    "map_sealed_memfd",
    "read_sealed_prefix",
    "recv",
    "sealed_memfd",
    "send",
]
