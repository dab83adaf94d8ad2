"""Durable key store of the key broker: a small backend interface and three backends (docs/kbs-store.md).

    >>> import tempfile
    >>> from ray_confidential.kbs.store import EncryptedFileStore, MasterKey
    >>> master = MasterKey(bytes(range(32)))
    >>> with EncryptedFileStore(tempfile.mkdtemp() + "/store", master) as store:
    ...     store.put("domains/hospital/v1", b"private key bytes")
    ...     store.put_many({"domains/bank/v1": b"a", "domains/bank/v2": b"b"})
    ...     (store.get("domains/hospital/v1"), store.keys("domains/bank/"))
    (b'private key bytes', ['domains/bank/v1', 'domains/bank/v2'])

- :class:`EncryptedFileStore`: the embedded default on local disk. Every value is AES-256-GCM
  encrypted under a key derived from the :class:`MasterKey`, with the entry name as associated data
  (a file moved under another name does not open). Writes are atomic and crash-safe (temp file,
  fsync, rename, fsync directory); ``put_many`` goes through a journal, so a crash never leaves half
  a batch.
- :class:`VaultStore`: HashiCorp Vault KV version 2 through ``hvac`` (optional dependency).
- :class:`MemoryStore`: process memory, for ``kbs serve --dev`` only.

The master key is supplied at start (:meth:`MasterKey.from_file`, :meth:`MasterKey.from_env`,
:meth:`MasterKey.from_kms`); nothing here ever generates one next to a store on its own.
:func:`generate_master_key_file` writes one, explicitly, for an operator to keep.

What this module does NOT protect against: an attacker who can write the store directory can delete
entries or put back an older, genuine version of an entry or of the batch journal (rollback); it
can neither read values nor forge or swap them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import importlib
import ipaddress
import os
import re
import secrets
import stat
import struct
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NoReturn, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ray_confidential.errors import ConfidentialError

MASTER_KEY_SIZE: Final = 32
MAX_KEY_LENGTH: Final = 160  # bytes; base64url of it (214 chars) stays under NAME_MAX (255)
MAX_VALUE_SIZE: Final = 16 * 1024 * 1024
MAX_BATCH_ITEMS: Final = 10_000

_VERSION: Final = 0x01  # first byte of every file this module writes
_NONCE_SIZE: Final = 12
_KEY_RE: Final = re.compile(r"\A[\x21-\x7e]+\Z")  # printable ASCII, no space
_HEX_RE: Final = re.compile(r"\A[0-9a-fA-F]{64}\Z")

# Associated-data and key-derivation labels: one per purpose, never reused.
_LABEL_DATA_KEY: Final = b"ray-confidential kbs store v1 data key"
_LABEL_CHECK: Final = b"ray-confidential kbs store v1 check\x00"
_LABEL_ENTRY: Final = b"ray-confidential kbs store v1 entry\x00"
_LABEL_JOURNAL: Final = b"ray-confidential kbs store v1 journal\x00"
_LABEL_VAULT_KEY: Final = b"ray-confidential kbs vault v1 data key"
_LABEL_KEY_ID: Final = b"ray-confidential master key id"
_CHECK_PLAINTEXT: Final = b"ray-confidential key store"


class KeyStoreError(ConfidentialError):
    """The key store cannot be opened or used (wrong master key, unsafe key file, backend failure)."""


class StoreIntegrityError(KeyStoreError):
    """A stored entry or journal failed authentication: tampered, swapped, or written under another key."""


@runtime_checkable
class KeyStore(Protocol):
    """What the broker needs from a durable store. Keys are printable-ASCII paths such as
    ``"domains/hospital/v1"``; values are opaque bytes (the store encrypts at rest, the broker does not).
    """

    def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or ``None``."""
        ...

    def put(self, key: str, value: bytes) -> None:
        """Store ``value``; durable when this returns."""
        ...

    def put_many(self, items: Mapping[str, bytes]) -> None:
        """Store every item or none of them (also across a crash); durable when this returns."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if absent); durable when this returns."""
        ...

    def keys(self, prefix: str = "") -> list[str]:
        """Sorted keys that start with ``prefix``."""
        ...

    def close(self) -> None:
        """Release the store (locks, connections). Idempotent."""
        ...


