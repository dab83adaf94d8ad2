"""Key services: where a sealed object's data key (DEK) gets unwrapped.

``KeyService`` is the one interface the rest of the code opens objects through:
``unwrap(wrapped_dek, header_hash, header_bytes) -> DEK``. The header bytes travel with the request
so the service can audit the object id and check the key version itself.

- :class:`DevKeyService`: the embedded development default. It runs in the owner's process, keeps
  private keys in a per-user state directory (so ``ray-confidential open`` works after the driver
  exits), and owns the domains it creates. It is not a broker: it performs no attestation.
- :class:`PublicDirectory`: descriptors only (public keys). It can seal, never open.

    >>> import tempfile, warnings
    >>> svc = DevKeyService(tempfile.mkdtemp())
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     desc = svc.create_domain("demo")
    >>> (desc.name, desc.version)
    ('demo', 1)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from ray_confidential.crypto import hpke
from ray_confidential.domains import DomainDescriptor, DomainPolicy
from ray_confidential.errors import DecryptionError, KeyReleaseDenied
from ray_confidential.sealed.format import SealedHeader

STATE_DIR_ENV = "RAY_CONFIDENTIAL_STATE_DIR"
DEK_CACHE_ENTRIES = 1024
"""Unwrapped DEKs a :class:`DevKeyService` keeps (least recently used dropped first)."""
_Stamp = tuple[int, int, int]


def default_state_dir() -> Path:
    """``$RAY_CONFIDENTIAL_STATE_DIR``, else ``$XDG_STATE_HOME/ray-confidential``, else
    ``~/.local/state/ray-confidential`` (docs/development-keys.md)."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ray-confidential"


class KeyService(Protocol):
    """What sealing and opening need from whoever holds (or brokers) domain keys."""

    def descriptor(self, domain: str, version: int | None = None) -> DomainDescriptor: ...

    def unwrap(self, wrapped_dek: bytes, header_hash: bytes, header: bytes) -> bytes: ...


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown domain {name!r}: create it first with rc.create_domain({name!r})")


class _GrantedDEK(NamedTuple):
    """One granted development unwrap (the header bytes are its key in the cache)."""

    stamp: _Stamp
    domain: str
    header_hash: bytes
    wrapped_dek: bytes
    dek: bytes


class PublicDirectory:
    """Published domain descriptors only. Seals; every unwrap is denied."""

    def __init__(self, descriptors: Mapping[str, DomainDescriptor] | None = None) -> None:
        self._descriptors = dict(descriptors or {})

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PublicDirectory:
        data = json.loads(Path(path).read_text())
        descs = [DomainDescriptor.from_dict(d) for d in data.get("domains", [])]
        return cls({d.name: d for d in descs})

    def descriptor(self, domain: str, version: int | None = None) -> DomainDescriptor:
        desc = self._descriptors.get(domain)
        if desc is None or (version is not None and version != desc.version):
            raise ValueError(f"unknown domain {domain!r}: it is not in the published descriptors")
        return desc

    def unwrap(self, wrapped_dek: bytes, header_hash: bytes, header: bytes) -> bytes:
        raise KeyReleaseDenied(
            "this process holds no key service: it can seal but not open. Open results off-cluster "
            "with `ray-confidential open FILE` as the domain owner"
        )


