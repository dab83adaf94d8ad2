"""Content types of sealed objects and their safe encoders/decoders.

Anyone holding a domain's public key can seal data, so decoders treat plaintext as hostile: Arrow IPC
(validated), NumPy ``.npy`` without pickle, safetensors for torch, UTF-8 JSON. Pickle is available
only when the domain's policy opts in.

    >>> enc = encode({"a": [1, 2]}, allow_pickle=False)
    >>> enc.content_type.name, decode(enc.content_type, b"".join(bytes(s) for s in enc.segments),
    ...                               allow_pickle=False)
    ('JSON', {'a': [1, 2]})
"""

from __future__ import annotations

import functools
import io
import json
import math
import pickle
import sys
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.ipc as pa_ipc

MAX_JSON_BYTES = 64 << 20
_NPY_MAX_HEADER = 64 * 1024


class ContentType(IntEnum):
    """One byte in the sealed header (docs/sealed-format.md, "Content types")."""

    BYTES = 0x01
    JSON = 0x02
    NUMPY = 0x03
    ARROW_TABLE = 0x04
    ARROW_RECORD_BATCH = 0x05
    TORCH_TENSOR = 0x06
    TORCH_STATE_DICT = 0x07
    PICKLE = 0x7F


@dataclass(frozen=True, slots=True)
class Encoded:
    """Plaintext as a list of byte segments (zero-copy views where the source allows)."""

    content_type: ContentType
    segments: list[memoryview]

    @property
    def length(self) -> int:
        return sum(len(s) for s in self.segments)


class _SegmentSink:
    """A write-only file for ``pa.PythonFile``: keeps references to Arrow's buffers instead of copying."""

    closed = False

    def __init__(self) -> None:
        self.segments: list[memoryview] = []

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.segments.append(view)
        return len(view)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _arrow_segments(schema: pa.Schema, batches: list[pa.RecordBatch] | pa.Table) -> list[memoryview]:
    sink = _SegmentSink()
    with pa_ipc.new_stream(pa.PythonFile(sink, mode="w"), schema) as writer:
        if isinstance(batches, pa.Table):
            writer.write_table(batches)
        else:
            for batch in batches:
                writer.write_batch(batch)
    return sink.segments


def _torch(*, load: bool = False) -> Any:
    """The torch module if it is already imported (a tensor value implies it is), or on request."""
    if not load:
        return sys.modules.get("torch")
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return torch


def _is_tensor_dict(value: Any, torch: Any) -> bool:
    return (
        torch is not None
        and isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def encode(value: Any, *, allow_pickle: bool) -> Encoded:
    """Choose the content type for ``value`` and encode it without copying large buffers.

    Raises:
        TypeError: the type has no safe encoding and the domain did not opt into pickle.
    """
    torch = _torch()
    if isinstance(value, pa.Table):
        return Encoded(ContentType.ARROW_TABLE, _arrow_segments(value.schema, value))
    if isinstance(value, pa.RecordBatch):
        return Encoded(ContentType.ARROW_RECORD_BATCH, _arrow_segments(value.schema, [value]))
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(
                "NumPy arrays of dtype=object cannot be sealed safely; convert to a numeric dtype"
            )
        arr = value if (value.flags.c_contiguous or value.flags.f_contiguous) else np.ascontiguousarray(value)
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, np.lib.format.header_data_from_array_1_0(arr))
        order: Literal["C", "F"] = "F" if (arr.flags.f_contiguous and not arr.flags.c_contiguous) else "C"
        flat: Any = arr.reshape(-1, order=order).view(np.uint8)
        data = memoryview(flat) if arr.size else memoryview(b"")
        return Encoded(ContentType.NUMPY, [memoryview(header.getvalue()), data])
    if torch is not None and isinstance(value, torch.Tensor):
        from safetensors.torch import save

        return Encoded(ContentType.TORCH_TENSOR, [memoryview(save({"tensor": value.contiguous()}))])
    if _is_tensor_dict(value, torch):
        from safetensors.torch import save

        return Encoded(
            ContentType.TORCH_STATE_DICT, [memoryview(save({k: v.contiguous() for k, v in value.items()}))]
        )
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Encoded(ContentType.BYTES, [memoryview(value).cast("B")])
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        text = None
    if text is not None and json.loads(text) == value:
        return Encoded(ContentType.JSON, [memoryview(text)])
    if allow_pickle:
        return Encoded(ContentType.PICKLE, [memoryview(pickle.dumps(value, protocol=5))])
    raise TypeError(
        f"cannot seal a value of type {type(value).__name__!r}: supported are pyarrow Table/RecordBatch, "
        "numpy arrays, torch tensors and state dicts, bytes, and JSON-able values (dict keys must be "
        "strings, tuples become lists). Convert the value, or create the domain with a policy that sets "
        "allow_pickle=True (only if every party able to seal to it is trusted)"
    )


