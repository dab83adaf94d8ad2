"""Code bundles: the source an owner approves, hashed canonically and compiled by the executor.

A bundle is the Python source file(s) of the module that defines a function or class, the module's
name and the entry point (a qualified name in that module). Its digest is what a domain policy
approves (``DomainPolicy.bundles``). The executor recomputes the digest over the bytes it received
and compiles exactly those bytes: it never runs code it did not hash and never unpickles code
(design.md section 2; docs/executor.md, "Code bundles").

    >>> b = Bundle(module="demo", entry="double", files=(("demo.py", b"def double(x):\\n    return 2 * x\\n"),))
    >>> load_entry(b)(21)
    42
    >>> len(b.digest), b.digest_hex == b.digest.hex()
    (32, True)

Digest (version 1), SHA-256 over::

    CONTEXT || u32 len(module) || module || u32 len(entry) || entry || u32 file_count
            || for each file, sorted by path: u32 len(path) || path || u64 len(data) || data

with UTF-8 strings and big-endian integers. Test vector: docs/executor.md.

What this module does NOT do: decide whether a digest is approved (the broker and the executor check
``DomainPolicy.bundles``), or pin third-party imports (those come from the measured image).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import struct
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

CONTEXT: Final = b"ray-confidential/bundle/v1\x00"
MAX_FILES: Final = 256
MAX_FILE_BYTES: Final = 8 << 20
MAX_BUNDLE_BYTES: Final = 32 << 20
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ENTRY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PATH_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*\.py$")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
WRAPPED_ATTR: Final = "__rc_function__"
"""Attribute under which ``ray_confidential.remote`` keeps the undecorated function."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Bundle:
    """Module source plus entry point. ``files`` holds ``(relative path, bytes)`` pairs.

    The first file whose path matches the module name (``a/b.py`` or ``a/b/__init__.py`` for
    ``a.b``; a single file for a one-file bundle) is the module that gets compiled.

    Raises:
        ValueError: a name, path or size outside the limits (the message names it).
    """

    module: str
    entry: str
    files: tuple[tuple[str, bytes], ...]
    _digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _MODULE_RE.match(self.module) or len(self.module) > 256:
            raise ValueError(f"bundle module name {self.module!r} is not a dotted Python identifier")
        if not _ENTRY_RE.match(self.entry) or len(self.entry) > 256 or "__" in self.entry:
            raise ValueError(
                f"bundle entry point {self.entry!r} must be a (dotted) name defined in the module, "
                "without dunder parts"
            )
        files = tuple((str(p), bytes(d)) for p, d in self.files)
        if not 1 <= len(files) <= MAX_FILES:
            raise ValueError(f"a bundle holds 1..{MAX_FILES} files, got {len(files)}")
        paths = [p for p, _ in files]
        if len(set(paths)) != len(paths):
            raise ValueError("bundle file paths must be unique")
        for path, data in files:
            if not _PATH_RE.match(path) or ".." in path.split("/"):
                raise ValueError(f"bundle path {path!r} must be a relative POSIX path to a .py file")
            if len(data) > MAX_FILE_BYTES:
                raise ValueError(f"bundle file {path!r} is over {MAX_FILE_BYTES} bytes")
        if sum(len(d) for _, d in files) > MAX_BUNDLE_BYTES:
            raise ValueError(f"bundle is over {MAX_BUNDLE_BYTES} bytes")
        object.__setattr__(self, "files", tuple(sorted(files)))
        self.main_file()  # raises when no file holds the module
        object.__setattr__(self, "_digest", self._compute_digest())

    @property
    def digest(self) -> bytes:
        """SHA-256 over the canonical encoding (module docstring), computed when the bundle was built."""
        return self._digest

    def _compute_digest(self) -> bytes:
        h = hashlib.sha256(CONTEXT)
        for text in (self.module, self.entry):
            raw = text.encode()
            h.update(_U32.pack(len(raw)) + raw)
        h.update(_U32.pack(len(self.files)))
        for path, data in self.files:
            raw = path.encode()
            h.update(_U32.pack(len(raw)) + raw + _U64.pack(len(data)))
            h.update(data)
        return h.digest()

    @property
    def digest_hex(self) -> str:
        return self.digest.hex()

    def main_file(self) -> tuple[str, bytes]:
        """The file compiled as the module."""
        candidates = {self.module.replace(".", "/") + ".py", self.module.replace(".", "/") + "/__init__.py"}
        for path, data in self.files:
            if path in candidates:
                return path, data
        if len(self.files) == 1:
            return self.files[0]
        raise ValueError(
            f"no bundle file holds module {self.module!r} (expected one of {sorted(candidates)})"
        )

    def to_wire(self) -> dict[str, Any]:
        """Header fields for the executor protocol (file bytes travel as frames, in this order)."""
        return {"module": self.module, "entry": self.entry, "paths": [p for p, _ in self.files]}

    def pack(self) -> list[Any]:
        """The bundle as plain values (str, bytes, lists), which Ray serializes without pickle
        (about 0.1 ms less per task submission than this dataclass): ``unpack`` reverses it."""
        return [self.digest_hex, self.module, self.entry, [[p, d] for p, d in self.files]]

    @classmethod
    def unpack(cls, packed: Any) -> Bundle:
        """The bundle ``pack`` made, checked as any bundle is, and against the digest it names.

        Raises:
            ValueError: malformed, or the files do not hash to the named digest.
        """
        try:
            digest_hex, module, entry, files = packed
            bundle = cls(module=module, entry=entry, files=tuple((p, d) for p, d in files))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed packed bundle: {exc}") from None
        if bundle.digest_hex != digest_hex:
            raise ValueError("packed bundle does not match the digest it names")
        return bundle

    @classmethod
    def from_wire(cls, header: dict[str, Any], frames: Iterable[bytes]) -> Bundle:
        paths = header.get("paths")
        if not isinstance(paths, list):
            raise ValueError("bundle paths missing")
        data = list(frames)
        if len(data) != len(paths):
            raise ValueError("bundle frame count does not match its paths")
        return cls(
            module=str(header["module"]),
            entry=str(header["entry"]),
            files=tuple(zip(paths, data, strict=True)),
        )


