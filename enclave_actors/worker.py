"""An executor worker: one subprocess per (domains, bundle) pair, or per enclave actor instance.

    python -m enclave_actors.worker FD [MEMORY_LIMIT_BYTES]

It hardens itself (not dumpable, no core files, optional address-space limit), sends its own
stdout and stderr to /dev/null (a bundle's prints are dropped, never passed through), compiles the
bundle it is sent (``ray_confidential.bundle``) and then serves calls on the socket ``FD``: each
call brings sealed inputs (frames or sealed memfds) with their data keys, opens them with the safe
decoders, runs the entry point, seals the result to the output key and drops the keys. Exceptions
become a sealed traceback. An actor's worker is constructed once (``actor_init``: the entry point
is the class) and then runs its public methods (``actor_call``); the instance never leaves the
process. It exits when the daemon closes the socket.

What it does NOT do: talk to the broker, check policies or choose keys (the daemon did all that
before the call reached it; it only ever receives keys for its own domains).
"""

from __future__ import annotations

import io
import os
import socket
import sys
import traceback
from typing import Any

INLINE_LIMIT = 1 << 20
"""Outputs up to this size travel as frames; larger ones as sealed memfds."""


class _Output:
    """``allocate`` for ``seal``: small outputs in memory, large ones straight into a memfd."""

    def __init__(self) -> None:
        from enclave_actors.protocol import MemfdWriter

        self.writer: MemfdWriter | None = None
        self._factory = MemfdWriter

    def __call__(self, size: int) -> memoryview:
        if size <= INLINE_LIMIT:
            return memoryview(bytearray(size))
        self.writer = self._factory("rc-out")
        return self.writer(size)


_OUTPUT_KEYS: dict[tuple[Any, ...], Any] = {}
"""Parsed output keys of this worker's calls (public keys; a handful per worker)."""


def _output_key(out: dict[str, Any]) -> Any:
    from ray_confidential.crypto.hpke import PublicKey
    from ray_confidential.sealed.format import DomainPublicKey

    fields = (out["domain"], out["version"], out["suite"], out["public_key"])
    key = _OUTPUT_KEYS.get(fields)
    if key is None:
        key = DomainPublicKey(domain=out["domain"], version=int(out["version"]),
                              public_key=PublicKey(out["suite"], bytes.fromhex(out["public_key"])))  # fmt: skip
        if len(_OUTPUT_KEYS) < 64:
            _OUTPUT_KEYS[fields] = key
    return key


_READY: dict[Any, Any] = {}
"""One HPKE encapsulation made ahead of time per output public key (x25519; a handful per worker):
the next result sealed to that key skips the wrap's key-pair generation and Diffie-Hellman, which
this worker ran after sending its previous reply, off the call's path (``crypto.encap``)."""


def _prepare_next(out: dict[str, Any]) -> None:
    """After a reply: an encapsulation ready for the next result sealed to this call's output key
    (best effort: a key it cannot prepare for is sealed to the ordinary way)."""
    from ray_confidential.crypto.encap import encapsulate

    try:
        public_key = _output_key(out).public_key
        if public_key.suite == "x25519" and public_key not in _READY and len(_READY) < 64:
            _READY[public_key] = encapsulate(public_key)
    except ValueError:
        pass


def _seal(value: Any, out: dict[str, Any], producer: str) -> tuple[list[Any], list[int]]:
    from ray_confidential.sealed.format import seal

    key = _output_key(out)
    target = _Output()
    sealed = seal(value, key, producer_id=producer, allow_pickle=bool(out["allow_pickle"]), allocate=target,
                  encapsulation=_READY.pop(key.public_key, None))  # fmt: skip
    if target.writer is not None:
        del sealed
        return [], [target.writer.finish()]
    return [sealed], []


