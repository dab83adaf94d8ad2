"""Broker configuration: ``kbs.yaml`` for production, :meth:`BrokerConfig.development` for ``--dev``.

    config = BrokerConfig.from_yaml("kbs.yaml")          # doctest: +SKIP
    server, broker = build(config)

Every setting enters through :meth:`BrokerConfig.from_dict` (unknown keys are errors). A production
configuration refuses to load when it names a root that is not on the vendor allow-list, a domain
whose policy has no measurement pin (or is a development policy), or no TLS. The format is
documented with an example in docs/kbs.md "Configuration".
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ray_confidential.attestation.policy import AppraisalPolicy
from ray_confidential.attestation.trust import VENDOR_ROOT_FINGERPRINTS, TrustConfig
from ray_confidential.domains import DomainPolicy
from ray_confidential.kbs.broker import Broker, BrokerSettings, check_production_domain
from ray_confidential.kbs.domains import DomainRecord
from ray_confidential.kbs.ratelimit import RateLimiter
from ray_confidential.kbs.server import DEFAULT_WORKERS, KBSServer, TLSFiles
from ray_confidential.kbs.statement_feed import ClusterStatementIssuer, StatementFeed, fan_out
from ray_confidential.kbs.store import KeyStore
from ray_confidential.kbs.tokens import new_signing_key

DEV_OWNER: Final = "CN=dev-owner"
DEV_BANNER: Final = (
    "\n" + "!" * 78 + "\n"
    "!!  DEVELOPMENT KEY BROKER: plaintext gRPC on 127.0.0.1, in-memory keys, simulated TEE roots,\n"
    "!!  env=dev tokens, any caller is the owner. It protects nothing; never use it with real data.\n"
    + "!" * 78
    + "\n"
)
TOP_KEYS: Final = frozenset(
    {"env", "listen", "issuer", "audience", "tls", "keys", "store", "audit", "trust", "tokens",
     "challenges", "rate_limit", "owner_listen", "routing_policy", "domains", "secrets", "admins", "cluster_ids",
     "grpc", "require_owner_signature"}
)  # fmt: skip


class ConfigError(ValueError):
    """The configuration is unusable or unsafe; the message names the setting."""


def load_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"{path}: expected a PEM P-256 private key")
    return key


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainSpec:
    """A domain the configuration creates at start (idempotent)."""

    name: str
    owner: str
    policy: Mapping[str, Any]
    appraisal: Mapping[str, Any] | None = None
    suite: str = "x25519"


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """Everything ``kbs serve`` needs. Build with :meth:`from_dict`, :meth:`from_yaml` or :meth:`development`."""

    settings: BrokerSettings
    listen: str
    tls: TLSFiles | None
    owner_listen: str | None = None
    trust: TrustConfig
    token_key: ec.EllipticCurvePrivateKey = field(repr=False)
    release_key: ec.EllipticCurvePrivateKey = field(repr=False)
    audit_key: ec.EllipticCurvePrivateKey = field(repr=False)
    statement_key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    """Signs trust-registry statements served by ``GetStatements`` (docs/placement.md section 6)."""
    store: Mapping[str, Any]
    audit_path: Path
    group_commit: bool = True
    rate_limit: tuple[float, int] | None = (100.0, 200)
    max_workers: int = DEFAULT_WORKERS
    domains: tuple[DomainSpec, ...] = ()
    secrets: Mapping[tuple[str, str], bytes] = field(default_factory=dict, repr=False)
    dev: bool = False

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> BrokerConfig:
        import yaml

        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a YAML mapping")
        return cls.from_dict(data, base=Path(path).resolve().parent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: Path = Path()) -> BrokerConfig:
        """Parse and check a configuration mapping (paths relative to ``base``)."""
        unknown = set(data) - TOP_KEYS
        if unknown:
            raise ConfigError(f"unknown configuration keys {sorted(unknown)}; known: {sorted(TOP_KEYS)}")

        def path(value: Any, what: str) -> Path:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{what} must be a file path")
            return (base / value).resolve()

        def section(name: str) -> Mapping[str, Any]:
            value = data.get(name) or {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name} must be a mapping")
            return value

        env = data.get("env", "prod")
        if env != "prod":
            raise ConfigError(
                "a configuration file describes a production broker (env: prod); use --dev otherwise"
            )
        tls_s = section("tls")
        if "cert" not in tls_s or "key" not in tls_s:
            raise ConfigError("tls: cert and key are required (owners use mutual TLS: add client_ca)")
        tls = TLSFiles(path(tls_s["cert"], "tls.cert").read_bytes(), path(tls_s["key"], "tls.key").read_bytes(),
                       path(tls_s["client_ca"], "tls.client_ca").read_bytes() if tls_s.get("client_ca") else None)  # fmt: skip
        keys = section("keys")
        for k in ("token_key", "release_key", "audit_key"):
            if k not in keys:
                raise ConfigError(f"keys.{k}: path of a PEM P-256 private key is required")
        token_key, release_key, audit_key = (load_private_key(path(keys[k], f"keys.{k}"))
                                             for k in ("token_key", "release_key", "audit_key"))  # fmt: skip
        statement_key = load_private_key(path(keys["statement_key"], "keys.statement_key")) if keys.get(
            "statement_key") else None  # fmt: skip
        if statement_key is not None and not data.get("cluster_ids"):
            raise ConfigError(
                "keys.statement_key needs cluster_ids: statements name the cluster they route for"
            )
        # Trust: vendor roots only, by name or fingerprint.
        trust_s = section("trust")
        roots = trust_s.get("roots", list(VENDOR_ROOT_FINGERPRINTS))
        fingerprints = set()
        for root in roots:
            fp = VENDOR_ROOT_FINGERPRINTS.get(str(root), str(root).lower())
            if fp not in VENDOR_ROOT_FINGERPRINTS.values():
                raise ConfigError(
                    f"trust.roots: {root!r} is not on the vendor allow-list "
                    f"({', '.join(VENDOR_ROOT_FINGERPRINTS)}); a production broker trusts vendor roots only"
                )
            fingerprints.add(fp)
        if not fingerprints:
            raise ConfigError("trust.roots is empty")
        trust = TrustConfig(root_fingerprints=frozenset(fingerprints))
        routing = None
        if data.get("routing_policy") is not None:
            try:
                routing = AppraisalPolicy.from_dict(data["routing_policy"])
            except ValueError as exc:
                raise ConfigError(f"routing_policy: {exc}") from None
            if not routing.pinned:
                raise ConfigError("routing_policy: has no measurement pin")
        tokens, challenges = section("tokens"), section("challenges")
        require_owner_signature = data.get("require_owner_signature", True)
        if not isinstance(require_owner_signature, bool):
            raise ConfigError("require_owner_signature must be true or false (default true)")
        if not require_owner_signature:
            warnings.warn("require_owner_signature: false: domain key versions serve keys without their "
                          "owner's signature over the current policy", UserWarning, stacklevel=2)  # fmt: skip
        issuer = str(data.get("issuer", "ray-confidential-kbs"))
        settings = BrokerSettings(
            env="prod", issuer=issuer, audience=str(data.get("audience", issuer)),
            token_ttl=int(tokens.get("ttl_s", 300)), challenge_ttl=float(challenges.get("ttl_s", 30)),
            cluster_ids=frozenset(map(str, data["cluster_ids"])) if data.get("cluster_ids") else None,
            admins=frozenset(map(str, data.get("admins", []))), routing_policy=routing,
            require_owner_signature=require_owner_signature,
        )  # fmt: skip
        if not 0 < settings.token_ttl <= 300:
            raise ConfigError("tokens.ttl_s must be 1..300")
        store = _store_spec(section("store"), path)
        audit_s = section("audit")
        domains = tuple(_domain_spec(d) for d in data.get("domains", []))
        for spec in domains:
            try:
                policy = DomainPolicy.from_dict(spec.policy)
                probe = DomainRecord(name=spec.name, owner=spec.owner, policy=policy, appraisal=spec.appraisal,
                                     versions=(), created=0)  # fmt: skip
                check_production_domain(policy, probe.appraisal_policy())
            except ValueError as exc:
                raise ConfigError(f"domains[{spec.name}]: {exc}") from None
        secrets: dict[tuple[str, str], bytes] = {}
        for s in data.get("secrets", []):
            secrets[(str(s["domain"]), str(s["name"]))] = path(s["file"], "secrets.file").read_bytes()
        rl = section("rate_limit")
        grpc_s = section("grpc")
        if set(grpc_s) - {"max_workers"}:
            raise ConfigError(
                f"grpc: unknown keys {sorted(set(grpc_s) - {'max_workers'})}; known: ['max_workers']"
            )
        workers = grpc_s.get("max_workers", DEFAULT_WORKERS)
        if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 256:
            raise ConfigError("grpc.max_workers must be an integer 1..256")
        return cls(
            settings=settings, listen=str(data.get("listen", "0.0.0.0:50051")), tls=tls, trust=trust,
            owner_listen=str(data["owner_listen"]) if data.get("owner_listen") else None,
            token_key=token_key, release_key=release_key, audit_key=audit_key, statement_key=statement_key,
            store=store, audit_path=path(audit_s.get("path", "kbs-audit.log"), "audit.path"),
            group_commit=bool(audit_s.get("group_commit", True)),
            rate_limit=None if rl.get("disabled") else (float(rl.get("rate", 100)), int(rl.get("burst", 200))),
            domains=domains, secrets=secrets, max_workers=workers,
        )  # fmt: skip

    @classmethod
    def development(
        cls, *, port: int = 0, host: str = "127.0.0.1", audit_path: str | os.PathLike[str] | None = None,
        rate_limit: tuple[float, int] | None = (1000.0, 2000), challenge_ttl: float = 30.0,
    ) -> BrokerConfig:  # fmt: skip
        """The development broker: plaintext on loopback, ephemeral keys, simulated roots, env=dev."""
        from ray_confidential.testing.simulated import DevRootOfTrust

        audit = Path(audit_path) if audit_path else Path(tempfile.mkdtemp(prefix="kbs-dev-")) / "audit.log"
        return cls(
            settings=BrokerSettings(env="dev", issuer="ray-confidential-dev-kbs", audience="ray-confidential-dev-kbs",
                                    challenge_ttl=challenge_ttl, admins=frozenset({DEV_OWNER})),
            listen=f"{host}:{port}", tls=None, trust=DevRootOfTrust.for_process().trust_config(),
            token_key=new_signing_key(), release_key=new_signing_key(), audit_key=new_signing_key(),
            store={"backend": "memory"}, audit_path=audit, group_commit=True, rate_limit=rate_limit, dev=True,
        )  # fmt: skip


def _domain_spec(d: Any) -> DomainSpec:
    if not isinstance(d, Mapping) or not {"name", "owner", "policy"} <= set(d):
        raise ConfigError("each domains entry needs name, owner and policy")
    unknown = set(d) - {"name", "owner", "policy", "appraisal", "suite"}
    if unknown:
        raise ConfigError(f"domains entry {d.get('name')!r}: unknown keys {sorted(unknown)}")
    return DomainSpec(name=str(d["name"]), owner=str(d["owner"]), policy=dict(d["policy"]),
                      appraisal=d.get("appraisal"), suite=str(d.get("suite", "x25519")))  # fmt: skip


STORE_KEYS: Final = {
    "file": frozenset({"backend", "path", "master_key"}),
    "vault": frozenset(
        {"backend", "url", "token_env", "mount", "prefix", "ca_cert", "master_key", "timeout_s"}
    ),
}


def _store_spec(spec: Mapping[str, Any], path: Callable[[Any, str], Path]) -> dict[str, Any]:
    """Check the ``store:`` section and resolve its paths (relative to the YAML file)."""
    store = dict(spec) or {"backend": "file"}
    backend = store.setdefault("backend", "file")
    if backend == "memory":
        raise ConfigError(
            "store.backend: memory is for --dev only; a production broker needs a durable store"
        )
    if backend not in STORE_KEYS:
        raise ConfigError(f"store.backend must be file or vault, got {backend!r}")
    unknown = set(store) - STORE_KEYS[backend]
    if unknown:
        raise ConfigError(
            f"store ({backend}): unknown keys {sorted(unknown)}; known: {sorted(STORE_KEYS[backend])}"
        )
    mk = store.get("master_key")
    if mk is not None and isinstance(mk, Mapping) and mk.get("source") == "file" and "path" in mk:
        store["master_key"] = {**mk, "path": str(path(mk["path"], "store.master_key.path"))}
    if backend == "file":
        store["path"] = str(path(store.get("path", "kbs-store"), "store.path"))
        if mk is None:
            raise ConfigError("store.master_key is required for the file store (it is never generated here)")
        return store
    # Vault: the token comes from the environment only (never from the YAML file, never printed).
    for name in ("url", "token_env"):
        if not isinstance(store.get(name), str) or not store[name]:
            raise ConfigError(f"store.{name} is required for the vault backend (docs/kbs-store.md)")
    if store.get("ca_cert") is not None:
        store["ca_cert"] = str(path(store["ca_cert"], "store.ca_cert"))
    return store


def _master_key(mk: Any) -> Any:
    from ray_confidential.kbs import store as store_mod

    if not isinstance(mk, Mapping) or "source" not in mk:
        raise ConfigError("store.master_key: {source: file, path: ...} | {source: env, name: ...} | "
                          "{source: kms, plugin: 'module:callable', params: {...}} is required")  # fmt: skip
    if mk["source"] == "file":
        return store_mod.MasterKey.from_file(mk["path"])
    if mk["source"] == "env":
        return store_mod.MasterKey.from_env(mk["name"])
    if mk["source"] == "kms":
        return store_mod.MasterKey.from_kms(mk["plugin"], **dict(mk.get("params") or {}))
    raise ConfigError(f"store.master_key.source must be file, env or kms, got {mk['source']!r}")


def open_store(spec: Mapping[str, Any]) -> KeyStore:
    """The key store a configuration names (the master key is supplied, never generated here).

    ``file``: :class:`~ray_confidential.kbs.store.EncryptedFileStore` under ``master_key``.
    ``vault``: :class:`~ray_confidential.kbs.store.VaultStore` at ``url`` with the token read from the
    environment variable ``token_env``; ``master_key`` (optional) adds envelope encryption.
    """
    from ray_confidential.kbs import store as store_mod

    backend = spec.get("backend", "file")
    if backend == "memory":
        return store_mod.MemoryStore()
    if backend == "vault":
        token = os.environ.get(str(spec["token_env"]), "")
        if not token:
            raise ConfigError(
                f"store.token_env: environment variable {spec['token_env']!r} is unset or empty"
            )
        master = _master_key(spec["master_key"]) if spec.get("master_key") is not None else None
        return store_mod.VaultStore(str(spec["url"]), token, mount=str(spec.get("mount", "secret")),
                                    prefix=str(spec.get("prefix", "ray-confidential/")), master_key=master,
                                    ca_cert=spec.get("ca_cert"), timeout=float(spec.get("timeout_s", 10.0)))  # fmt: skip
    if backend != "file":
        raise ConfigError(f"store.backend must be file, vault or memory, got {backend!r}")
    return store_mod.EncryptedFileStore(spec["path"], _master_key(spec.get("master_key")))


def open_audit(config: BrokerConfig) -> Any:
    from ray_confidential.kbs.audit import AuditLog

    config.audit_path.parent.mkdir(parents=True, exist_ok=True)
    return AuditLog(config.audit_path, config.audit_key, group_commit=config.group_commit)


def build(
    config: BrokerConfig,
    *,
    audit: Any = None,
    store: KeyStore | None = None,
    also_deliver: Callable[[Any], None] | None = None,
) -> tuple[KBSServer, Broker]:
    """Open the store and audit log, create the configured domains, and make the (unstarted) server."""
    import time

    if config.dev:
        warnings.warn("development key broker: see the banner; never use it with real data", UserWarning,
                      stacklevel=2)  # fmt: skip
    broker = Broker(config.settings, store=store if store is not None else open_store(config.store),
                    audit=audit if audit is not None else open_audit(config), trust=config.trust,
                    token_key=config.token_key, release_key=config.release_key, clock=time.time)  # fmt: skip
    for spec in config.domains:
        broker.create_domain(spec.owner, spec.name, spec.policy, spec.appraisal, spec.suite)
    feed = None
    if config.statement_key is not None:
        feed = StatementFeed()
        deliver = feed.publish if also_deliver is None else fan_out(feed.publish, also_deliver)
        broker.statement_listener = ClusterStatementIssuer(
            config.statement_key, config.settings.cluster_ids or (), deliver
        )
    limiter = None
    if config.rate_limit is not None:
        limiter = RateLimiter(rate=config.rate_limit[0], burst=config.rate_limit[1], clock=time.monotonic)
    try:
        server = KBSServer(broker, address=config.listen, tls=config.tls, owner_address=config.owner_listen,
                           limiter=limiter, secrets=config.secrets, max_workers=config.max_workers,
                           dev_owner=DEV_OWNER if config.dev else None, feed=feed)  # fmt: skip
    except BaseException:
        broker.close()
        raise
    return server, broker


def launch_data(config: BrokerConfig, port: int) -> dict[str, Any]:
    """What a development executor needs: address, pinned release key, simulated roots (dev only)."""
    from ray_confidential.testing.simulated import DevRootOfTrust

    if not config.dev:
        raise ValueError("launch data with simulated roots exists only for the development broker")
    host = config.listen.rpartition(":")[0]
    return {
        "target": f"{host}:{port}",
        "release_public_key": public_pem(config.release_key).decode(),
        "dev_roots": DevRootOfTrust.for_process().to_launch_data().hex(),
        "audience": config.settings.audience,
        "env": "dev",
    }


__all__ = ["DEV_BANNER", "BrokerConfig", "ConfigError", "DomainSpec", "build", "launch_data", "open_store",
           "private_pem", "public_pem"]  # fmt: skip
