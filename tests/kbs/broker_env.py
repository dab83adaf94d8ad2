"""Test harness for the key broker: a throwaway CA, owner certificates, a real server on 127.0.0.1."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ray_confidential.attestation.trust import TrustConfig
from ray_confidential.crypto import hpke
from ray_confidential.domains import DomainPolicy
from ray_confidential.kbs.audit import AuditLog
from ray_confidential.kbs.broker import Broker, BrokerSettings
from ray_confidential.kbs.client import KBSClient, Token
from ray_confidential.kbs.config import private_pem, public_pem
from ray_confidential.kbs.ratelimit import RateLimiter
from ray_confidential.kbs.server import KBSServer, TLSFiles
from ray_confidential.kbs.store import MemoryStore, generate_master_key_file
from ray_confidential.kbs.tokens import new_signing_key
from ray_confidential.testing.simulated import DevRootOfTrust, SimulatedTEE, default_measurement

PROFILE = {"sev-snp": "snp-direct", "tdx": "tdx-direct", "sgx": "sgx-gramine", "nitro": "nitro"}
BUNDLE = hashlib.sha256(b"approved bundle").digest()
CLUSTER = "cluster-a"


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _cert(subject: str, key: Any, issuer: x509.Name, issuer_key: Any, *, ca: bool = False,
          server: bool = False) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@dataclass
class PKI:
    """A throwaway CA with a server certificate for 127.0.0.1 and owner client certificates."""

    ca_pem: bytes
    server: TLSFiles
    owners: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)

    @classmethod
    def create(cls, owners: tuple[str, ...] = ("owner-a", "owner-b")) -> PKI:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test kbs ca")])
        ca = _cert("test kbs ca", ca_key, ca_name, ca_key, ca=True)
        ca_pem = ca.public_bytes(serialization.Encoding.PEM)
        skey = ec.generate_private_key(ec.SECP256R1())
        scert = _cert("localhost", skey, ca_name, ca_key, server=True)
        pki = cls(ca_pem, TLSFiles(scert.public_bytes(serialization.Encoding.PEM), _pem(skey), ca_pem))
        for owner in owners:
            k = ec.generate_private_key(ec.SECP256R1())
            c = _cert(owner, k, ca_name, ca_key)
            pki.owners[owner] = (c.public_bytes(serialization.Encoding.PEM), _pem(k))
        return pki


class RecordingAudit:
    """Keeps every audit record for assertions and forwards to the real audit log when given."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.records: list[dict[str, Any]] = []
        self.batches = 0  # append_many calls
        self._lock = threading.Lock()

    def append(self, event: str, **fields: Any) -> Any:
        result = self.inner.append(event, **fields) if self.inner is not None else None
        with self._lock:
            self.records.append({"event": event, **fields})
        return result

    def append_many(self, records: Sequence[tuple[str, Mapping[str, Any]]], **kw: Any) -> Any:
        result = self.inner.append_many(records, **kw) if self.inner is not None else None
        with self._lock:
            self.records.extend({"event": event, **fields, **kw} for event, fields in records)
            self.batches += 1
        return result

    def checkpoint(self) -> bytes:
        result: bytes = self.inner.checkpoint()
        return result

    def last(self, event: str | None = None) -> dict[str, Any]:
        with self._lock:
            matching = [r for r in self.records if event is None or r["event"] == event]
        assert matching, f"no audit record for {event!r}"
        return matching[-1]