def _open_inputs(msg: Any, maps: Any) -> list[Any]:
    from ray_confidential.sealed.format import open_with_dek

    specs = msg.header["inputs"]
    deks = msg.frames[: len(specs)]
    inline = msg.frames[len(specs) :]
    values = []
    try:
        for spec, dek in zip(specs, deks, strict=True):
            data = inline[spec["index"]] if spec["src"] == "frame" else maps.map(msg.fds[spec["index"]])
            values.append(open_with_dek(data, dek, allow_pickle=bool(spec["allow_pickle"])))
    finally:
        deks.clear()
        msg.frames.clear()
        msg.close_fds()
    return values


def _build_args(spec: list[Any], values: list[Any]) -> list[Any]:
    out = []
    for kind, item in spec:
        out.append(values[item] if kind == "s" else item)
    return out


def serve(sock: socket.socket) -> None:
    from enclave_actors import context as ctx_module
    from enclave_actors import protocol
    from ray_confidential.bundle import Bundle, load_entry

    msg = protocol.recv(sock)
    try:
        bundle = Bundle.from_wire(msg.header, msg.frames)
        fn = load_entry(bundle)
    except BaseException:
        protocol.send(sock, {"status": "load_error"})
        return
    protocol.send(sock, {"status": "ok"})
    producer = bundle.digest_hex[:32]
    maps = protocol.SealedMapCache()  # ciphertext only: inputs that come back are not mapped again
    instance: Any = None  # the enclave actor's state (op "actor_init"), lives in this process only
    while True:
        try:
            msg = protocol.recv(sock)
        except (ConnectionError, OSError):
            return
        header = msg.header
        out = header["out"]
        op = header.get("op", "call")
        try:
            try:
                values = _open_inputs(msg, maps)
            finally:
                maps.end_call()
            args = _build_args(header["args"], values)
            kwargs = dict(zip(header["kwarg_names"], _build_args(header["kwargs"], values), strict=True))
            del values
            target = _target(op, fn, instance, header.get("method"))
            ctx_module._set(ctx_module.CallContext.from_dict(header["ctx"]))
            try:
                result = target(*args, **kwargs)
            finally:
                ctx_module._set(None)
                del args, kwargs
            if op == "actor_init":
                instance, result = result, None
                protocol.send(sock, {"status": "ok"})
                _prepare_next(out)
                continue
            frames, fds = _seal(result, out, producer)
            del result
            protocol.send(sock, {"status": "ok"}, frames, fds)
            for fd in fds:
                os.close(fd)
        except BaseException as exc:
            detail = "".join(traceback.format_exception(exc))
            del exc
            try:
                frames, fds = _seal({"error": detail}, {**out, "allow_pickle": False}, producer)
            except BaseException:
                frames, fds = [], []
            del detail
            protocol.send(sock, {"status": "task_error"}, frames, fds)
            for fd in fds:
                os.close(fd)
        _prepare_next(out)  # after the reply, off the call's path


def _target(op: str, entry: Any, instance: Any, method: Any) -> Any:
    """What a request runs: the entry function, the actor class (once), or a public actor method."""
    if op == "call":
        return entry
    if op == "actor_init":
        if not isinstance(entry, type) or instance is not None:
            raise TypeError("an enclave actor's entry point must be a class, constructed once")
        return entry
    if op == "actor_call":
        if instance is None or not isinstance(method, str) or method.startswith("_"):
            raise AttributeError("no such public method on the enclave actor")
        bound = getattr(instance, method)
        if not callable(bound):
            raise AttributeError(f"{method!r} is not a method")
        return bound
    raise ValueError(f"unknown operation {op!r}")


def main(argv: list[str]) -> int:
    from enclave_actors.harden import harden

    fd = int(argv[0])
    limit = int(argv[1]) if len(argv) > 1 and int(argv[1]) > 0 else None
    harden(memory_limit_bytes=limit)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stdout = io.TextIOWrapper(open(os.devnull, "wb"))
    sys.stderr = sys.stdout
    sock = socket.socket(fileno=fd)
    serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