def _npy_header_length(data: memoryview) -> int:
    """Bytes of magic, version, length field and header dict (the .npy format, versions 1-3)."""
    if len(data) < 12 or bytes(data[:6]) != b"\x93NUMPY":
        raise ValueError("not a .npy payload")
    if data[6] == 1:
        total = 10 + int.from_bytes(data[8:10], "little")
    elif data[6] in (2, 3):
        total = 12 + int.from_bytes(data[8:12], "little")
    else:
        raise ValueError("unsupported .npy version")
    if total > min(len(data), _NPY_MAX_HEADER):
        raise ValueError("npy header too long or truncated")
    return total


@functools.lru_cache(maxsize=256)
def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """NumPy's own parse of one exact header (cached: results of one shape repeat the same bytes)."""
    stream = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(stream)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(stream, max_header_size=_NPY_MAX_HEADER)
    except Exception as exc:  # numpy's parser also raises tokenize / syntax errors on a cut header
        raise ValueError(f"malformed .npy header ({type(exc).__name__})") from None
    if stream.tell() != len(head):
        raise ValueError("npy header length mismatch")
    if dtype.hasobject:
        raise ValueError("object dtype refused")
    return tuple(shape), bool(fortran), dtype


def _decode_npy(data: memoryview) -> np.ndarray:
    offset = _npy_header_length(data)
    shape, fortran, dtype = _npy_header(bytes(data[:offset]))
    count = math.prod(shape)  # exact (no int64 wrap-around); 1 for a scalar's empty shape
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError("npy payload size does not match its header")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


def decode(content_type: ContentType | int, data: Any, *, allow_pickle: bool) -> Any:
    """Decode authenticated plaintext. Never unpickles unless ``allow_pickle``.

    Raises:
        ValueError: malformed plaintext for its content type, or pickle without opt-in.
    """
    kind = ContentType(content_type)
    view = memoryview(data).cast("B") if not isinstance(data, pa.Buffer) else memoryview(data)
    if kind in (ContentType.ARROW_TABLE, ContentType.ARROW_RECORD_BATCH):
        buf = data if isinstance(data, pa.Buffer) else pa.py_buffer(view)
        try:
            reader = pa_ipc.open_stream(buf)
            batches = list(reader)
            for batch in batches:
                batch.validate()
        except (pa.ArrowException, OSError) as exc:  # pyarrow reports some malformed streams as OSError
            raise ValueError("malformed Arrow IPC payload") from exc
        if kind is ContentType.ARROW_TABLE:
            return pa.Table.from_batches(batches, schema=reader.schema)
        if len(batches) != 1:
            raise ValueError("a sealed RecordBatch must hold exactly one batch")
        return batches[0]
    if kind is ContentType.NUMPY:
        return _decode_npy(view)
    if kind is ContentType.BYTES:
        return bytes(view)
    if kind is ContentType.JSON:
        if len(view) > MAX_JSON_BYTES:
            raise ValueError("JSON payload too large")
        return json.loads(bytes(view))
    if kind in (ContentType.TORCH_TENSOR, ContentType.TORCH_STATE_DICT):
        if _torch(load=True) is None:
            raise ValueError("this object holds torch tensors; install the 'torch' extra to open it")
        from safetensors.torch import load

        try:
            tensors = load(bytes(view))
        except Exception as exc:  # SafetensorError is not a ValueError
            raise ValueError(f"malformed safetensors payload ({type(exc).__name__})") from None
        if kind is ContentType.TORCH_TENSOR:
            if set(tensors) != {"tensor"}:
                raise ValueError("a sealed tensor must hold exactly one tensor named 'tensor'")
            return tensors["tensor"]
        return tensors
    if kind is ContentType.PICKLE:
        if not allow_pickle:
            raise ValueError("pickle payload refused: the domain's policy does not opt into pickle")
        return pickle.loads(view)  # noqa: S301 - explicit per-domain opt-in
    raise ValueError(f"unknown content type {content_type}")  # pragma: no cover
