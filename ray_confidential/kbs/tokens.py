"""Attestation tokens: ES256 JWTs bound to the executor's HPKE key (design.md section 5, step 4).

Claims: ``iss, aud, jti, iat, exp`` (lifetime <= 300 s), ``cnf.jkt`` (base64url SHA-256 of the
executor's HPKE key, :func:`ray_confidential.kbs.record.key_hash`), ``scope`` (routing | release),
``env`` (dev | prod), ``tee, measurement, tcb, node_id, pool, region, bundle_digest, cluster_id`` and
``domains`` (the domains a release token may unwrap for). Signed with joserfc.

    >>> from ray_confidential.crypto.hpke import generate_private_key
    >>> issuer = TokenIssuer(signing_key=new_signing_key(), issuer="kbs", audience="kbs", env="dev")
    >>> claims = TokenClaims.build(issuer="kbs", audience="kbs", env="dev", scope="release", now=1000,
    ...     ttl=60, cnf_key=generate_private_key().public_key(), tee="sev-snp", measurement="aa", tcb="x",
    ...     node_id="n1", pool="p", region="r", bundle_digest="bb", cluster_id="c", domains=("d",))
    >>> token = issuer.sign(claims)
    >>> issuer.verifier().verify(token, now=1001).scope
    'release'

What it does NOT check: revocation, domain policy or the key a request presents (the broker does).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final, Literal

from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet

from ray_confidential.crypto import hpke
from ray_confidential.errors import KeyReleaseDenied
from ray_confidential.kbs.record import key_hash

MAX_TTL: Final = 300
"""Longest token lifetime, seconds (design.md section 5)."""
LEEWAY: Final = 5
"""Clock skew tolerated on ``iat``, seconds."""
SCOPES: Final = ("routing", "release")
ENVS: Final = ("dev", "prod")
MAX_TOKEN_SIZE: Final = 8192

Scope = Literal["routing", "release"]


def jkt(public_key: hpke.PublicKey) -> str:
    """``cnf.jkt`` of an executor key: unpadded base64url of :func:`key_hash`."""
    return base64.urlsafe_b64encode(key_hash(public_key)).rstrip(b"=").decode()


def new_signing_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key (tokens, release records, audit)."""
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenClaims:
    """The claims of a verified (or about to be signed) token."""

    iss: str
    aud: str
    jti: str
    iat: int
    exp: int
    jkt: str
    scope: str
    env: str
    tee: str
    measurement: str
    tcb: str
    node_id: str
    pool: str
    region: str
    bundle_digest: str
    cluster_id: str
    domains: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        *,
        issuer: str,
        audience: str,
        env: str,
        scope: str,
        now: int,
        ttl: int,
        cnf_key: hpke.PublicKey,
        tee: str,
        measurement: str,
        tcb: str,
        node_id: str,
        pool: str,
        region: str,
        bundle_digest: str,
        cluster_id: str,
        domains: tuple[str, ...] = (),
    ) -> TokenClaims:
        """Claims for a fresh token with a random ``jti``."""
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"token ttl must be 1..{MAX_TTL} seconds, got {ttl}")
        return cls(
            iss=issuer,
            aud=audience,
            jti=base64.urlsafe_b64encode(os.urandom(18)).decode(),
            iat=now,
            exp=now + ttl,
            jkt=jkt(cnf_key),
            scope=scope,
            env=env,
            tee=tee,
            measurement=measurement,
            tcb=tcb,
            node_id=node_id,
            pool=pool,
            region=region,
            bundle_digest=bundle_digest,
            cluster_id=cluster_id,
            domains=tuple(domains),
        )

    def to_jwt_claims(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in _CLAIM_NAMES}  # flat fields: no asdict() deep copy
        d["cnf"] = {"jkt": d.pop("jkt")}
        d["domains"] = list(self.domains)
        return d

    @classmethod
    def from_jwt_claims(cls, d: Mapping[str, Any]) -> TokenClaims:
        """Raises KeyReleaseDenied if a claim is missing or has the wrong type."""
        try:
            cnf = d["cnf"]
            fields: dict[str, Any] = {"jkt": str(cnf["jkt"]), "domains": tuple(str(x) for x in d["domains"])}
            for name in ("iat", "exp"):
                if not isinstance(d[name], int) or isinstance(d[name], bool):
                    raise TypeError(name)
                fields[name] = d[name]
            for name in cls.__dataclass_fields__:
                if name not in fields:
                    if not isinstance(d[name], str):
                        raise TypeError(name)
                    fields[name] = d[name]
        except (KeyError, TypeError) as exc:
            raise KeyReleaseDenied(f"token: missing or malformed claim {exc}") from None
        return cls(**fields)


_CLAIM_NAMES: Final = tuple(f.name for f in fields(TokenClaims))


