"""The untrusted side of the executor socket: what a Ray worker (the shim) sends and receives.

    client = ExecutorClient.from_env()          # RAY_CONFIDENTIAL_EXECUTOR_SOCKET
    sealed = client.call(bundle, domain="hospital", inputs=[sealed_bytes], args=[["s", 0]])

The shim holds no key and sees no plaintext: it forwards sealed inputs (large ones as sealed
memfds, so the executor reads them without a copy and the shim cannot change them mid-read, or by
their sealed header alone when the executor kept them from an earlier call), plain JSON parameters
and the bundle source, and gets back sealed bytes or a coarse error whose detail,
if any, is sealed (:class:`~ray_confidential.errors.SealedTaskError`).

What it does NOT do: any security check. The executor trusts nothing the shim sends.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

from enclave_actors import protocol
from ray_confidential.bundle import Bundle
from ray_confidential.errors import KeyReleaseDenied, NoAttestedNodeError, SealedTaskError

SOCKET_ENV = "RAY_CONFIDENTIAL_EXECUTOR_SOCKET"
INLINE_INPUT_LIMIT = 1 << 20
"""Sealed inputs up to this size travel as frames; larger ones as sealed memfds."""
_SEALED_PREFIX = struct.Struct(">BI")
_MAX_SEALED_HEADER = 8192


def _sealed_header(view: memoryview) -> bytes | None:
    """The sealed header bytes at the start of ``view`` (version, length, header), or None."""
    if len(view) < _SEALED_PREFIX.size:
        return None
    _, header_len = _SEALED_PREFIX.unpack_from(view, 0)
    if header_len > _MAX_SEALED_HEADER or len(view) < _SEALED_PREFIX.size + header_len:
        return None
    return bytes(view[: _SEALED_PREFIX.size + header_len])


class CallFailed(SealedTaskError):
    """``SealedTaskError`` that survives pickling through Ray with its sealed detail intact."""

    def __reduce__(self) -> Any:
        return (CallFailed, (self.sealed_detail, self.args[0] if self.args else "confidential call failed"))


def _record_metrics(report: Any, in_bytes: int, out_bytes: int) -> None:
    """Record what the executor reported for one request (its ``report`` field) in this Ray process's
    metrics buffer, and have it flushed soon in the background (never blocking the call).

    Executors are not Ray processes, so their outcomes reach the dashboard through the shim that saw
    them. Tag values pass the allow-lists of :mod:`ray_confidential.metrics`; metrics never fail a call.
    """
    try:
        from ray_confidential import metrics

        if isinstance(report, dict):
            tee = str(report.get("tee", ""))
            for result, n in dict(report.get("attest") or {}).items():
                metrics.inc("confidential_attestations_total", float(n), tee=tee, result=str(result))
            for result, n in dict(report.get("unwrap") or {}).items():
                metrics.inc("confidential_key_releases_total", float(n), result=str(result))
            until = report.get("attested_until")
            if isinstance(until, int | float) and report.get("node_id"):
                metrics.note_attested(str(report["node_id"]), str(report.get("pool") or ""), float(until))
        if in_bytes:
            metrics.inc("confidential_sealed_bytes_total", float(in_bytes), direction="in")
        if out_bytes:
            metrics.inc("confidential_sealed_bytes_total", float(out_bytes), direction="out")
        metrics.flush_soon()
    except Exception as exc:  # figures are best effort; the call's outcome is what matters
        logging.getLogger(__name__).debug("ray_confidential: could not record metrics: %s", exc)


def _raise_for(header: dict[str, Any], frames: list[bytes]) -> None:
    status = header.get("status")
    message = str(header.get("message", ""))
    if status == "task_error":
        detail = bytes(frames[0]) if frames else None
        raise CallFailed(detail, "confidential call failed (the detail is sealed to the domain)")
    if status == "denied":
        raise KeyReleaseDenied(message or "key release denied")
    if status == "unavailable":
        raise KeyReleaseDenied(message or "key broker unavailable; the executor fails closed")
    if status in ("timeout", "crashed", "dropped"):
        raise CallFailed(None, f"confidential call failed: {message}")
    if status == "bad_request":
        raise ValueError(f"the enclave executor refused the request: {message}")
    raise CallFailed(None, f"confidential call failed: executor status {status!r}")


class ExecutorClient:
    """A connection to the local executor (one per process, reconnecting as needed)."""

    _instances: dict[str, ExecutorClient] = {}
    _instances_lock = threading.Lock()

    def __init__(self, path: str, *, connect_timeout: float = 30.0) -> None:
        self.path = path
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._known: set[bytes] = set()

    @classmethod
    def from_env(cls) -> ExecutorClient:
        """The client for this node's executor (shared per process): ``$RAY_CONFIDENTIAL_EXECUTOR_SOCKET``,
        else the per-node path where ``rc.init`` starts development executors (:func:`node_socket_path`).

        Raises:
            KeyReleaseDenied: this node has no enclave executor.
        """
        path = resolve_socket_path()
        with cls._instances_lock:
            if path not in cls._instances:
                cls._instances[path] = cls(path)
            return cls._instances[path]

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        deadline = time.monotonic() + self.connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                self._sock = sock
                return sock
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise NoAttestedNodeError(
                        f"enclave executor at {self.path} is not reachable: {exc}"
                    ) from None
                time.sleep(0.1)

    def request(
        self, header: dict[str, Any], frames: Sequence[Any] = (), fds: Sequence[int] = ()
    ) -> protocol.Message:
        """One request/response round trip (reconnects once if the connection was dropped)."""
        with self._lock:
            for attempt in (0, 1):
                sock = self._connect()
                try:
                    protocol.send(sock, header, frames, fds)
                    return protocol.recv(sock)
                except (ConnectionError, BrokenPipeError):
                    sock.close()
                    self._sock = None
                    if attempt:
                        raise
        raise AssertionError("unreachable")

    def _send(
        self,
        header: dict[str, Any],
        bundle: Bundle | None,
        inputs: Sequence[Any],
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
    ) -> protocol.Message:
        """Send a call-shaped request (sealed inputs, plain parameters, the bundle when asked)."""
        kwargs = kwargs or {}
        params = {"args": list(args), "kwargs": list(kwargs.values()), "kwarg_names": list(kwargs)}
        if len(json.dumps(params)) > 64 << 10:
            raise ValueError(
                "plain parameters of a confidential call are limited to 64 KiB; seal larger data"
            )
        views = [memoryview(data).cast("B") for data in inputs]
        # Large inputs are first named by their sealed header: the executor keeps the memfds of inputs
        # it already authenticated, and asks for the bytes (``need_inputs``) only when it has none.
        known = [len(v) > INLINE_INPUT_LIMIT and _sealed_header(v) is not None for v in views]
        digest = bundle.digest if bundle is not None else None
        send_bundle = bundle is not None and digest not in self._known
        fds: list[int] = []
        resent = False
        try:
            for _attempt in range(4):
                specs: list[dict[str, Any]] = []
                frames: list[Any] = [*(d for _, d in bundle.files)] if send_bundle and bundle else []
                n_src = len(frames)
                for view, by_header in zip(views, known, strict=True):
                    if by_header:
                        specs.append({"src": "known", "index": len(frames) - n_src, "length": len(view)})
                        frames.append(_sealed_header(view))
                    elif len(view) > INLINE_INPUT_LIMIT:
                        specs.append({"src": "fd", "index": len(fds)})
                        fds.append(protocol.sealed_memfd(view))
                    else:
                        specs.append({"src": "frame", "index": len(frames) - n_src})
                        frames.append(view)
                request = {**header, "inputs": specs, "params": params}
                if send_bundle and bundle is not None:
                    request["bundle"] = {**bundle.to_wire(), "files": n_src}
                reply = self.request(request, frames, fds)
                status = reply.header.get("status")
                if status == "need_bundle" and bundle is not None and not send_bundle:
                    send_bundle = True
                elif status == "need_inputs" and any(known):
                    known = [False] * len(views)
                elif status == "dropped" and header["op"] == "call" and not resent:
                    # A key drop (revocation epoch, broker outage) stopped the task mid-way; a task has
                    # no state, so send it once more: the executor attests again, and runs it only if
                    # the broker still admits this node. Actor calls are not resent (state is lost).
                    resent = True
                    logging.getLogger(__name__).info("confidential call stopped (%s); sending it again",
                                                     reply.header.get("message"))  # fmt: skip
                else:
                    break
                reply.close_fds()
                for fd in fds:
                    os.close(fd)
                fds = []
            if digest is not None and reply.header.get("status") != "need_bundle":
                self._known.add(digest)
            ok = reply.header.get("status") == "ok"
            out_bytes = (sum(len(memoryview(f).cast("B")) for f in reply.frames[:1])
                         + sum(os.fstat(fd).st_size for fd in reply.fds[:1])) if ok else 0  # fmt: skip
            in_bytes = sum(len(v) for v in views) if ok else 0
            _record_metrics(reply.header.get("report"), in_bytes, out_bytes)
            return reply
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def _sealed_result(reply: protocol.Message) -> memoryview:
        try:
            if reply.header.get("status") != "ok":
                _raise_for(reply.header, reply.frames)
            if reply.fds:
                return protocol.map_sealed_memfd(reply.fds[0])
            return memoryview(reply.frames[0])
        finally:
            reply.close_fds()

    def call(
        self,
        bundle: Bundle,
        *,
        domain: str,
        inputs: Sequence[Any] = (),
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        recipient: str | None = None,
    ) -> memoryview:
        """Run ``bundle``'s entry point on sealed ``inputs``; returns the sealed result.

        ``args`` / ``kwargs`` values are ``["s", i]`` (the i-th sealed input) or ``["j", value]``
        (a plain JSON value).

        Raises:
            SealedTaskError: the call failed (detail sealed), crashed or timed out.
            KeyReleaseDenied: the bundle is not approved, or the broker refused or is unreachable.
        """
        header = {"op": "call", "bundle_digest": bundle.digest_hex, "domain": domain, "timeout_s": timeout_s,
                  "recipient": recipient}  # fmt: skip
        return self._sealed_result(self._send(header, bundle, inputs, args, kwargs))

    def actor_create(
        self,
        bundle: Bundle,
        *,
        domain: str,
        inputs: Sequence[Any] = (),
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Construct an enclave actor (the bundle's entry point is its class) in its own executor
        subprocess, which lives as long as this connection. Returns its id and trust state.

        Raises:
            SealedTaskError: the constructor raised (detail sealed), crashed or timed out.
            KeyReleaseDenied: as :meth:`call`.
        """
        header = {"op": "actor_create", "bundle_digest": bundle.digest_hex, "domain": domain,
                  "timeout_s": timeout_s}  # fmt: skip
        reply = self._send(header, bundle, inputs, args, kwargs)
        try:
            if reply.header.get("status") != "ok":
                _raise_for(reply.header, reply.frames)
            return dict(reply.header)
        finally:
            reply.close_fds()

    def actor_call(
        self,
        actor_id: str,
        method: str,
        *,
        inputs: Sequence[Any] = (),
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[memoryview, dict[str, Any]]:
        """Run ``method`` of the actor; returns (sealed result, trust state)."""
        header = {"op": "actor_call", "actor_id": actor_id, "method": method, "timeout_s": timeout_s}
        reply = self._send(header, None, inputs, args, kwargs)
        state = dict(reply.header)
        return self._sealed_result(reply), state

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


RUNTIME_DIR = f"/tmp/ray-confidential-{os.getuid()}"  # noqa: S108 - owner and 0700 checked at creation
"""Where ``rc.init`` puts the sockets of the development executors it starts (mode 0700)."""


def node_socket_path(node_id: str) -> str:
    """The executor socket of a node whose executor ``rc.init`` started (rows 1-2 of its table)."""
    return os.path.join(RUNTIME_DIR, f"{node_id[:32]}.sock")


NODE_SOCKET = "/run/ray-confidential/executor.sock"
"""Where a node image's executor listens (``ray-confidential pools render`` starts it there)."""


def resolve_socket_path() -> str:
    """``$RAY_CONFIDENTIAL_EXECUTOR_SOCKET``, else :func:`node_socket_path` of this Ray node, else
    :data:`NODE_SOCKET`, whichever exists first.

    Raises:
        KeyReleaseDenied: none exists (a confidential call forced onto a node without executor).
    """
    path = os.environ.get(SOCKET_ENV)
    if path:
        return path
    try:
        import ray

        # Only inside a Ray process: asking a process that is not one would start a local Ray.
        candidate = node_socket_path(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else ""
    except Exception:
        candidate = ""
    for found in (candidate, NODE_SOCKET):
        if found and os.path.exists(found):
            return found
    raise KeyReleaseDenied(
        "this Ray node has no enclave executor (RAY_CONFIDENTIAL_EXECUTOR_SOCKET is unset, rc.init started "
        f"none here and {NODE_SOCKET} does not exist), so no key is released here: a confidential call was "
        "forced onto a node that is not an attested TEE node"
    )


__all__ = [
    "NODE_SOCKET",
    "RUNTIME_DIR",
    "SOCKET_ENV",
    "CallFailed",
    "ExecutorClient",
    "node_socket_path",
    "resolve_socket_path",
]
