"""A driver's view of a configured key broker: signed domain descriptors, never keys.

Row 4 of the ``rc.init`` table (README): a driver connecting to a cluster without development
services uses the broker named by ``$RAY_CONFIDENTIAL_KBS`` (a YAML file) to fetch domain
descriptors, each verified against the pinned release key, so it can seal. It cannot attest, so
every unwrap is refused with :class:`KeyReleaseDenied`; the owner opens exported results
off-cluster.

    # kbs-client.yaml
    target: kbs.example.com:8443
    ca_cert: /etc/ray-confidential/kbs-ca.pem          # omit only for a development broker on 127.0.0.1
    release_public_key: /etc/ray-confidential/kbs-release.pem
    owner_ca: /etc/ray-confidential/owner-ca.pem       # optional: seal only to owner-signed domain keys

With ``owner_ca``, every descriptor must also carry its owner's signature under that CA (docs/kbs.md
"Owner signatures"): data is then sealed only to a key and policy the domain's owner signed, not
merely to what the broker serves.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from ray_confidential.domains import DomainDescriptor
from ray_confidential.errors import KeyReleaseDenied
from ray_confidential.kbs.owner_sig import OwnerSignatureError

KBS_ENV = "RAY_CONFIDENTIAL_KBS"
DESCRIPTOR_TTL_S = 30.0


class BrokerDirectory:
    """``KeyService`` over a broker's signed descriptors: seals, never opens."""

    def __init__(
        self,
        client: Any,
        *,
        feed_source: tuple[str, bytes | None] | None = None,
        owner_ca: bytes | None = None,
    ) -> None:
        self._client = client
        self._owner_ca = owner_ca
        self.feed_source = feed_source
        """``(target, CA PEM)`` of the broker's statement feed: the cluster's trust registry follows it."""
        self._cache: dict[tuple[str, int | None], tuple[float, DomainDescriptor]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BrokerDirectory:
        """Build from a client YAML (module docstring). Raises ValueError naming a bad field."""
        from ray_confidential.kbs.client import KBSClient

        raw = yaml.safe_load(Path(path).read_text())
        if not isinstance(raw, dict) or not isinstance(raw.get("target"), str):
            raise ValueError(f"{path}: needs 'target: HOST:PORT' and 'release_public_key: PEM file'")
        unknown = set(raw) - {"target", "ca_cert", "release_public_key", "timeout_s", "owner_ca"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        try:
            release_key = Path(raw["release_public_key"]).read_bytes()
            ca_cert = Path(raw["ca_cert"]).read_bytes() if raw.get("ca_cert") else None
            owner_ca = Path(raw["owner_ca"]).read_bytes() if raw.get("owner_ca") else None
        except (KeyError, TypeError, OSError) as exc:
            raise ValueError(f"{path}: cannot read release_public_key / ca_cert / owner_ca: {exc}") from exc
        client = KBSClient(
            raw["target"],
            release_public_key=release_key,
            ca_cert=ca_cert,
            timeout=float(raw.get("timeout_s", 5.0)),
        )
        return cls(client, feed_source=(raw["target"], ca_cert), owner_ca=owner_ca)

    def descriptor(self, domain: str, version: int | None = None) -> DomainDescriptor:
        """The broker-signed descriptor (cached for 30 s). Raises ValueError for an unknown domain."""
        key = (domain, version)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < DESCRIPTOR_TTL_S:
                return hit[1]
        try:
            desc: DomainDescriptor = self._client.descriptor(domain, version, owner_ca=self._owner_ca)
        except OwnerSignatureError:
            raise  # the domain exists; its owner has not signed what the broker serves
        except KeyReleaseDenied as exc:
            raise ValueError(f"unknown domain {domain!r} at the key broker ({exc})") from exc
        with self._lock:
            self._cache[key] = (now, desc)
        return desc

    def unwrap(self, wrapped_dek: bytes, header_hash: bytes, header: bytes) -> bytes:
        raise KeyReleaseDenied(
            "this driver is not an attested executor: the broker releases keys only to enclave executors. "
            "Export the result (rc.export) and open it off-cluster with `ray-confidential open FILE` as its owner"
        )

    def __reduce__(self) -> Any:
        raise TypeError("BrokerDirectory holds a broker connection and stays in the driver")
