"""The simulated attestation device: a Unix socket that answers only the executor's own process.

On real hardware only the executor may reach the TEE's attestation interface (``/dev/sev-guest``,
configfs-tsm, NSM), because any process that reaches it gets genuine evidence for report data of
its choice (threat-model.md, "Evidence minting and relay"). In simulation the device is this
socket: it is created by the executor, mode 0600, and before answering it checks the peer's
credentials (``SO_PEERCRED``): a connection from any process other than the executor itself is
refused, whatever its user (design.md section 5; docs/executor.md, "Attestation device").

    dev = SimulatedDevice(path, SimulatedTEE("sev-snp", root=DevRootOfTrust.from_launch_data(data)))
    dev.start()
    evidence = request_evidence(path, binding)       # works only from the executor's own pid

What it does NOT do: protect against a process with CAP_SYS_PTRACE in the executor (the node
baseline forbids that) or simulate the device's own access control on hardware.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import struct
import threading
from typing import Any

from ray_confidential.attestation.binding import Binding
from ray_confidential.attestation.evidence import Evidence
from ray_confidential.errors import AttestationError

logger = logging.getLogger(__name__)
_U32 = struct.Struct(">I")
MAX_REQUEST = 64 << 10
MAX_RESPONSE = 16 << 20


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def evidence_to_json(ev: Evidence) -> dict[str, Any]:
    return {
        "tee": ev.tee,
        "evidence": _b64(ev.evidence),
        "certs": [_b64(c) for c in ev.certs],
        "collateral": None if ev.collateral is None else _b64(ev.collateral),
        "gpus": [evidence_to_json(g) for g in ev.gpus],
    }


def evidence_from_json(data: dict[str, Any]) -> Evidence:
    d = base64.b64decode
    return Evidence(
        tee=str(data["tee"]),
        evidence=d(data["evidence"]),
        certs=tuple(d(c) for c in data["certs"]),
        collateral=None if data.get("collateral") is None else d(data["collateral"]),
        gpus=tuple(evidence_from_json(g) for g in data.get("gpus", [])),
    )


def peer_pid(conn: socket.socket) -> int:
    """The pid of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


class SimulatedDevice:
    """Serves evidence of ``tee`` (a ``SimulatedTEE``) to the process that created it, and nobody else.

    Args:
        path: socket path (created mode 0600; an existing file there is an error).
        tee: object with ``evidence(binding) -> Evidence``.
        owner_pid: the only pid answered (default: this process).
    """

    def __init__(self, path: str, tee: Any, *, owner_pid: int | None = None) -> None:
        self.path = path
        self._tee = tee
        self._owner = owner_pid if owner_pid is not None else os.getpid()
        self._sock: socket.socket | None = None
        self.refused = 0

    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self._sock = sock
        threading.Thread(target=self._serve, name="rc-attestation-device", daemon=True).start()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _serve(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            pid = peer_pid(conn)
            if pid != self._owner:
                self.refused += 1
                logger.warning("attestation device: refused a request from pid %d (not the executor)", pid)
                _send(conn, {"error": "refused: the attestation device answers only the enclave executor"})
                return
            try:
                binding = Binding.decode(_recv(conn, MAX_REQUEST))
                _send(conn, {"evidence": evidence_to_json(self._tee.evidence(binding))})
            except Exception as exc:
                logger.warning("attestation device: request failed: %s", exc)
                _send(conn, {"error": "bad request"})


def _send(conn: socket.socket, payload: dict[str, Any] | bytes) -> None:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    conn.sendall(_U32.pack(len(body)) + body)


def _recv(conn: socket.socket, limit: int) -> bytes:
    head = _exact(conn, _U32.size)
    (size,) = _U32.unpack(head)
    if size > limit:
        raise ValueError("message over the limit")
    return _exact(conn, size)


def _exact(conn: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError("attestation device closed the connection")
        out += chunk
    return bytes(out)


def request_evidence(path: str, binding: Binding, *, timeout: float = 10.0) -> Evidence:
    """Ask the device at ``path`` for evidence committing to ``binding``.

    Raises:
        AttestationError: the device refused (wrong process) or failed.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(path)
            try:
                _send(conn, binding.encode())
            except (BrokenPipeError, ConnectionResetError):
                pass  # a device that refuses this process may answer and close before reading: read it
            reply = json.loads(_recv(conn, MAX_RESPONSE))
        except (OSError, ValueError) as exc:
            raise AttestationError(f"attestation device unavailable: {exc}") from None
    if "error" in reply:
        raise AttestationError(f"attestation device: {reply['error']}")
    return evidence_from_json(reply["evidence"])


__all__ = ["SimulatedDevice", "evidence_from_json", "evidence_to_json", "peer_pid", "request_evidence"]