class Clock:
    """Real time plus an adjustable offset (lets a test age a nonce without sleeping)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Harness:
    """A broker + TLS server on 127.0.0.1 and client factories."""

    def __init__(self, *, env: str = "dev", pki: PKI, rate_limit: tuple[float, int] | None = None,
                 challenge_ttl: float = 1.0, audit: Any = None, admins: frozenset[str] = frozenset(),
                 secrets: dict[tuple[str, str], bytes] | None = None,
                 require_owner_signature: bool = False) -> None:  # fmt: skip
        self.pki, self.clock = pki, Clock()
        if audit is None:
            self.audit_dir = Path(tempfile.mkdtemp(prefix="kbs-test-audit-"))
            self.audit_key = new_signing_key()
            audit = AuditLog(self.audit_dir / "audit.log", self.audit_key, group_commit=True)
        self.audit = RecordingAudit(audit)
        self.token_key, self.release_key = new_signing_key(), new_signing_key()
        trust = TrustConfig.production() if env == "prod" else DevRootOfTrust.for_process().trust_config()
        self.settings = BrokerSettings(env=env, issuer="test-kbs", audience="test-kbs", challenge_ttl=challenge_ttl,
                                       admins=admins, require_owner_signature=require_owner_signature)  # fmt: skip
        self.broker = Broker(self.settings, store=MemoryStore(), audit=self.audit, trust=trust,
                             token_key=self.token_key, release_key=self.release_key, clock=self.clock)  # fmt: skip
        limiter = (
            RateLimiter(rate=rate_limit[0], burst=rate_limit[1], clock=time.monotonic) if rate_limit else None
        )
        self.server = KBSServer(self.broker, address="127.0.0.1:0", tls=pki.server, owner_address="127.0.0.1:0",
                                limiter=limiter,
                                secrets=secrets, max_workers=8)  # fmt: skip
        self.port = self.server.start()
        self.target = f"127.0.0.1:{self.port}"
        self.owner_target = f"127.0.0.1:{self.server.owner_port}"
        self.release_pem = public_pem(self.release_key)
        self._clients: list[KBSClient] = []

    def client(self, owner: str | None = None, **kw: Any) -> KBSClient:
        cert, key = self.pki.owners[owner] if owner else (None, None)
        c = KBSClient(self.owner_target if owner else self.target, release_public_key=kw.pop("release_public_key", self.release_pem),
                      ca_cert=self.pki.ca_pem, client_cert=cert, client_key=key, timeout=kw.pop("timeout", 5.0),
                      retries=kw.pop("retries", 0))  # fmt: skip
        self._clients.append(c)
        return c

    def close(self) -> None:
        for c in self._clients:
            c.close()
        self.server.stop(grace=0)
        if getattr(self, "audit_dir", None) is not None:
            self.audit.inner.close()
            shutil.rmtree(self.audit_dir, ignore_errors=True)


def pinned_policy(kind: str, **kw: Any) -> DomainPolicy:
    return DomainPolicy(
        bundles=(BUNDLE.hex(),), measurements={kind: (default_measurement(kind).hex(),)}, **kw
    )


@dataclass
class Executor:
    """A simulated executor: its TEE, its ephemeral HPKE key."""

    kind: str
    tee: SimulatedTEE
    key: hpke.PrivateKeyHandle

    @classmethod
    def create(cls, kind: str, **tee_kw: Any) -> Executor:
        return cls(kind, SimulatedTEE(kind, **tee_kw), hpke.generate_private_key())

    def attest(self, client: KBSClient, *, domains: tuple[str, ...] = (), scope: str = "release",
               cluster_id: str = CLUSTER, bundle: bytes = BUNDLE, node_id: str = "node-1") -> Token:  # fmt: skip
        ch = client.challenge()
        evidence = self.tee.evidence(ch.binding(self.key, cluster_id=cluster_id, bundle_digest=bundle))
        return client.attest(ch, evidence, profile=PROFILE[self.kind], executor_key=self.key, cluster_id=cluster_id,
                             bundle_digest=bundle, scope=scope, node_id=node_id, pool="pool-1", region="eu",
                             domains=domains)  # fmt: skip


def iter_kinds() -> Iterator[str]:
    yield from PROFILE


def write_production_config(tmp: Path, pki: PKI, **overrides: Any) -> Path:
    """A production ``kbs.yaml`` in ``tmp`` (TLS from ``pki``, fresh P-256 keys, encrypted file store
    under ``master.key``, audit log, vendor roots, one pinned SEV-SNP domain); ``overrides`` replace
    top-level keys."""
    files = {
        "server.pem": pki.server.cert_chain,
        "server.key": pki.server.private_key,
        "owners-ca.pem": pki.ca_pem,
    }
    for name in ("token.pem", "release.pem", "audit.pem"):
        files[name] = private_pem(new_signing_key())
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        os.chmod(tmp / name, 0o600)
    if not (tmp / "master.key").exists():
        generate_master_key_file(tmp / "master.key")
    m = default_measurement("sev-snp").hex()
    config: dict[str, Any] = {
        "env": "prod",
        "listen": "127.0.0.1:0",
        "owner_listen": "127.0.0.1:0",
        "issuer": "kbs.hospital.example",
        "tls": {"cert": "server.pem", "key": "server.key", "client_ca": "owners-ca.pem"},
        "keys": {"token_key": "token.pem", "release_key": "release.pem", "audit_key": "audit.pem"},
        "store": {"backend": "file", "path": "store", "master_key": {"source": "file", "path": str(tmp / "master.key")}},
        "audit": {"path": "audit.log", "group_commit": True},
        "trust": {"roots": ["amd-ark-milan", "amd-ark-genoa", "intel-sgx-root-ca"]},
        "rate_limit": {"rate": 50, "burst": 100},
        "domains": [{"name": "hospital", "owner": "CN=owner-a",
                     "policy": {"bundles": [BUNDLE.hex()], "measurements": {"sev-snp": [m]}}}],
    }  # fmt: skip
    config.update(overrides)
    path = tmp / "kbs.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