def check_key(key: str) -> str:
    """Validate a store key: 1..160 printable ASCII characters without spaces, ``/``-separated
    components none of which is empty, ``.`` or ``..``. Raises TypeError/ValueError."""
    if not isinstance(key, str):
        raise TypeError(f"store keys are str, got {type(key).__name__}")
    if not _KEY_RE.match(key) or len(key) > MAX_KEY_LENGTH:
        raise ValueError(
            f"invalid store key {key!r}: use 1..{MAX_KEY_LENGTH} printable ASCII characters without "
            "spaces, e.g. 'domains/hospital/v1'"
        )
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid store key {key!r}: no empty, '.' or '..' path components")
    return key


def _check_value(key: str, value: bytes) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"store values are bytes, got {type(value).__name__} for {key!r}")
    data = bytes(value)
    if len(data) > MAX_VALUE_SIZE:
        raise ValueError(f"value for {key!r} is {len(data)} bytes; the maximum is {MAX_VALUE_SIZE}")
    return data


def _check_items(items: Mapping[str, bytes]) -> dict[str, bytes]:
    if not isinstance(items, Mapping):
        raise TypeError(f"put_many takes a mapping of key -> bytes, got {type(items).__name__}")
    if len(items) > MAX_BATCH_ITEMS:
        raise ValueError(f"put_many takes at most {MAX_BATCH_ITEMS} items, got {len(items)}")
    return {check_key(k): _check_value(k, v) for k, v in items.items()}


# --------------------------------------------------------------------------------------------------
# Master key