class TokenIssuer:
    """Signs tokens with the broker's token key (ES256) and publishes it as a JWKS.

    Args:
        signing_key: P-256 private key.
        issuer: the ``iss`` of every token (the broker's name).
        audience: the ``aud`` of every token (who accepts them: this broker's unwrap endpoint).
        env: ``dev`` or ``prod``: stamped into every token.
    """

    def __init__(
        self, *, signing_key: ec.EllipticCurvePrivateKey, issuer: str, audience: str, env: str
    ) -> None:
        if env not in ENVS:
            raise ValueError(f"env must be one of {ENVS}, got {env!r}")
        if not isinstance(signing_key.curve, ec.SECP256R1):
            raise ValueError("the token key must be a P-256 key (ES256)")
        self.issuer, self.audience, self.env = issuer, audience, env
        self._key = ECKey.import_key(signing_key)
        self.kid = self._key.thumbprint()

    def sign(self, claims: TokenClaims) -> str:
        return jwt.encode({"alg": "ES256", "typ": "JWT", "kid": self.kid}, claims.to_jwt_claims(), self._key)

    def jwks(self) -> dict[str, Any]:
        public = ECKey.import_key(self._key.as_dict(private=False))
        result: dict[str, Any] = dict(KeySet([public]).as_dict(private=False))
        return result

    def verifier(self, *, production: bool | None = None) -> TokenVerifier:
        return TokenVerifier(
            jwks=self.jwks(),
            issuer=self.issuer,
            audience=self.audience,
            production=self.env == "prod" if production is None else production,
        )


class TokenVerifier:
    """Verifies tokens: ES256 signature by a JWKS key, ``iss``, ``aud``, time window, lifetime, env.

    Verified claims are cached (at most ``cache_size``, least recently used first out) under the
    SHA-256 of the exact token string, so a token whose header, claims or signature differs in any
    byte is verified afresh. A cached entry lives at most until the token's ``exp``; the time checks
    (``exp``, ``iat``) run on every call. Revocation is not this class's job: the broker checks it on
    every request, cached token or not.

    Args:
        jwks: the token keys (``GetJWKS``).
        issuer / audience: what ``iss`` / ``aud`` must equal.
        production: refuse ``env=dev`` tokens (a production broker).
        cache_size: verified tokens kept (0 disables the cache).
    """

    def __init__(
        self,
        *,
        jwks: Mapping[str, Any],
        issuer: str,
        audience: str,
        production: bool,
        cache_size: int = 10_000,
    ) -> None:
        self._keys = KeySet.import_key_set(dict(jwks))  # type: ignore[arg-type]
        self.issuer, self.audience, self.production = issuer, audience, production
        self._cache: OrderedDict[bytes, TokenClaims] = OrderedDict()
        self._cache_size = max(0, cache_size)
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _check_static(self, claims: TokenClaims) -> None:
        """The checks that do not depend on the time (run before a token is cached)."""
        if claims.iss != self.issuer:
            raise KeyReleaseDenied(f"token: iss {claims.iss!r} is not {self.issuer!r}")
        if claims.aud != self.audience:
            raise KeyReleaseDenied(f"token: aud {claims.aud!r} is not {self.audience!r}")
        if not 0 < claims.exp - claims.iat <= MAX_TTL:
            raise KeyReleaseDenied(f"token: lifetime over {MAX_TTL} s")
        if claims.env not in ENVS or claims.scope not in SCOPES:
            raise KeyReleaseDenied("token: unknown env or scope")
        if self.production and claims.env != "prod":
            raise KeyReleaseDenied("token: env=dev token presented to a production broker")

    def _remember(self, digest: bytes, claims: TokenClaims) -> None:
        if not self._cache_size:
            return
        with self._lock:
            self._cache[digest] = claims
            self._cache.move_to_end(digest)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def remember(self, token: str, claims: TokenClaims) -> None:
        """Cache a token this broker has just signed with ``claims`` (so its first use skips the
        signature check). The static checks still run: a token this verifier would refuse is not kept.

        Raises:
            KeyReleaseDenied: the claims fail a static check.
        """
        self._check_static(claims)
        self._remember(hashlib.sha256(token.encode()).digest(), claims)

    def verify(self, token: str, *, now: int) -> TokenClaims:
        """Return the claims of a valid token.

        Raises:
            KeyReleaseDenied: bad signature, algorithm, issuer, audience, time, lifetime or env.
        """
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_SIZE:
            raise KeyReleaseDenied("token: missing or oversized")
        digest = hashlib.sha256(token.encode()).digest()
        with self._lock:
            claims = self._cache.get(digest)
            if claims is not None:
                if claims.exp <= now:  # past its lifetime: never served from the cache again
                    del self._cache[digest]
                else:
                    self._cache.move_to_end(digest)
        if claims is None:
            self.misses += 1
            try:
                decoded = jwt.decode(token, self._keys, algorithms=["ES256"])
            except (JoseError, ValueError, KeyError, json.JSONDecodeError) as exc:
                raise KeyReleaseDenied(f"token: signature or format invalid ({type(exc).__name__})") from None
            claims = TokenClaims.from_jwt_claims(decoded.claims)
            self._check_static(claims)
            if claims.exp > now:
                self._remember(digest, claims)
        else:
            self.hits += 1
        if claims.exp <= now:
            raise KeyReleaseDenied("token: expired")
        if claims.iat > now + LEEWAY:
            raise KeyReleaseDenied("token: issued in the future")
        return claims


__all__ = [
    "ENVS",
    "MAX_TTL",
    "SCOPES",
    "TokenClaims",
    "TokenIssuer",
    "TokenVerifier",
    "jkt",
    "new_signing_key",
]
