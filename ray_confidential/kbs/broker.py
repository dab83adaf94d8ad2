"""The broker's decisions, without transport: challenge, attest, unwrap, owner operations.

``Broker`` is what the gRPC service (``service.py``) calls; every decision is written to the audit
log before the caller gets an answer, and every refusal is a :class:`Denied` carrying a coarse wire
code and the full reason (which only the log and the audit record see). design.md sections 4-5.

    broker = Broker(settings, store=MemoryStore(), audit=audit_log, trust=trust,
                    token_key=k1, release_key=k2, clock=time.time)   # doctest: +SKIP

Unwrap checks, in order (docs/kbs.md "Unwrap"): (1) token signature, issuer, audience, lifetime, env;
(2) release scope; (3) the presented key is the token's ``cnf`` key; (4) header parses; (5) the token
names the header's domain; (6) the domain exists; (7) the domain's release policy admits the token's
bundle, TEE, measurement, pool and region; (8) nothing about the token is revoked; (9) the key version
exists, is live and has the header's suite; (10) the DEK unwraps with info = header hash; (11) audit,
sign the record, seal the DEK to the ``cnf`` key with info = record. ``unwrap_many`` (and
``attest_and_unwrap``) runs (1)-(3) once and (4)-(10) for every object before it grants any: all or
nothing; then (11) per object, with one audit durability wait for all the grants. Under
``require_owner_signature`` a domain serves tokens and releases only while a live key version has its
owner's signature over the current policy, and a key version unwraps only while it has one itself
(docs/kbs.md "Owner signatures").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from ray_confidential.attestation.attest import attest
from ray_confidential.attestation.binding import Binding
from ray_confidential.attestation.claims import VerifiedClaims
from ray_confidential.attestation.evidence import Evidence
from ray_confidential.attestation.policy import AppraisalPolicy
from ray_confidential.attestation.trust import TrustConfig
from ray_confidential.crypto import hpke
from ray_confidential.domains import ANY, DomainPolicy
from ray_confidential.errors import ConfidentialError, DecryptionError, KeyReleaseDenied
from ray_confidential.kbs import record as rec_mod
from ray_confidential.kbs.challenges import ChallengeStore, IssuedChallenge
from ray_confidential.kbs.domains import (
    MEASUREMENT_CLAIM,
    DomainError,
    DomainRecord,
    DomainRegistry,
    KeyVersion,
    OwnerSignature,
)
from ray_confidential.kbs.revocation import RevocationList
from ray_confidential.kbs.store import KeyStore
from ray_confidential.kbs.tokens import TokenClaims, TokenIssuer, TokenVerifier, jkt
from ray_confidential.sealed.format import SealedHeader

log = logging.getLogger("ray_confidential.kbs")

REVOCATIONS_KEY: Final = "broker/revocations"
MAX_ATTEST_UNWRAPS: Final = 16
"""Objects one Attest may unwrap with its new token (docs/kbs.md "Attest with unwrap")."""
MAX_UNWRAP_ITEMS: Final = 64
"""Objects one UnwrapMany may unwrap (docs/kbs.md "Batched unwraps")."""
WIRE_CODES: Final = (
    "PERMISSION_DENIED",
    "NOT_FOUND",
    "INVALID_ARGUMENT",
    "RESOURCE_EXHAUSTED",
    "ALREADY_EXISTS",
)


class StatementListener(Protocol):
    """Issues trust-registry statements (``scheduler.statements.StatementIssuer``): an admit when a
    routing-scope token is issued, revokes when an admin revocation covers routed nodes."""

    def routing_granted(self, claims: TokenClaims) -> None: ...

    def revoked(self, kind: str, value: str, reason: str) -> None: ...


class Auditor(Protocol):
    """What the broker needs from the audit log (``ray_confidential.kbs.audit.AuditLog``): ``append``
    returns once the record is durable, and raises if it cannot be written (then nothing is released).
    An auditor may also have ``append_many(records, *, time)`` (consecutive records, durable once it
    returns, all or none: ``AuditLog.append_many``); without it the broker appends them one by one."""

    def append(self, event: str, **fields: Any) -> Any: ...


class Denied(ConfidentialError):
    """A refused request: ``code`` goes on the wire, ``reason`` only to the log and the audit record."""

    def __init__(self, code: str, reason: str) -> None:
        if code not in WIRE_CODES:
            raise ValueError(f"unknown wire code {code!r}")
        self.code, self.reason = code, reason
        super().__init__(f"{code}: {reason}")


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerSettings:
    """Broker behaviour (see docs/kbs.md "Configuration").

    Attributes:
        env: ``prod`` or ``dev``. A production broker refuses test roots, development domain
            policies, unpinned appraisal policies and ``env=dev`` tokens.
        issuer / audience: ``iss`` and ``aud`` of the tokens it issues and accepts.
        token_ttl: token lifetime, seconds (<= 300).
        challenge_ttl: challenge lifetime, seconds.
        cluster_ids: clusters whose executors may attest (None = any).
        admins: owner identities whose revocations apply to every domain.
        routing_policy: reference values for routing-scope tokens (None: routing tokens refused in
            production; any measurement under the trusted roots in development).
        require_owner_signature: refuse tokens, unwraps and releases for a domain key version without
            its owner's signature over its current policy (docs/kbs.md "Owner signatures"). ``kbs.yaml``
            turns it on unless it says otherwise; the development brokers leave it off.
    """

    env: str
    issuer: str
    audience: str
    token_ttl: int = 300
    challenge_ttl: float = 30.0
    cluster_ids: frozenset[str] | None = None
    admins: frozenset[str] = frozenset()
    routing_policy: AppraisalPolicy | None = None
    require_owner_signature: bool = False

    @property
    def production(self) -> bool:
        return self.env == "prod"


@dataclass(frozen=True, slots=True)
class KeyResponse:
    record: bytes
    signature: bytes
    sealed_key: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class AttestRequest:
    session_id: bytes
    nonce: bytes
    evidence: Evidence
    profile: str
    hpke_suite: str
    executor_public_key: bytes
    cluster_id: str
    bundle_digest: bytes
    scope: str
    node_id: str
    pool: str
    region: str
    domains: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Approved:
    """A release that passed every check: what the grant step needs (``key`` is the DEK or secret)."""

    release: rec_mod.ReleaseRecord
    to: hpke.PublicKey
    key: bytes = field(repr=False)
    ctx: dict[str, Any]


def tcb_label(claims: VerifiedClaims) -> str:
    """The token's ``tcb`` claim: the TCB status, with SEV-SNP's reported TCB components."""
    reported = claims.details.get("reported_tcb")
    if isinstance(reported, Mapping):
        parts = ",".join(f"{k}={reported[k]}" for k in sorted(reported))
        return f"{claims.tcb_status};{parts}"
    return claims.tcb_status


def check_production_domain(policy: DomainPolicy, appraisal: AppraisalPolicy) -> None:
    """Raises ValueError if a production broker must refuse this domain policy."""
    if policy.is_development:
        raise ValueError("development domain policy (UnsafeAnyCode or dev=true) on a production broker")
    if not appraisal.pinned:
        raise ValueError("domain appraisal policy has no measurement pin")


class Broker:
    """Decisions of one key broker (thread-safe).

    Args:
        settings: :class:`BrokerSettings`.
        store: durable key store (domains, revocations).
        audit: audit log; ``append`` must be durable when it returns.
        trust: allow-listed roots. A production broker refuses one that admits test roots.
        token_key / release_key: P-256 keys signing tokens / release records and descriptors.
        clock: current time, Unix seconds.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        store: KeyStore,
        audit: Auditor,
        trust: TrustConfig,
        token_key: ec.EllipticCurvePrivateKey,
        release_key: ec.EllipticCurvePrivateKey,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if settings.production and trust.allows_test_roots:
            raise ValueError("a production broker refuses test roots: use TrustConfig.production()")
        if settings.production and settings.routing_policy is not None and not settings.routing_policy.pinned:
            raise ValueError("a production broker's routing policy must pin measurements")
        self.settings, self._store, self._audit, self._trust = settings, store, audit, trust
        self._clock = clock
        self._release_key = release_key
        self.issuer = TokenIssuer(signing_key=token_key, issuer=settings.issuer, audience=settings.audience,
                                  env=settings.env)  # fmt: skip
        self.verifier: TokenVerifier = self.issuer.verifier()
        self.challenges = ChallengeStore(ttl=settings.challenge_ttl, clock=clock)
        self.domains = DomainRegistry(store)
        raw = store.get(REVOCATIONS_KEY)
        import json

        self.revocations = RevocationList.from_dict(json.loads(raw)) if raw else RevocationList()
        self._revoke_lock = threading.Lock()
        self.statement_listener: StatementListener | None = None
        """Told of routing tokens and revocations; issues trust-registry statements (docs/placement.md)."""
        self._appraisal_cache: dict[tuple[str, str], AppraisalPolicy] = {}
        self._appraisal_by_record: dict[int, tuple[DomainRecord, AppraisalPolicy]] = {}
        if settings.production:
            for name in self.domains.names():
                d = self.domains.get(name)
                assert d is not None
                try:
                    check_production_domain(d.policy, d.appraisal_policy())
                except ValueError as exc:
                    raise ValueError(f"stored domain {name!r}: {exc}") from None

    def close(self) -> None:
        """Close the store and the audit log (after the server stopped)."""
        for part in (self._audit, self._store):
            close = getattr(part, "close", None)
            if callable(close):
                close()

    @property
    def release_public_key(self) -> ec.EllipticCurvePublicKey:
        return self._release_key.public_key()

    def _now(self) -> int:
        return int(self._clock())

    def _record(self, event: str, **fields: Any) -> None:
        """Audit first: if the audit log cannot take the record, nothing is released."""
        self._audit.append(event, time=datetime.fromtimestamp(self._clock(), timezone.utc), **fields)

    def _record_many(self, records: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
        """:meth:`_record` of several records, durable together before it returns (one wait)."""
        when = datetime.fromtimestamp(self._clock(), timezone.utc)
        many = getattr(self._audit, "append_many", None)
        if len(records) > 1 and callable(many):
            many(records, time=when)
            return
        for event, fields in records:
            self._audit.append(event, time=when, **fields)

    def _deny(self, event: str, code: str, reason: str, **fields: Any) -> Denied:
        log.warning("%s denied (%s): %s %s", event, code, reason, fields)
        self._record(event, decision="deny", code=code, reason=reason, **fields)
        return Denied(code, reason)

    # -- executors ---------------------------------------------------------------------------------
    def challenge(self) -> IssuedChallenge:
        return self.challenges.issue()

    def attest(self, req: AttestRequest, *, client: str) -> tuple[str, TokenClaims]:
        """Appraise evidence for a fresh challenge and issue a token. Raises :class:`Denied`."""
        ctx = {"client": client, "scope": req.scope, "node_id": req.node_id, "cluster_id": req.cluster_id,
               "domains": list(req.domains), "tee": req.evidence.tee, "profile": req.profile}  # fmt: skip
        # (1) Single-use, unexpired nonce of this session (consumed whatever happens next).
        try:
            self.challenges.consume(req.nonce, req.session_id)
        except KeyReleaseDenied as exc:
            raise self._deny("attest", "PERMISSION_DENIED", str(exc), **ctx) from None
        # (2) Request shape.
        try:
            if req.scope not in ("routing", "release"):
                raise ValueError(f"scope must be routing or release, got {req.scope!r}")
            if req.scope == "release" and not req.domains:
                raise ValueError("a release-scope token must name its domains")
            if len(req.domains) > 16 or len(set(req.domains)) != len(req.domains):
                raise ValueError("at most 16 distinct domains per token")
            for field, value in (("node_id", req.node_id), ("pool", req.pool), ("region", req.region)):
                if not 0 < len(value) <= 128:
                    raise ValueError(f"{field} must be 1..128 characters")
            cnf = hpke.PublicKey(req.hpke_suite, req.executor_public_key)
            binding = Binding(nonce=req.nonce, executor_public_key=req.executor_public_key,
                              hpke_suite=req.hpke_suite, cluster_id=req.cluster_id,
                              bundle_digest=req.bundle_digest)  # fmt: skip
        except (ValueError, TypeError) as exc:
            raise self._deny("attest", "INVALID_ARGUMENT", str(exc), **ctx) from None
        if self.settings.cluster_ids is not None and req.cluster_id not in self.settings.cluster_ids:
            raise self._deny("attest", "PERMISSION_DENIED", f"cluster {req.cluster_id!r} not admitted", **ctx)
        # (3) Reference values: each named domain's, or the routing policy.
        policies: list[tuple[str, AppraisalPolicy]] = []
        if req.scope == "release":
            for name in req.domains:
                d = self.domains.get(name)
                if d is None:
                    raise self._deny("attest", "NOT_FOUND", f"unknown domain {name!r}", **ctx)
                try:
                    self._check_release_policy(d, tee=req.evidence.tee, bundle=req.bundle_digest.hex(),
                                               pool=req.pool, region=req.region, measurement=None)  # fmt: skip
                except KeyReleaseDenied as exc:
                    raise self._deny("attest", "PERMISSION_DENIED", str(exc), **ctx) from None
                self._require_owner_signature("attest", d, None, ctx)
                policies.append((f"domain:{name}", self._appraisal(d)))
        else:
            routing = self.settings.routing_policy
            if routing is None:
                if self.settings.production:
                    raise self._deny("attest", "PERMISSION_DENIED", "no routing policy configured", **ctx)
                routing = AppraisalPolicy.inspection()
            policies.append(("routing", routing))
        # (4) Verify, check the binding, validate: every policy must admit the evidence.
        now_dt = datetime.fromtimestamp(self._clock(), timezone.utc)
        claims: VerifiedClaims | None = None
        for label, policy in policies:
            try:
                claims = attest(req.evidence, profile=req.profile, policy=policy, trust=self._trust,
                                expected_binding=binding, now=now_dt)  # fmt: skip
            except (ConfidentialError, ValueError, NotImplementedError) as exc:
                raise self._deny("attest", "PERMISSION_DENIED", f"{label}: {type(exc).__name__}: {exc}",
                                 **ctx) from None  # fmt: skip
        assert claims is not None
        measurement = bytes(claims.measurements.get(MEASUREMENT_CLAIM.get(claims.tee, ""), b"")).hex()
        tcb = tcb_label(claims)
        try:
            self.revocations.check(owner=None, node=req.node_id, measurement=measurement, tcb=tcb, token="",
                                   bundle=req.bundle_digest.hex())  # fmt: skip
        except KeyReleaseDenied as exc:
            raise self._deny("attest", "PERMISSION_DENIED", str(exc), **ctx) from None
        # (5) Issue, audit, answer.
        claims_out = TokenClaims.build(
            issuer=self.settings.issuer, audience=self.settings.audience, env=self.settings.env,
            scope=req.scope, now=self._now(), ttl=self.settings.token_ttl, cnf_key=cnf, tee=claims.tee,
            measurement=measurement, tcb=tcb, node_id=req.node_id, pool=req.pool, region=req.region,
            bundle_digest=req.bundle_digest.hex(), cluster_id=req.cluster_id, domains=tuple(req.domains),
        )  # fmt: skip
        token = self.issuer.sign(claims_out)
        self._record("attest", decision="grant", token_id=claims_out.jti, measurement=measurement, tcb=tcb,
                     exp=claims_out.exp, **ctx)  # fmt: skip
        self.verifier.remember(token, claims_out)  # its first Unwrap skips re-verifying our own signature
        if req.scope == "routing" and self.statement_listener is not None:
            try:  # routing only: a failure here never changes the attestation decision
                self.statement_listener.routing_granted(claims_out)
            except Exception:
                log.exception("registry statement for node %s not issued", req.node_id)
        return token, claims_out

    def attest_and_unwrap(
        self, req: AttestRequest, *, client: str, unwrap: Sequence[tuple[bytes, bytes]]
    ) -> tuple[str, TokenClaims, list[KeyResponse]]:
        """:meth:`attest`, then :meth:`unwrap_many` of the ``(header, request_nonce)`` items with the
        new token and the attested key: every Unwrap check runs and is audited per object, as if the
        executor had sent them itself; it only saves that round trip. Raises :class:`Denied` if the
        attestation or any object is refused (the token is then not returned, nor any key)."""
        if len(unwrap) > MAX_ATTEST_UNWRAPS:
            raise self._deny("attest", "INVALID_ARGUMENT", f"more than {MAX_ATTEST_UNWRAPS} objects to unwrap",
                             client=client, scope=req.scope, node_id=req.node_id)  # fmt: skip
        token, claims = self.attest(req, client=client)
        if not unwrap:
            return token, claims, []
        keys = self.unwrap_many(token=token, items=unwrap, hpke_suite=req.hpke_suite,
                                executor_public_key=req.executor_public_key, client=client)  # fmt: skip
        return token, claims, keys

    def _appraisal(self, d: DomainRecord) -> AppraisalPolicy:
        """The domain's appraisal policy, built once per content. Records are immutable, so the same
        record object skips even the content hashes (two canonical-JSON SHA-256s per attestation)."""
        hit = self._appraisal_by_record.get(id(d))
        if hit is not None and hit[0] is d:
            return hit[1]
        key = (d.name, d.appraisal_hash() + d.policy.policy_hash())
        cached = self._appraisal_cache.get(key)
        if cached is None:
            cached = self._appraisal_cache[key] = d.appraisal_policy()
        if len(self._appraisal_by_record) >= 4096:
            self._appraisal_by_record.clear()
        self._appraisal_by_record[id(d)] = (d, cached)
        return cached

    def _check_release_policy(
        self, d: DomainRecord, *, tee: str, bundle: str, pool: str, region: str, measurement: str | None
    ) -> None:
        p = d.policy
        if ANY not in p.bundles and bundle.lower() not in {b.lower() for b in p.bundles}:
            raise KeyReleaseDenied(f"bundle {bundle} is not approved by domain {d.name!r}")
        if ANY not in p.tee_kinds and tee not in p.tee_kinds:
            raise KeyReleaseDenied(f"TEE kind {tee!r} is not allowed by domain {d.name!r}")
        if ANY not in p.pools and pool not in p.pools:
            raise KeyReleaseDenied(f"pool {pool!r} is not allowed by domain {d.name!r}")
        if ANY not in p.regions and region not in p.regions:
            raise KeyReleaseDenied(f"region {region!r} is not allowed by domain {d.name!r}")
        if measurement is not None and p.measurements and tee in p.measurements:
            if measurement.lower() not in {m.lower() for m in p.measurements[tee]}:
                raise KeyReleaseDenied(f"measurement {measurement} is not pinned by domain {d.name!r}")

    def _require_owner_signature(
        self, event: str, d: DomainRecord, version: int | None, ctx: dict[str, Any]
    ) -> None:
        """Under ``require_owner_signature``: key ``version`` of ``d`` (None: some live version, i.e. the
        current policy) must carry its owner's signature over the current policy (the registry keeps
        only signatures that verify over it)."""
        if not self.settings.require_owner_signature:
            return
        if version is None and not self.domains.policy_signed(d):
            raise self._deny(event, "PERMISSION_DENIED", f"domain {d.name!r}: no live key version has an owner "
                             "signature over its current policy (require_owner_signature)", **ctx)  # fmt: skip
        if version is not None and not self.domains.signed(d, version):
            raise self._deny(event, "PERMISSION_DENIED", f"domain {d.name!r}: key version {version} has no owner "
                             "signature over its current policy (require_owner_signature)", **ctx)  # fmt: skip

    def _authorize_token(
        self, *, token: str, hpke_suite: str, executor_public_key: bytes, ctx: dict[str, Any], event: str
    ) -> tuple[TokenClaims, hpke.PublicKey]:
        """Checks (1)-(3) of the module docstring; adds the token's fields to ``ctx``."""
        try:
            claims = self.verifier.verify(token, now=self._now())
        except KeyReleaseDenied as exc:
            raise self._deny(event, "PERMISSION_DENIED", str(exc), **ctx) from None
        ctx.update(token_id=claims.jti, node_id=claims.node_id, env=claims.env, scope=claims.scope)
        if claims.scope != "release":
            raise self._deny(
                event, "PERMISSION_DENIED", f"{claims.scope}-scope token presented for release", **ctx
            )
        try:
            presented = hpke.PublicKey(hpke_suite, executor_public_key)
        except (ValueError, TypeError) as exc:
            raise self._deny(event, "INVALID_ARGUMENT", str(exc), **ctx) from None
        if not hmac.compare_digest(jkt(presented), claims.jkt):
            raise self._deny(event, "PERMISSION_DENIED", "presented key is not the token's cnf key", **ctx)
        return claims, presented

    def _authorize_domain(
        self, claims: TokenClaims, domain: str, *, request_nonce: bytes, ctx: dict[str, Any], event: str,
        checked: dict[str, DomainRecord] | None = None,
    ) -> DomainRecord:  # fmt: skip
        """The request nonce's size, then checks (5)-(8) of the module docstring for ``domain``.
        ``checked``: domains that passed (5)-(8) for these claims earlier in the same request (the
        checks depend only on the claims and the domain record, which is then reused)."""
        if len(request_nonce) != rec_mod.NONCE_SIZE:
            raise self._deny(event, "INVALID_ARGUMENT", "request nonce must be 32 bytes", **ctx)
        if checked is not None and domain in checked:
            return checked[domain]
        if domain not in claims.domains:
            raise self._deny(event, "PERMISSION_DENIED", f"token does not name domain {domain!r}", **ctx)
        d = self.domains.get(domain)
        if d is None:
            raise self._deny(event, "NOT_FOUND", f"unknown domain {domain!r}", **ctx)
        try:
            self._check_release_policy(d, tee=claims.tee, bundle=claims.bundle_digest, pool=claims.pool,
                                       region=claims.region, measurement=claims.measurement)  # fmt: skip
            self.revocations.check(owner=d.owner, node=claims.node_id, measurement=claims.measurement,
                                   tcb=claims.tcb, token=claims.jti, bundle=claims.bundle_digest)  # fmt: skip
        except KeyReleaseDenied as exc:
            raise self._deny(event, "PERMISSION_DENIED", str(exc), **ctx) from None
        if checked is not None:
            checked[domain] = d
        return d

    def _parse_header(self, header: bytes, ctx: dict[str, Any]) -> SealedHeader:
        """Check (4); adds the object's fields to ``ctx`` (so a later refusal names the object)."""
        try:
            parsed = SealedHeader.parse(header)
        except DecryptionError:
            raise self._deny("unwrap", "INVALID_ARGUMENT", "sealed header does not parse", **ctx) from None
        ctx.update(domain=parsed.domain, key_version=parsed.key_version, object_id=parsed.object_id.hex(),
                   header_hash=parsed.header_hash.hex())  # fmt: skip
        return parsed

    def _check_unwrap(
        self, claims: TokenClaims, presented: hpke.PublicKey, parsed: SealedHeader, request_nonce: bytes,
        ctx: dict[str, Any], checked: dict[str, DomainRecord] | None = None,
    ) -> _Approved:  # fmt: skip
        """Checks (5)-(10) of one object, for a token that passed (1)-(3): what :meth:`_grant` needs."""
        d = self._authorize_domain(claims, parsed.domain, request_nonce=request_nonce, ctx=ctx, event="unwrap",
                                   checked=checked)  # fmt: skip
        # (9) The version exists, is live and matches the header's suite.
        version = d.version(parsed.key_version)
        if version is None:
            raise self._deny("unwrap", "NOT_FOUND", f"no key version {parsed.key_version}", **ctx)
        if version.retired:
            raise self._deny(
                "unwrap", "PERMISSION_DENIED", f"key version {parsed.key_version} is retired", **ctx
            )
        if version.suite != parsed.suite:
            raise self._deny(
                "unwrap", "PERMISSION_DENIED", "header suite differs from the key version's", **ctx
            )
        self._require_owner_signature("unwrap", d, version.version, ctx)
        # (10) The domain wrap opens only with info = this header's hash.
        try:
            dek = self.domains.private_key(d, version).unwrap(parsed.wrapped_dek, info=parsed.header_hash)
        except DecryptionError:
            raise self._deny("unwrap", "PERMISSION_DENIED",
                             "wrapped DEK does not open under this version and header (altered header, "
                             "version downgrade or foreign object)", **ctx) from None  # fmt: skip
        release = rec_mod.ReleaseRecord(domain=d.name, key_version=version.version, token_id=claims.jti,
                                        key_hash=rec_mod.key_hash(presented), header_hash=parsed.header_hash,
                                        request_nonce=bytes(request_nonce), iat=self._now())  # fmt: skip
        return _Approved(release=release, to=presented, key=dek, ctx=ctx)

    def unwrap(
        self, *, token: str, header: bytes, request_nonce: bytes, hpke_suite: str, executor_public_key: bytes,
        client: str,
    ) -> KeyResponse:  # fmt: skip
        """Release one object's DEK, sealed to the token's key. Raises :class:`Denied`."""
        ctx: dict[str, Any] = {"client": client}
        parsed = self._parse_header(header, ctx)
        claims, presented = self._authorize_token(token=token, hpke_suite=hpke_suite,
                                                  executor_public_key=executor_public_key, ctx=ctx, event="unwrap")  # fmt: skip
        # (11) Audit, then sign and seal.
        return self._grant("unwrap", [self._check_unwrap(claims, presented, parsed, request_nonce, ctx)])[0]

    def unwrap_many(
        self, *, token: str, items: Sequence[tuple[bytes, bytes]], hpke_suite: str, executor_public_key: bytes,
        client: str,
    ) -> list[KeyResponse]:  # fmt: skip
        """Release the DEKs of up to :data:`MAX_UNWRAP_ITEMS` objects, each ``(header bytes, request
        nonce)``, sealed to the token's key: one response per item, in order, each exactly as
        :meth:`unwrap` answers it. All or nothing: every item runs every check of :meth:`unwrap`
        (the token's once per request; the domain's policy and revocations once per domain) before
        any grant; one refusal denies the whole request (audited as an ``unwrap`` denial naming that
        item) and no key is released. Request nonces must differ between items. Then all grants are
        audited and made durable together, and each key is signed and sealed as :meth:`unwrap` does.

        Raises:
            Denied: no items or more than :data:`MAX_UNWRAP_ITEMS`, a repeated request nonce, or any
                check of any item.
        """
        base: dict[str, Any] = {"client": client, "items": len(items)}
        if not 0 < len(items) <= MAX_UNWRAP_ITEMS:
            raise self._deny("unwrap", "INVALID_ARGUMENT", f"{len(items)} objects to unwrap: 1 to "
                             f"{MAX_UNWRAP_ITEMS} per request", **base)  # fmt: skip
        claims, presented = self._authorize_token(token=token, hpke_suite=hpke_suite,
                                                  executor_public_key=executor_public_key, ctx=base, event="unwrap")  # fmt: skip
        checked: dict[str, DomainRecord] = {}
        nonces: set[bytes] = set()
        approved: list[_Approved] = []
        for i, (header, request_nonce) in enumerate(items):
            ctx = {**base, "item": i}
            parsed = self._parse_header(header, ctx)
            if bytes(request_nonce) in nonces:
                raise self._deny(
                    "unwrap", "INVALID_ARGUMENT", "request nonce repeats an earlier item's", **ctx
                )
            nonces.add(bytes(request_nonce))
            approved.append(self._check_unwrap(claims, presented, parsed, request_nonce, ctx, checked))
        return self._grant("unwrap", approved)

    def release(
        self, *, token: str, domain: str, name: str, request_nonce: bytes, hpke_suite: str,
        executor_public_key: bytes, client: str, secrets: Mapping[tuple[str, str], bytes],
    ) -> KeyResponse:  # fmt: skip
        """Release a named secret of ``domain`` (configured in ``secrets``), under the same checks."""
        ctx: dict[str, Any] = {"client": client, "domain": domain, "secret": name}
        claims, presented = self._authorize_token(token=token, hpke_suite=hpke_suite,
                                                  executor_public_key=executor_public_key, ctx=ctx, event="release")  # fmt: skip
        d = self._authorize_domain(claims, domain, request_nonce=request_nonce, ctx=ctx, event="release")
        self._require_owner_signature("release", d, None, ctx)
        value = secrets.get((domain, name))
        if value is None:
            raise self._deny("release", "NOT_FOUND", f"domain {domain!r} has no secret {name!r}", **ctx)
        release = rec_mod.ReleaseRecord(domain=d.name, key_version=0, token_id=str(ctx["token_id"]),
                                        key_hash=rec_mod.key_hash(presented),
                                        header_hash=rec_mod.secret_subject(name),
                                        request_nonce=bytes(request_nonce), iat=self._now())  # fmt: skip
        return self._grant("release", [_Approved(release=release, to=presented, key=value, ctx=ctx)])[0]

    def _grant(self, event: str, approved: Sequence[_Approved]) -> list[KeyResponse]:
        """Audit every grant (durable together), then per grant sign its release record and seal its
        key to the executor key with ``info`` = the record."""
        bodies = [a.release.encode() for a in approved]
        self._record_many([(event, {"decision": "grant", "key_hash": a.release.key_hash.hex(),
                                    "request_nonce": a.release.request_nonce.hex(), **a.ctx})
                           for a in approved])  # fmt: skip
        return [
            KeyResponse(body, rec_mod.sign(self._release_key, body), hpke.wrap(a.to, a.key, info=body))
            for a, body in zip(approved, bodies, strict=True)
        ]

    # -- public reads ------------------------------------------------------------------------------
    def _descriptor_version(self, name: str, version: int) -> tuple[DomainRecord, KeyVersion]:
        d = self.domains.get(name)
        if d is None:
            raise Denied("NOT_FOUND", f"unknown domain {name!r}")
        number = version or d.live_version
        v = d.version(number) if number else None
        if v is None:
            raise Denied("NOT_FOUND", f"domain {name!r} has no key version {version or '(live)'}")
        return d, v

    def descriptor(self, name: str, version: int = 0) -> tuple[bytes, bytes]:
        """(canonical descriptor JSON, release-key signature). Raises :class:`Denied` (NOT_FOUND)."""
        body, sig, _ = self.signed_descriptor(name, version)
        return body, sig

    def signed_descriptor(self, name: str, version: int = 0) -> tuple[bytes, bytes, OwnerSignature | None]:
        """:meth:`descriptor` and, from the same record, the owner's signature of that version's
        statement under the current policy (None if the owner has not signed it)."""
        d, v = self._descriptor_version(name, version)
        body = d.descriptor_bytes(v.version, self.domains.public_key(d, v), self.settings.issuer)
        return body, rec_mod.sign(self._release_key, body), d.owner_signatures.get(v.version)

    def jwks(self) -> dict[str, Any]:
        return self.issuer.jwks()

    # -- owners ------------------------------------------------------------------------------------
    def _parse_policy(self, policy: Mapping[str, Any], appraisal: Mapping[str, Any] | None) -> DomainPolicy:
        try:
            parsed = DomainPolicy.from_dict(policy)
            probe = DomainRecord(
                name="probe", owner="", policy=parsed, appraisal=appraisal, versions=(), created=0
            )
            compiled = probe.appraisal_policy()
            if self.settings.production:
                check_production_domain(parsed, compiled)
        except (ValueError, TypeError, KeyError) as exc:
            raise Denied("INVALID_ARGUMENT", f"policy refused: {exc}") from None
        return parsed

    def _owner_op(
        self, event: str, owner: str | None, fields: dict[str, Any], op: Callable[[str], Any]
    ) -> Any:
        if not owner:
            raise self._deny(
                event, "PERMISSION_DENIED", "owner operation without a client certificate", **fields
            )
        fields = {"owner": owner, **fields}
        try:
            result = op(owner)
        except Denied as exc:
            raise self._deny(event, exc.code, exc.reason, **fields) from None
        except DomainError as exc:
            raise self._deny(event, exc.code, str(exc), **fields) from None
        return result

    def create_domain(
        self, owner: str | None, name: str, policy: Mapping[str, Any], appraisal: Mapping[str, Any] | None,
        suite: str = hpke.DEFAULT_SUITE,
    ) -> DomainRecord:  # fmt: skip
        def op(who: str) -> DomainRecord:
            parsed = self._parse_policy(policy, appraisal)
            d = self.domains.create(owner=who, name=name, policy=parsed, appraisal=appraisal, suite=suite,
                                    now=self._now())  # fmt: skip
            self._record("create_domain", decision="grant", owner=who, domain=name,
                         policy_hash=parsed.policy_hash(), appraisal_hash=d.appraisal_hash())  # fmt: skip
            return d

        result: DomainRecord = self._owner_op("create_domain", owner, {"domain": name}, op)
        return result

    def update_policy(
        self, owner: str | None, name: str, policy: Mapping[str, Any], appraisal: Mapping[str, Any] | None
    ) -> DomainRecord:
        def op(who: str) -> DomainRecord:
            parsed = self._parse_policy(policy, appraisal)
            old, new = self.domains.update_policy(owner=who, name=name, policy=parsed, appraisal=appraisal)
            self._record("update_policy", decision="grant", owner=who, domain=name,
                         old_policy_hash=old.policy.policy_hash(), policy_hash=parsed.policy_hash(),
                         old_appraisal_hash=old.appraisal_hash(), appraisal_hash=new.appraisal_hash())  # fmt: skip
            return new

        result: DomainRecord = self._owner_op("update_policy", owner, {"domain": name}, op)
        return result

    def rotate(self, owner: str | None, name: str, suite: str | None = None) -> DomainRecord:
        def op(who: str) -> DomainRecord:
            d = self.domains.rotate(owner=who, name=name, suite=suite)
            self._record("rotate", decision="grant", owner=who, domain=name, version=d.versions[-1].version)
            return d

        result: DomainRecord = self._owner_op("rotate", owner, {"domain": name}, op)
        return result

    def retire(self, owner: str | None, name: str, version: int) -> DomainRecord:
        def op(who: str) -> DomainRecord:
            d = self.domains.retire(owner=who, name=name, version=version)
            self._record("retire", decision="grant", owner=who, domain=name, version=version)
            return d

        result: DomainRecord = self._owner_op("retire", owner, {"domain": name, "version": version}, op)
        return result

    def sign_descriptor(
        self, owner: str | None, name: str, version: int, signature: bytes, certificate: bytes | None
    ) -> DomainRecord:
        """Keep the owner's signature of key version ``version`` (0: the live one) of ``name``, made with
        the key of ``certificate`` (DER of the caller's verified client certificate) over the version's
        owner statement (docs/kbs.md "Owner signatures"). Audited; raises :class:`Denied`."""

        def op(who: str) -> DomainRecord:
            if certificate is None:
                raise Denied("PERMISSION_DENIED", "sign_descriptor needs the owner's client certificate")
            d = self.domains.get(name)
            number = version or (d.live_version if d is not None else None) or 0
            new = self.domains.sign(owner=who, name=name, version=number, signature=signature,
                                    certificate=certificate)  # fmt: skip
            self._record("sign_descriptor", decision="grant", owner=who, domain=name, version=number,
                         policy_hash=new.policy.policy_hash(), appraisal_hash=new.appraisal_hash(),
                         certificate_sha256=hashlib.sha256(certificate).hexdigest())  # fmt: skip
            return new

        result: DomainRecord = self._owner_op(
            "sign_descriptor", owner, {"domain": name, "version": version}, op
        )
        return result

    def revoke(self, owner: str | None, kind: str, value: str, reason: str = "") -> int:
        """Revoke for ``owner``'s domains (for every domain when ``owner`` is an admin); returns the epoch."""

        def op(who: str) -> int:
            scope = None if who in self.settings.admins else who
            with self._revoke_lock:
                try:
                    epoch = self.revocations.revoke(kind, value, owner=scope)
                except ValueError as exc:
                    raise Denied("INVALID_ARGUMENT", str(exc)) from None
                import json

                self._store.put(REVOCATIONS_KEY, json.dumps(self.revocations.to_dict()).encode())
                self._record("revoke", decision="grant", owner=who, kind=kind, value=value, reason=reason,
                             scope="global" if scope is None else "owner", epoch=epoch)  # fmt: skip
            if scope is None and self.statement_listener is not None:
                try:
                    self.statement_listener.revoked(kind, value, reason)
                except Exception:
                    log.exception("registry revoke statement for %s=%s not issued", kind, value)
            return epoch

        result: int = self._owner_op("revoke", owner, {"kind": kind, "value": value}, op)
        return result

    def audit_checkpoint(self, owner: str | None) -> bytes:
        """A signed checkpoint of the audit log's durable head, for any owner (mutual TLS) to keep
        elsewhere (docs/audit-log.md "Checkpoints"). The fetch is itself audited, and the checkpoint
        covers that record. Raises :class:`Denied` without an owner, or if the log makes none."""

        def op(who: str) -> bytes:
            checkpoint = getattr(self._audit, "checkpoint", None)
            if not callable(checkpoint):
                raise Denied("NOT_FOUND", "this broker's audit log makes no checkpoints")
            self._record("audit_checkpoint", decision="grant", owner=who)
            data: bytes = checkpoint()
            return data

        result: bytes = self._owner_op("audit_checkpoint", owner, {}, op)
        return result

    @property
    def revocation_epoch(self) -> int:
        return self.revocations.epoch


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


__all__ = [
    "MAX_ATTEST_UNWRAPS",
    "MAX_UNWRAP_ITEMS",
    "AttestRequest",
    "Auditor",
    "Broker",
    "BrokerSettings",
    "Denied",
    "KeyResponse",
    "StatementListener",
    "tcb_label",
]