class MasterKey:
    """The 32-byte key that encrypts a store at rest. Refuses pickling and copying; repr is redacted.

    ``key_id`` is a short public identifier (HMAC of a fixed label), safe to log.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) != MASTER_KEY_SIZE:
            raise ValueError(f"a master key is exactly {MASTER_KEY_SIZE} bytes")
        self._key = bytes(key)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> MasterKey:
        """Read a key file (hex, base64, or 32 raw bytes). Refuses a file that group or others may access.

        Raises:
            KeyStoreError: the file is missing, has group/other permissions, or holds no 32-byte key.
        """
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise KeyStoreError(f"cannot read master key file {os.fspath(path)!r}: {exc.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode  # of the file we opened: no check-then-open race
            if not stat.S_ISREG(mode):
                raise KeyStoreError(f"master key file {os.fspath(path)!r} is not a regular file")
            if mode & 0o077:
                raise KeyStoreError(
                    f"master key file {os.fspath(path)!r} is accessible by group or others "
                    f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {os.fspath(path)}"
                )
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        if len(data) == MASTER_KEY_SIZE:
            return cls(data)
        try:
            return cls(_decode_key_text(data.decode("ascii").strip()))
        except (UnicodeDecodeError, ValueError):
            raise KeyStoreError(
                f"master key file {os.fspath(path)!r} holds no 32-byte key (expected 64 hex digits, "
                "base64, or 32 raw bytes); create one with generate_master_key_file()"
            ) from None

    @classmethod
    def from_env(cls, var: str) -> MasterKey:
        """Read a hex or base64 key from environment variable ``var``.

        Raises:
            KeyStoreError: the variable is unset or holds no 32-byte key.
        """
        text = os.environ.get(var)
        if not text:
            raise KeyStoreError(f"environment variable {var} with the master key is not set")
        try:
            return cls(_decode_key_text(text.strip()))
        except ValueError:
            raise KeyStoreError(f"environment variable {var} holds no 32-byte key (hex or base64)") from None

    @classmethod
    def from_kms(cls, plugin: str, **params: Any) -> MasterKey:
        """Obtain the key from a KMS plugin ``"module:callable"``; ``callable(**params)`` returns 32 bytes.

        The plugin unwraps the master key with the operator's KMS (for example a key encrypted under a
        cloud KMS key and unwrapped with the broker's workload identity).

        Raises:
            ValueError: ``plugin`` is not ``"module:callable"``.
            KeyStoreError: the plugin cannot be loaded, fails, or returns no 32-byte key.
        """
        module_name, sep, attr = plugin.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(
                f"KMS plugin must be 'module:callable', e.g. 'mycorp.kms:unwrap_master_key'; got {plugin!r}"
            )
        try:
            func: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                func = getattr(func, part)
        except (ImportError, AttributeError) as exc:
            raise KeyStoreError(f"cannot load KMS plugin {plugin!r}: {exc}") from None
        try:
            result = func(**params)
        except Exception as exc:
            raise KeyStoreError(f"KMS plugin {plugin!r} failed: {type(exc).__name__}") from exc
        if isinstance(result, MasterKey):
            return result
        if not isinstance(result, (bytes, bytearray)) or len(result) != MASTER_KEY_SIZE:
            raise KeyStoreError(f"KMS plugin {plugin!r} returned no {MASTER_KEY_SIZE}-byte key")
        return cls(bytes(result))

    @property
    def key_id(self) -> str:
        """16 hex digits identifying the key (an HMAC, not the key), for logs and error messages."""
        return hmac.new(self._key, _LABEL_KEY_ID, hashlib.sha256).hexdigest()[:16]

    def _derive(self, info: bytes, salt: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(self._key)

    def __reduce__(self) -> NoReturn:
        raise TypeError("MasterKey cannot be pickled: the master key never leaves the broker process")

    def __copy__(self) -> NoReturn:
        raise TypeError("MasterKey cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("MasterKey cannot be copied")

    def __repr__(self) -> str:
        return f"<MasterKey id={self.key_id} [redacted]>"

    __str__ = __repr__


def _decode_key_text(text: str) -> bytes:
    if _HEX_RE.match(text):
        return bytes.fromhex(text)
    try:
        padded = text + "=" * (-len(text) % 4)
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not hex or base64") from None
    if len(raw) != MASTER_KEY_SIZE:
        raise ValueError("wrong length")
    return raw


def generate_master_key_file(path: str | os.PathLike[str]) -> MasterKey:
    """Write a fresh random master key (64 hex digits) to ``path`` with mode 0600; never overwrites.

    Keep the file (or a copy) away from the store: whoever has both reads every stored key.

    Raises:
        FileExistsError: ``path`` exists.
    """
    key = secrets.token_bytes(MASTER_KEY_SIZE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(Path(path).resolve().parent)
    return MasterKey(key)


# --------------------------------------------------------------------------------------------------
# Shared helpers


def _seal(aead: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE_SIZE)
    return bytes([_VERSION]) + nonce + aead.encrypt(nonce, plaintext, aad)


def _open(aead: AESGCM, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < 1 + _NONCE_SIZE + 16 or blob[0] != _VERSION:
        raise InvalidTag
    return aead.decrypt(blob[1 : 1 + _NONCE_SIZE], blob[1 + _NONCE_SIZE :], aad)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_batch(items: Mapping[str, bytes]) -> bytes:
    out = [struct.pack(">I", len(items))]
    for key, value in items.items():
        kb = key.encode("ascii")
        out += [struct.pack(">H", len(kb)), kb, struct.pack(">I", len(value)), value]
    return b"".join(out)


def _decode_batch(blob: bytes) -> dict[str, bytes]:
    """Parse a journal payload (already authenticated); lengths are checked against their maxima."""
    try:
        (count,) = struct.unpack_from(">I", blob, 0)
        if count > MAX_BATCH_ITEMS:
            raise ValueError("too many items")
        pos, items = 4, {}
        for _ in range(count):
            (klen,) = struct.unpack_from(">H", blob, pos)
            key = check_key(blob[pos + 2 : pos + 2 + klen].decode("ascii"))
            pos += 2 + klen
            (vlen,) = struct.unpack_from(">I", blob, pos)
            if vlen > MAX_VALUE_SIZE or pos + 4 + vlen > len(blob):
                raise ValueError("value length")
            items[key] = blob[pos + 4 : pos + 4 + vlen]
            pos += 4 + vlen
        if pos != len(blob):
            raise ValueError("trailing bytes")
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise StoreIntegrityError(f"journal is malformed: {exc}") from None
    return items


class _Closable:
    _closed: bool

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{type(self).__name__} is closed")

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# Memory


class MemoryStore(_Closable):
    """Values in process memory: gone when the process exits. For ``kbs serve --dev`` only."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._closed = False

    def get(self, key: str) -> bytes | None:
        check_key(key)
        with self._lock:
            self._check_open()
            return self._data.get(key)

    def put(self, key: str, value: bytes) -> None:
        self.put_many({key: value})

    def put_many(self, items: Mapping[str, bytes]) -> None:
        checked = _check_items(items)
        with self._lock:
            self._check_open()
            self._data.update(checked)

    def delete(self, key: str) -> None:
        check_key(key)
        with self._lock:
            self._check_open()
            self._data.pop(key, None)

    def keys(self, prefix: str = "") -> list[str]:
        with self._lock:
            self._check_open()
            return sorted(k for k in self._data if k.startswith(prefix))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._data.clear()

    def __repr__(self) -> str:
        return f"<MemoryStore {len(self._data)} entries>"


# --------------------------------------------------------------------------------------------------
# Encrypted files