def unwrap_decorated(obj: Any) -> Any:
    """The function behind ``ray_confidential.remote`` (and ``functools.wraps``) wrappers."""
    seen = 0
    while seen < 16:
        inner = getattr(obj, WRAPPED_ATTR, None)
        if inner is None:
            inner = getattr(obj, "__wrapped__", None)
        if inner is None:
            return obj
        obj = inner
        seen += 1
    raise ValueError("decorator chain too deep")


def from_callable(fn: Callable[..., Any]) -> Bundle:
    """The bundle of a module-level function or class: its module's source file and its name.

    A function defined in a script run as ``__main__`` is bundled under the script's file stem, so
    the executor imports it under that name and its ``if __name__ == "__main__":`` block never runs.

    Raises:
        ValueError: ``fn`` is not defined at module level, or its source file cannot be found.
    """
    fn = unwrap_decorated(fn)
    qualname = getattr(fn, "__qualname__", "")
    if "<locals>" in qualname or "<lambda>" in qualname or not qualname:
        raise ValueError(
            f"{qualname or fn!r} is not defined at module level: confidential functions must be "
            "module-level functions (the executor imports the module's source itself)"
        )
    module = sys.modules.get(fn.__module__)
    path = inspect.getsourcefile(module) if module is not None else None
    if not path or not Path(path).is_file():
        raise ValueError(
            f"cannot find the source file of module {fn.__module__!r}: confidential code must live "
            "in a .py file (not a notebook cell or an interactive session)"
        )
    name = Path(path).stem if fn.__module__ == "__main__" else fn.__module__
    if fn.__module__ != "__main__" and Path(path).name == "__init__.py":
        rel = name.replace(".", "/") + "/__init__.py"
    else:
        rel = name.replace(".", "/") + ".py"
    return Bundle(module=name, entry=qualname, files=((rel, Path(path).read_bytes()),))


def compile_module(bundle: Bundle) -> types.ModuleType:
    """Compile and execute the bundle's source as module ``bundle.module`` (registered in
    ``sys.modules`` so that dataclasses, enums and pickling by reference inside it work).

    Only the executor's worker calls this, in a process dedicated to this bundle.
    """
    path, source = bundle.main_file()
    code = compile(source, f"<bundle {bundle.digest_hex[:16]}>/{path}", "exec", dont_inherit=True)
    spec = importlib.util.spec_from_loader(bundle.module, loader=None, origin=path)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__file__ = path
    sys.modules[bundle.module] = module
    try:
        exec(code, module.__dict__)  # noqa: S102 - the executor runs only source it hashed
    except BaseException:
        sys.modules.pop(bundle.module, None)
        raise
    return module


def find_entry(module: types.ModuleType, bundle: Bundle) -> Callable[..., Any]:
    """Resolve ``bundle.entry`` in ``module`` and unwrap decorators; it must be defined there.

    Raises:
        ValueError: the entry point is missing, not callable, or defined outside the bundle.
    """
    obj: Any = module
    for part in bundle.entry.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"entry point {bundle.entry!r} not found in bundle module {bundle.module!r}")
    fn = unwrap_decorated(obj)
    if not callable(fn) or getattr(fn, "__module__", None) != bundle.module:
        raise ValueError(f"entry point {bundle.entry!r} is not a function or class defined in the bundle")
    result: Callable[..., Any] = fn
    return result


def load_entry(bundle: Bundle) -> Callable[..., Any]:
    """``find_entry(compile_module(bundle), bundle)``."""
    return find_entry(compile_module(bundle), bundle)


__all__ = [
    "CONTEXT",
    "Bundle",
    "compile_module",
    "find_entry",
    "from_callable",
    "load_entry",
    "unwrap_decorated",
]