class DevKeyService:
    """In-process development key service (no attestation; the caller is the domain owner).

    Args:
        state_dir: directory holding one JSON file per domain (mode 0600) and ``audit.jsonl``.
    """

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self._keys: dict[tuple[str, int], hpke.PrivateKeyHandle] = {}
        self._records: dict[str, tuple[_Stamp, dict[str, Any]]] = {}
        self._paths: dict[str, Path] = {}
        self._descriptors: dict[tuple[str, int | None], tuple[_Stamp, DomainDescriptor]] = {}
        # header bytes -> (domain file stamp when the unwrap was granted, DEK). The header bytes
        # fix domain, version, suite, header hash and wrapped DEK, so a hit is exactly the unwrap
        # that was granted; the stamp re-validates it against the domain file on every use.
        self._deks: OrderedDict[bytes, _GrantedDEK] = OrderedDict()
        self._dek_lock = threading.Lock()
        self.unwrap_count = 0

    def __reduce__(self) -> Any:
        raise TypeError("DevKeyService holds private keys and cannot be pickled or sent through Ray")

    # -- storage ---------------------------------------------------------------------------------
    def _domain_path(self, name: str) -> Path:
        path = self._paths.get(name)
        if path is None:
            path = self.state_dir / "domains" / (urllib.parse.quote(name, safe="") + ".json")
            if len(self._paths) < 4096:
                self._paths[name] = path
        return path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        (self.state_dir / "domains").mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)
        with open(self.state_dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self, name: str, *, fresh: bool = False) -> dict[str, Any] | None:
        """The domain's record; cached while the file is unchanged (other processes may rotate)."""
        loaded = self._load_stamped(name, fresh=fresh)
        return None if loaded is None else loaded[1]

    def _load_stamped(self, name: str, *, fresh: bool = False) -> tuple[_Stamp, dict[str, Any]] | None:
        """The domain file's (mtime, size, inode) stamp and its record (the record may be newer
        than the stamp if the file was replaced in between: then the next call reloads)."""
        path = self._domain_path(name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._records.get(name)
        if not fresh and cached is not None and cached[0] == stamp:
            return cached
        record: dict[str, Any] = json.loads(path.read_text())
        if not fresh:
            self._records[name] = (stamp, record)
        return stamp, record

    def _store(self, name: str, record: Mapping[str, Any]) -> None:
        path = self._domain_path(name)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._records.pop(name, None)
        self._forget(name)  # in this process, exactly; other processes see the file's new stamp

    def _audit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"time": time.time(), "event": event, **fields}, sort_keys=True)
        with open(self.state_dir / "audit.jsonl", "a") as f:
            f.write(line + "\n")

    # -- owner operations ------------------------------------------------------------------------
    def create_domain(
        self, name: str, policy: DomainPolicy | None = None, *, suite: str = hpke.DEFAULT_SUITE
    ) -> DomainDescriptor:
        """Create ``name`` (idempotent for the same policy).

        Raises:
            ValueError: the domain exists with a different policy (use :meth:`update_policy`).
        """
        from ray_confidential.sealed.format import _name

        _name(name, "domain")
        policy = policy if policy is not None else DomainPolicy.development()
        with self._locked():
            record = self._load(name, fresh=True)
            if record is not None:
                existing = DomainPolicy.from_dict(record["policy"])
                if existing != policy:
                    raise ValueError(
                        f"domain {name!r} already exists with a different policy; change it with "
                        "update_policy() (an audited update), or choose another name"
                    )
                return self.descriptor(name)
            key = hpke.generate_private_key(suite)
            record = {
                "name": name,
                "policy": policy.to_dict(),
                "versions": [
                    {
                        "version": 1,
                        "suite": suite,
                        "private_key": key.export_private_bytes().hex(),
                        "retired": False,
                    }
                ],
            }
            self._store(name, record)
            self._audit("create_domain", domain=name, policy_hash=policy.policy_hash())
        return self.descriptor(name)

    def update_policy(self, name: str, policy: DomainPolicy) -> None:
        """Replace a domain's policy (audited)."""
        with self._locked():
            record = self._require(name, fresh=True)
            old = DomainPolicy.from_dict(record["policy"]).policy_hash()
            record["policy"] = policy.to_dict()
            self._store(name, record)
            self._audit("update_policy", domain=name, old_policy_hash=old, policy_hash=policy.policy_hash())

    def rotate(self, name: str, *, suite: str | None = None) -> DomainDescriptor:
        """Add a new key version (the new default for sealing); older versions still open."""
        with self._locked():
            record = self._require(name, fresh=True)
            latest = record["versions"][-1]
            key = hpke.generate_private_key(suite or latest["suite"])
            version = latest["version"] + 1
            record["versions"].append(
                {
                    "version": version,
                    "suite": key.suite,
                    "private_key": key.export_private_bytes().hex(),
                    "retired": False,
                }
            )
            self._store(name, record)
            self._audit("rotate", domain=name, version=version)
        return self.descriptor(name)

    def retire(self, name: str, version: int) -> None:
        """Retire a key version: objects sealed under it can no longer be opened."""
        with self._locked():
            record = self._require(name, fresh=True)
            entry = self._version(record, version)
            entry["retired"] = True
            self._store(name, record)
            self._keys.pop((name, version), None)
            self._audit("retire", domain=name, version=version)

    def policy(self, name: str) -> DomainPolicy:
        return DomainPolicy.from_dict(self._require(name)["policy"])

    def domains(self) -> list[str]:
        folder = self.state_dir / "domains"
        if not folder.exists():
            return []
        return sorted(urllib.parse.unquote(p.stem) for p in folder.glob("*.json"))

    # -- KeyService ------------------------------------------------------------------------------
    def descriptor(self, domain: str, version: int | None = None) -> DomainDescriptor:
        """The public descriptor of ``domain`` (its newest live version unless ``version`` is given).

        Cached per (domain, version) while the domain file is unchanged, so opening and sealing do
        not recompute the policy hash each time (a rotation, retirement or policy update rewrites
        the file and so invalidates it).
        """
        loaded = self._load_stamped(domain)
        if loaded is None:
            raise _unknown(domain)
        stamp, record = loaded
        hit = self._descriptors.get((domain, version))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        desc = self._describe(domain, record, version)
        if len(self._descriptors) >= 4096:
            self._descriptors.clear()
        self._descriptors[(domain, version)] = (stamp, desc)
        return desc

    def _describe(self, domain: str, record: Mapping[str, Any], version: int | None) -> DomainDescriptor:
        live = [v for v in record["versions"] if not v["retired"]]
        if version is None:
            if not live:
                raise ValueError(f"domain {domain!r} has no active key version; rotate() to create one")
            entry = live[-1]
        else:
            entry = self._version(record, version)
        policy = DomainPolicy.from_dict(record["policy"])
        key = self._private(domain, entry)
        return DomainDescriptor(
            name=domain,
            version=entry["version"],
            public_key=key.public_key(),
            policy_hash=policy.policy_hash(),
            allow_pickle=policy.allow_pickle,
            seal_arguments=policy.seal_arguments,
            recipients=policy.recipients,
        )

    def unwrap(self, wrapped_dek: bytes, header_hash: bytes, header: bytes) -> bytes:
        """Unwrap a DEK for the object whose header bytes are given.

        A granted unwrap is remembered per header (at most ``DEK_CACHE_ENTRIES``) and reused only
        while the domain file is unchanged: every call re-reads the file's stamp, so a retirement,
        rotation or policy change (here or in another process) forces the full check again.

        Raises:
            KeyReleaseDenied: the domain is not held here.
            DecryptionError: retired or unknown key version, header mismatch, or failed unwrap.
        """
        header = bytes(header)
        with self._dek_lock:
            hit = self._deks.get(header)
        if hit is not None and hit.header_hash == header_hash and hit.wrapped_dek == wrapped_dek:
            loaded = self._load_stamped(hit.domain)
            if loaded is not None and loaded[0] == hit.stamp:
                with self._dek_lock:
                    if header in self._deks:
                        self._deks.move_to_end(header)
                return hit.dek
        parsed = SealedHeader.parse(header)
        if parsed.header_hash != header_hash or parsed.wrapped_dek != wrapped_dek:
            raise DecryptionError()
        loaded = self._load_stamped(parsed.domain)
        if loaded is None:
            raise KeyReleaseDenied(f"domain {parsed.domain!r} is not held by this key service")
        stamp, record = loaded
        entries = [v for v in record["versions"] if v["version"] == parsed.key_version]
        if not entries or entries[0]["retired"] or entries[0]["suite"] != parsed.suite:
            with self._dek_lock:
                self._deks.pop(header, None)
            raise DecryptionError()
        self.unwrap_count += 1
        dek = self._private(parsed.domain, entries[0]).unwrap(wrapped_dek, info=header_hash)
        with self._dek_lock:
            self._deks[header] = _GrantedDEK(stamp, parsed.domain, header_hash, wrapped_dek, dek)
            while len(self._deks) > DEK_CACHE_ENTRIES:
                self._deks.popitem(last=False)
        return dek

    def _forget(self, name: str) -> None:
        """Drop cached descriptors and DEKs of domain ``name`` (they also expire on file change)."""
        self._descriptors = {k: v for k, v in self._descriptors.items() if k[0] != name}
        with self._dek_lock:
            for header in [h for h, g in self._deks.items() if g.domain == name]:
                del self._deks[header]

    # -- helpers ---------------------------------------------------------------------------------
    def _require(self, name: str, *, fresh: bool = False) -> dict[str, Any]:
        record = self._load(name, fresh=fresh)
        if record is None:
            raise _unknown(name)
        return record

    @staticmethod
    def _version(record: Mapping[str, Any], version: int) -> dict[str, Any]:
        for entry in record["versions"]:
            if entry["version"] == version:
                result: dict[str, Any] = entry
                return result
        raise ValueError(f"domain {record['name']!r} has no key version {version}")

    def _private(self, name: str, entry: Mapping[str, Any]) -> hpke.PrivateKeyHandle:
        cache_key = (name, int(entry["version"]))
        if cache_key not in self._keys:
            self._keys[cache_key] = hpke.PrivateKeyHandle(entry["suite"], bytes.fromhex(entry["private_key"]))
        return self._keys[cache_key]