class EncryptedFileStore(_Closable):
    """Encrypted key store in a local directory (layout and crash-safety argument: docs/kbs-store.md).

    ``directory`` is created (mode 0700) if missing or empty; an existing store is opened, which
    checks the master key, removes temp files a crash left behind and replays an interrupted
    ``put_many``. One process at a time: a second opener gets :class:`KeyStoreError`.

    Raises:
        KeyStoreError: the directory is no store, is in use, or the master key does not open it.
        StoreIntegrityError: the store header or journal fails authentication.
    """

    _STORE = "STORE"
    _JOURNAL = "JOURNAL"
    _LOCK = "LOCK"
    _ENTRIES = "entries"
    _TMP = ".tmp-"

    def __init__(self, directory: str | os.PathLike[str], master_key: MasterKey) -> None:
        if not isinstance(master_key, MasterKey):
            raise TypeError("master_key must be a MasterKey (MasterKey.from_file / from_env / from_kms)")
        self._closed = True
        self._dir = Path(directory)
        self._entries = self._dir / self._ENTRIES
        self._lock = threading.RLock()
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = os.open(
            self._dir / self._LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600
        )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise KeyStoreError(f"key store {self._dir} is in use by another process") from None
        try:
            self._aead = self._open_or_create(master_key)
            self._recover()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._closed = False

    # (1) header: store id and a check value that only the right master key opens
    def _open_or_create(self, master_key: MasterKey) -> AESGCM:
        for leftover in self._dir.glob(self._TMP + "*"):
            leftover.unlink()
        header = self._dir / self._STORE
        if not header.exists():
            present = {p.name for p in self._dir.iterdir()} - {self._LOCK, self._ENTRIES}
            if present or (
                self._entries.exists() and any(not n.startswith(self._TMP) for n in os.listdir(self._entries))
            ):
                raise KeyStoreError(
                    f"{self._dir} is not empty and holds no key store (no {self._STORE} file)"
                )
            store_id = secrets.token_bytes(16)
            aead = AESGCM(master_key._derive(_LABEL_DATA_KEY, store_id))
            self._entries.mkdir(mode=0o700, exist_ok=True)
            _fsync_dir(self._entries)
            self._write_atomic(
                self._dir, self._STORE, store_id + _seal(aead, _CHECK_PLAINTEXT, _LABEL_CHECK + store_id)
            )
            return aead
        blob = header.read_bytes()
        store_id = blob[:16]
        aead = AESGCM(master_key._derive(_LABEL_DATA_KEY, store_id))
        try:
            if len(blob) < 16 or _open(aead, blob[16:], _LABEL_CHECK + store_id) != _CHECK_PLAINTEXT:
                raise InvalidTag
        except InvalidTag:
            raise KeyStoreError(
                f"master key {master_key.key_id} does not open key store {self._dir} "
                "(wrong master key, or the STORE file was altered)"
            ) from None
        self._entries.mkdir(mode=0o700, exist_ok=True)
        return aead

    # (2) recovery: temp files are never acknowledged writes; a journal present is a committed batch
    def _recover(self) -> None:
        for name in os.listdir(self._entries):
            if name.startswith(self._TMP):
                (self._entries / name).unlink()
        journal = self._dir / self._JOURNAL
        if journal.exists():
            try:
                items = _decode_batch(_open(self._aead, journal.read_bytes(), _LABEL_JOURNAL))
            except InvalidTag:
                raise StoreIntegrityError(f"journal of key store {self._dir} failed authentication") from None
            self._apply(items)
            journal.unlink()
            _fsync_dir(self._dir)

    def _path(self, key: str) -> Path:
        return self._entries / base64.urlsafe_b64encode(key.encode("ascii")).decode().rstrip("=")

    def _write_atomic(self, directory: Path, name: str, data: bytes, *, sync_dir: bool = True) -> None:
        tmp = directory / f"{self._TMP}{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / name)
        if sync_dir:
            _fsync_dir(directory)

    def _apply(self, items: Mapping[str, bytes]) -> None:
        for key, value in items.items():
            path = self._path(key)
            self._write_atomic(
                self._entries,
                path.name,
                _seal(self._aead, value, _LABEL_ENTRY + key.encode()),
                sync_dir=False,
            )
        _fsync_dir(self._entries)

    def get(self, key: str) -> bytes | None:
        """The value under ``key`` or None. Raises StoreIntegrityError if the entry fails authentication."""
        check_key(key)
        with self._lock:
            self._check_open()
            try:
                blob = self._path(key).read_bytes()
            except FileNotFoundError:
                return None
        try:
            return _open(self._aead, blob, _LABEL_ENTRY + key.encode())
        except InvalidTag:
            raise StoreIntegrityError(
                f"entry {key!r} failed authentication (tampered, swapped with another entry, or foreign)"
            ) from None

    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``: temp file, fsync, rename, fsync directory; durable on return."""
        data = _check_value(check_key(key), value)
        with self._lock:
            self._check_open()
            self._apply({key: data})

    def put_many(self, items: Mapping[str, bytes]) -> None:
        """All or nothing: the batch is first made durable as one journal file, then applied."""
        checked = _check_items(items)
        if not checked:
            return
        with self._lock:
            self._check_open()
            if len(checked) == 1:
                self._apply(checked)
                return
            # (3) the journal appears atomically (rename) and holds the whole batch: once it exists
            # the batch is committed, and recovery replays it; before that nothing of it is visible.
            self._write_atomic(
                self._dir, self._JOURNAL, _seal(self._aead, _encode_batch(checked), _LABEL_JOURNAL)
            )
            self._apply(checked)
            (self._dir / self._JOURNAL).unlink()
            _fsync_dir(self._dir)

    def delete(self, key: str) -> None:
        check_key(key)
        with self._lock:
            self._check_open()
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()
                _fsync_dir(self._entries)

    def keys(self, prefix: str = "") -> list[str]:
        with self._lock:
            self._check_open()
            names = os.listdir(self._entries)
        found = []
        for name in names:
            if name.startswith(self._TMP):
                continue
            try:
                key = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode("ascii")
                check_key(key)
            except (binascii.Error, ValueError):
                continue  # not a name this store writes; get() of it is impossible anyway
            if self._path(key).name == name and key.startswith(prefix):
                found.append(key)
        return sorted(found)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._lock_fd)

    def __repr__(self) -> str:
        return f"<EncryptedFileStore {self._dir}>"


# --------------------------------------------------------------------------------------------------
# HashiCorp Vault


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class VaultStore(_Closable):
    """HashiCorp Vault KV version 2 backend, through ``hvac`` (install ``hvac``; docs/kbs-store.md).

    Entries live at ``<mount>/data/<prefix>entries/<key>`` as ``{"value": base64}``; a ``put_many``
    batch is first written as one journal secret ``<prefix>journal`` (check-and-set 0, so only one
    batch is in flight), then applied, then the journal is deleted; opening the store replays a
    journal a crash left behind. Vault encrypts at rest under its own barrier; with ``master_key``
    values are additionally AES-256-GCM encrypted here, bound to their key name.
    ``delete`` removes metadata and all versions (a retired key must not linger as an old version).
    One writer per ``prefix``.

    Args:
        url: ``https://...``; ``http://`` only for a loopback address (a Vault dev server).
        token: Vault token with create/read/update/delete/list on the prefix. Never printed.
        mount: KV v2 mount point.
        prefix: path prefix ending in ``/``.
        client: an ``hvac.Client`` to use instead of building one (``url``/``token`` then unused).
        master_key: optional envelope encryption key.
        ca_cert: CA bundle file to verify Vault's TLS certificate.
        timeout: seconds per request.

    Raises:
        KeyStoreError: Vault refused or failed a request (the message carries no token or value).
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        mount: str = "secret",
        prefix: str = "ray-confidential/",
        client: Any = None,
        master_key: MasterKey | None = None,
        ca_cert: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" and not (parsed.scheme == "http" and _is_loopback(parsed.hostname)):
            raise ValueError(
                f"Vault URL must be https:// (http:// only on loopback for a dev server); got {url!r}"
            )
        if not prefix.endswith("/") or prefix.startswith("/") or "//" in prefix:
            raise ValueError(
                f"prefix must be a relative path ending in '/', e.g. 'ray-confidential/'; got {prefix!r}"
            )
        if not re.match(r"\A[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\Z", mount):
            raise ValueError(f"invalid KV mount point {mount!r}")
        self._closed = True
        if client is None:
            import hvac  # optional dependency, imported only when used

            client = hvac.Client(url=url, token=token, verify=ca_cert if ca_cert else True, timeout=timeout)
        self._client = client
        self._kv = client.secrets.kv.v2
        self._mount = mount
        self._prefix = prefix
        self._lock = threading.RLock()
        self._aead = (
            AESGCM(master_key._derive(_LABEL_VAULT_KEY, (mount + ":" + prefix).encode()))
            if master_key
            else None
        )
        self._closed = False
        self._recover()

    def _call(self, what: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from hvac import exceptions

        try:
            return func(*args, mount_point=self._mount, **kwargs)
        except exceptions.InvalidPath:
            return None
        except exceptions.VaultError as exc:
            raise KeyStoreError(f"Vault {what} failed: {type(exc).__name__}: {exc.errors}") from None
        except OSError as exc:  # requests' ConnectionError/Timeout derive from OSError
            raise KeyStoreError(f"Vault {what} failed: {type(exc).__name__}") from None

    def _encode(self, key: str, value: bytes) -> dict[str, str]:
        if self._aead is not None:
            value = _seal(self._aead, value, _LABEL_ENTRY + key.encode())
        return {"value": base64.b64encode(value).decode()}

    def _decode(self, key: str, secret: Any) -> bytes:
        try:
            raw = base64.b64decode(secret["value"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            raise StoreIntegrityError(f"Vault entry {key!r} is malformed") from None
        if self._aead is None:
            return raw
        try:
            return _open(self._aead, raw, _LABEL_ENTRY + key.encode())
        except InvalidTag:
            raise StoreIntegrityError(
                f"Vault entry {key!r} failed authentication (tampered, swapped or foreign)"
            ) from None

    def _recover(self) -> None:
        resp = self._call(
            "journal read",
            self._kv.read_secret_version,
            self._prefix + "journal",
            raise_on_deleted_version=True,
        )
        if resp is None:
            return
        data = resp["data"]["data"]
        items = {check_key(k): self._decode(k, v) for k, v in data.get("items", {}).items()}
        self._apply(items)
        self._call("journal delete", self._kv.delete_metadata_and_all_versions, self._prefix + "journal")

    def _apply(self, items: Mapping[str, bytes]) -> None:
        for key, value in items.items():
            self._call(
                "write",
                self._kv.create_or_update_secret,
                self._prefix + "entries/" + key,
                secret=self._encode(key, value),
            )

    def get(self, key: str) -> bytes | None:
        check_key(key)
        with self._lock:
            self._check_open()
            resp = self._call(
                "read",
                self._kv.read_secret_version,
                self._prefix + "entries/" + key,
                raise_on_deleted_version=True,
            )
        return None if resp is None else self._decode(key, resp["data"]["data"])

    def put(self, key: str, value: bytes) -> None:
        data = _check_value(check_key(key), value)
        with self._lock:
            self._check_open()
            self._apply({key: data})

    def put_many(self, items: Mapping[str, bytes]) -> None:
        checked = _check_items(items)
        if not checked:
            return
        with self._lock:
            self._check_open()
            journal = {"items": {k: self._encode(k, v) for k, v in checked.items()}}
            from hvac import exceptions

            try:
                self._kv.create_or_update_secret(
                    self._prefix + "journal", secret=journal, cas=0, mount_point=self._mount
                )
            except exceptions.InvalidRequest:
                raise KeyStoreError(
                    f"a put_many journal already exists at {self._prefix}journal: another writer uses this prefix"
                ) from None
            except (exceptions.VaultError, OSError) as exc:
                raise KeyStoreError(f"Vault journal write failed: {type(exc).__name__}") from None
            self._apply(checked)
            self._call("journal delete", self._kv.delete_metadata_and_all_versions, self._prefix + "journal")

    def delete(self, key: str) -> None:
        check_key(key)
        with self._lock:
            self._check_open()
            self._call("delete", self._kv.delete_metadata_and_all_versions, self._prefix + "entries/" + key)

    def _list(self, folder: str) -> Iterator[str]:
        resp = self._call("list", self._kv.list_secrets, self._prefix + "entries/" + folder)
        for name in [] if resp is None else resp["data"]["keys"]:
            if name.endswith("/"):
                yield from self._list(folder + name)
            else:
                yield folder + name

    def keys(self, prefix: str = "") -> list[str]:
        folder = prefix[: prefix.rfind("/") + 1]
        with self._lock:
            self._check_open()
            return sorted(k for k in self._list(folder) if k.startswith(prefix))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            adapter = getattr(self._client, "adapter", None)
            with contextlib.suppress(Exception):
                adapter.close()  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"<VaultStore {self._mount}/{self._prefix} [token redacted]>"


__all__ = [
    "MASTER_KEY_SIZE",
    "EncryptedFileStore",
    "KeyStore",
    "KeyStoreError",
    "MasterKey",
    "MemoryStore",
    "StoreIntegrityError",
    "VaultStore",
    "check_key",
    "generate_master_key_file",
]
