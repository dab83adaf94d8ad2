"""Trust registry: the nodes whose executors hold a valid routing token (design.md section 7).

The registry is mutated only by statements the key broker signs with its *statement key* (ECDSA
P-256). It is a routing table, not an authority: a node in it still gets keys only if the broker
releases them, and a node missing from it only loses traffic.

    >>> from cryptography.hazmat.primitives.asymmetric import ec
    >>> signer = StatementSigner(ec.generate_private_key(ec.SECP256R1()), registry_id="cluster-1")
    >>> registry = TrustRegistry(signer.verifier())
    >>> node = "ab" * 28
    >>> registry.submit(signer.admit(node_id=node, tee="sev-snp", pool="p", region="r",
    ...     measurement="00" * 48, claims={"gpu_cc": False}, expires_at=1060, now=1000), now=1000)
    >>> [e.pool for e in registry.entries(now=1001)]
    ['p']
    >>> registry.submit(signer.revoke(node_id=node, reason="tcb", now=1002), now=1002)
    >>> registry.entries(now=1003)
    ()

Statement encoding (version 1), documented in docs/placement.md:

* payload: canonical JSON (UTF-8, ASCII only, keys sorted, no spaces, integers only, no floats) of
  ``{"v": 1, "kind": "admit"|"revoke", "registry": <cluster id>, "node_id": <56 hex>, "seq": <int>,
  "iat": <unix s>, ...}``; admit adds ``tee, pool, region, measurement, claims, exp``; revoke adds
  ``reason``. A payload that is not byte-for-byte canonical is refused (one encoding per statement).
* signature: ECDSA P-256 / SHA-256 (DER) over ``b"ray-confidential/registry-statement/v1\\x00" || payload``.
* wire: ``0x01 || u32be len(payload) || payload || u16be len(sig) || sig``, lengths capped.

Ordering and replay: ``seq`` must grow strictly per node (the signer derives it from its clock in
microseconds, so a restarted broker needs no stored counter); a statement at or below the last
accepted ``seq`` for that node is a replay or reordering and is refused. ``iat`` must lie in
``[now - max_age, now + leeway]``, and the per-node high-water mark is kept until any older statement
would fail that window, so a revoked node's old admit cannot be replayed. An admit lives at most
:data:`MAX_ENTRY_LIFETIME` seconds (the routing token's lifetime).

Persistence: the accepted statements (current admits and live revocations) are written atomically
(temp file, fsync, rename) and re-verified on load, so a restarted registry refuses a tampered file
and can only be rolled back to statements the broker signed, each still bounded by its ``exp``.

What this module does NOT check: attestation (the broker did that before signing), residency (see
:meth:`scheduler.pools.NodePool.check_residency`), or liveness (callers pass ``alive``).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any, Final, Literal, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ray_confidential.errors import ConfidentialError
from scheduler.labels import TEE_KINDS, check_label_value, check_node_id

log = logging.getLogger(__name__)

VERSION: Final = 1
WIRE_VERSION: Final = b"\x01"
CONTEXT: Final = b"ray-confidential/registry-statement/v1\x00"
MAX_PAYLOAD: Final = 16 * 1024
MAX_SIGNATURE: Final = 80
"""DER ECDSA P-256 signatures are at most 72 bytes."""
MAX_ENTRY_LIFETIME: Final = 300
"""Longest ``exp - iat`` of an admit, seconds (routing-token lifetime, design.md section 5)."""
DEFAULT_MAX_AGE: Final = 300
DEFAULT_LEEWAY: Final = 5
MAX_CLAIMS: Final = 32
MAX_STR: Final = 512

Kind = Literal["admit", "revoke"]
ClaimValue = str | int | bool


class StatementRejected(ConfidentialError):
    """A registry mutation was refused: bad signature, wrong registry, replayed, stale or malformed."""


def _reject(msg: str) -> NoReturn:
    raise StatementRejected(msg)


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The one encoding of a statement body (sorted keys, no whitespace, ASCII)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 (hex) of the DER SubjectPublicKeyInfo: how operators name a pinned statement key."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return sha256(der).hexdigest()


@dataclass(frozen=True, slots=True)
class SignedStatement:
    """A statement payload and the broker's signature over it (safe to pass through Ray)."""

    payload: bytes
    signature: bytes

    def to_bytes(self) -> bytes:
        return (
            WIRE_VERSION
            + struct.pack(">I", len(self.payload))
            + self.payload
            + struct.pack(">H", len(self.signature))
            + self.signature
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedStatement:
        """Parse the wire form. Raises :class:`StatementRejected` on any framing error."""
        if not isinstance(data, (bytes, bytearray)):
            _reject(f"statement must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < 7 or data[:1] != WIRE_VERSION:
            _reject("statement: unknown version or truncated")
        (plen,) = struct.unpack(">I", data[1:5])
        if plen > MAX_PAYLOAD or len(data) < 5 + plen + 2:
            _reject("statement: payload length out of range")
        payload = data[5 : 5 + plen]
        (slen,) = struct.unpack(">H", data[5 + plen : 7 + plen])
        if slen > MAX_SIGNATURE or len(data) != 7 + plen + slen:
            _reject("statement: signature length out of range or trailing bytes")
        return cls(payload, data[7 + plen :])

    @property
    def digest(self) -> str:
        return sha256(self.to_bytes()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Statement:
    """A verified statement body."""

    kind: Kind
    registry: str
    node_id: str
    seq: int
    iat: int
    tee: str = ""
    pool: str = ""
    region: str = ""
    measurement: str = ""
    claims: Mapping[str, ClaimValue] = field(default_factory=dict)
    exp: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryEntry:
    """One node that holds a valid routing token, as the broker stated it.

    Attributes:
        node_id: Ray node id (hex), which Ray exposes as the ``ray.io/node-id`` label.
        tee, pool, region, measurement: from the broker's appraisal of the executor's evidence.
        claims: further broker claims (``gpu_cc``, ``chip_id``, ``nitro_module_id``, ``instance_id``,
            ``env``, ``tcb`` ...).
        expires_at: unix seconds; the entry is dropped after it.
        seq, issued_at: of the admit statement.
    """

    node_id: str
    tee: str
    pool: str
    region: str
    measurement: str
    claims: Mapping[str, ClaimValue]
    expires_at: int
    seq: int
    issued_at: int

    @classmethod
    def from_admit(cls, body: Statement) -> RegistryEntry:
        """The entry an admit statement's (verified) body describes."""
        return cls(
            node_id=body.node_id,
            tee=body.tee,
            pool=body.pool,
            region=body.region,
            measurement=body.measurement,
            claims=body.claims,
            expires_at=body.exp,
            seq=body.seq,
            issued_at=body.iat,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "tee": self.tee,
            "pool": self.pool,
            "region": self.region,
            "measurement": self.measurement,
            "claims": dict(self.claims),
            "expires_at": self.expires_at,
            "seq": self.seq,
            "issued_at": self.issued_at,
        }


def _int_field(body: Mapping[str, Any], key: str) -> int:
    v = body.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 1 << 63:
        _reject(f"statement: {key} must be a non-negative integer")
    return v


def _str_field(body: Mapping[str, Any], key: str, *, allow_empty: bool = False) -> str:
    v = body.get(key)
    if not isinstance(v, str) or len(v) > MAX_STR or (not v and not allow_empty):
        _reject(f"statement: {key} must be a string of at most {MAX_STR} characters")
    return v


def _parse_body(payload: bytes) -> Statement:
    try:
        body = json.loads(payload.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        _reject("statement: payload is not ASCII JSON")
    if not isinstance(body, dict):
        _reject("statement: payload is not a JSON object")
    try:
        canonical = canonical_json(body)
    except ValueError:
        _reject("statement: payload is not canonical JSON")
    if canonical != payload:
        _reject("statement: payload is not canonical JSON (one encoding per statement)")
    if body.get("v") != VERSION:
        _reject(f"statement: unsupported version {body.get('v')!r}")
    kind = body.get("kind")
    common = {"v", "kind", "registry", "node_id", "seq", "iat"}
    extra = {"admit": {"tee", "pool", "region", "measurement", "claims", "exp"}, "revoke": {"reason"}}
    if kind not in extra:
        _reject(f"statement: unknown kind {kind!r}")
    if set(body) != common | extra[kind]:
        _reject(f"statement: {kind} fields are {sorted(common | extra[kind])}, got {sorted(body)}")
    try:
        node_id = check_node_id(body.get("node_id"))  # type: ignore[arg-type]
    except ValueError as exc:
        _reject(f"statement: {exc}")
    base: dict[str, Any] = {
        "kind": kind,
        "registry": _str_field(body, "registry"),
        "node_id": node_id,
        "seq": _int_field(body, "seq"),
        "iat": _int_field(body, "iat"),
    }
    if kind == "revoke":
        return Statement(**base, reason=_str_field(body, "reason", allow_empty=True))
    claims = body["claims"]
    if not isinstance(claims, dict) or len(claims) > MAX_CLAIMS:
        _reject(f"statement: claims must be an object of at most {MAX_CLAIMS} entries")
    for k, v in claims.items():
        if len(k) > 64 or not isinstance(v, (str, int, bool)) or (isinstance(v, str) and len(v) > MAX_STR):
            _reject(f"statement: claim {k[:64]!r} must be a short string, integer or boolean")
    tee = _str_field(body, "tee")
    if tee not in TEE_KINDS:
        _reject(f"statement: tee {tee!r} is not one of {list(TEE_KINDS)}")
    try:
        pool = check_label_value(_str_field(body, "pool"), what="pool")
        region = check_label_value(_str_field(body, "region"), what="region")
    except ValueError as exc:
        _reject(f"statement: {exc}")
    return Statement(
        **base,
        tee=tee,
        pool=pool,
        region=region,
        measurement=_str_field(body, "measurement", allow_empty=True),
        claims=dict(claims),
        exp=_int_field(body, "exp"),
    )


class RegistryVerifier:
    """Verifies broker statements against the pinned statement public key of one registry.

    Args:
        public_key: the broker's statement key (pin it from configuration, never from Ray).
        registry_id: this registry's identity (the cluster id); statements for another are refused.
        max_age: oldest ``iat`` accepted on a live submission, seconds.
        leeway: clock skew tolerated on ``iat``, seconds.
    """

    def __init__(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        registry_id: str,
        max_age: int = DEFAULT_MAX_AGE,
        leeway: int = DEFAULT_LEEWAY,
    ) -> None:
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise TypeError("statement key must be an ECDSA P-256 public key")
        if not registry_id:
            raise ValueError("registry_id must name the cluster (e.g. its cluster id)")
        self.public_key = public_key
        self.registry_id = registry_id
        self.max_age = max_age
        self.leeway = leeway
        self.fingerprint = key_fingerprint(public_key)

    @classmethod
    def from_pem(cls, pem: bytes, *, registry_id: str, **kwargs: Any) -> RegistryVerifier:
        key = serialization.load_pem_public_key(pem)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise TypeError("statement key must be an ECDSA P-256 public key")
        return cls(key, registry_id=registry_id, **kwargs)

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verify(self, statement: SignedStatement, *, now: float, fresh: bool = True) -> Statement:
        """Check signature, encoding, registry and time; return the body.

        Args:
            fresh: check ``iat`` against ``now`` (live submissions). Reloading persisted statements
                passes ``False``: they are old by design and stay bounded by their ``exp``.

        Raises:
            StatementRejected: on the first failed check (signature first, before parsing).
        """
        if not isinstance(statement, SignedStatement):
            _reject(f"expected a SignedStatement, got {type(statement).__name__}")
        if len(statement.payload) > MAX_PAYLOAD or len(statement.signature) > MAX_SIGNATURE:
            _reject("statement: too large")
        try:
            self.public_key.verify(
                statement.signature, CONTEXT + statement.payload, ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            _reject("statement: signature does not verify under the pinned statement key")
        body = _parse_body(statement.payload)
        if body.registry != self.registry_id:
            _reject(f"statement: for registry {body.registry!r}, this is {self.registry_id!r}")
        if fresh and not (now - self.max_age <= body.iat <= now + self.leeway):
            _reject(
                f"statement: issued at {body.iat}, outside [{now - self.max_age:.0f}, {now + self.leeway:.0f}]"
            )
        if body.kind == "admit":
            if body.exp <= body.iat or body.exp - body.iat > MAX_ENTRY_LIFETIME:
                _reject(f"statement: admit lifetime must be in (0, {MAX_ENTRY_LIFETIME}] s")
        return body


class StatementSigner:
    """The broker's side: signs registry statements with the statement private key.

    The key never crosses a process boundary: pickling raises, the repr is redacted.

    Args:
        private_key: ECDSA P-256 statement key.
        registry_id: the registry (cluster id) statements are addressed to.
        clock: unix-seconds clock used when ``now`` is not passed.
    """

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey,
        *,
        registry_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            private_key.curve, ec.SECP256R1
        ):
            raise TypeError("statement key must be an ECDSA P-256 private key")
        self._key = private_key
        self.registry_id = registry_id
        self._clock = clock
        self._seq = 0
        self._lock = threading.Lock()

    def __reduce__(self) -> NoReturn:
        raise TypeError("StatementSigner holds the broker's statement key and cannot be pickled")

    def __repr__(self) -> str:
        return f"StatementSigner(registry_id={self.registry_id!r}, key=<redacted>)"

    def verifier(self, **kwargs: Any) -> RegistryVerifier:
        """A verifier pinned to this signer's public key."""
        return RegistryVerifier(self._key.public_key(), registry_id=self.registry_id, **kwargs)

    def public_pem(self) -> bytes:
        return self.verifier().public_pem()

    def _sign(self, body: dict[str, Any], now: float | None) -> SignedStatement:
        t = self._clock() if now is None else now
        with self._lock:
            # Microseconds since the epoch, strictly increasing: no stored counter across restarts.
            self._seq = max(self._seq + 1, int(t * 1_000_000))
            body = {**body, "v": VERSION, "registry": self.registry_id, "seq": self._seq, "iat": int(t)}
        payload = canonical_json(body)
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"statement of {len(payload)} bytes exceeds {MAX_PAYLOAD}; send fewer claims")
        return SignedStatement(payload, self._key.sign(CONTEXT + payload, ec.ECDSA(hashes.SHA256())))

    def admit(
        self,
        *,
        node_id: str,
        tee: str,
        pool: str,
        region: str,
        measurement: str,
        claims: Mapping[str, ClaimValue],
        expires_at: float,
        now: float | None = None,
    ) -> SignedStatement:
        """State that ``node_id``'s executor holds a routing token until ``expires_at``."""
        check_node_id(node_id)
        return self._sign(
            {
                "kind": "admit",
                "node_id": node_id,
                "tee": tee,
                "pool": pool,
                "region": region,
                "measurement": measurement,
                "claims": dict(claims),
                "exp": int(expires_at),
            },
            now,
        )

    def revoke(self, *, node_id: str, reason: str, now: float | None = None) -> SignedStatement:
        """State that ``node_id`` is no longer trusted for routing (its enclave actors should stop)."""
        check_node_id(node_id)
        return self._sign({"kind": "revoke", "node_id": node_id, "reason": reason}, now)


@dataclass(slots=True)
class _Mark:
    seq: int
    iat: int
    statement: SignedStatement


class TrustRegistry:
    """The set of routable nodes, mutated only through :meth:`submit` of broker-signed statements.

    Args:
        verifier: pinned statement key and registry id.
        path: file to persist to (atomically); loaded, and re-verified, at construction.
        clock: unix-seconds clock used when ``now`` is not passed.
    """

    def __init__(
        self,
        verifier: RegistryVerifier,
        *,
        path: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.verifier = verifier
        self.path = None if path is None else Path(path)
        self._clock = clock
        self._entries: dict[str, tuple[RegistryEntry, SignedStatement]] = {}
        self._marks: dict[str, _Mark] = {}  # per-node high-water mark (admits and revocations)
        self._lock = threading.RLock()
        self.rejected_on_load: list[str] = []
        if self.path is not None and self.path.exists():
            self._load()

    # -- mutation ------------------------------------------------------------------------------

    def submit(self, statement: SignedStatement | bytes, *, now: float | None = None) -> None:
        """Apply one broker-signed statement.

        Raises:
            StatementRejected: not signed by the pinned key, another registry, not canonical,
                stale, or a replay / reordering (``seq`` not above the node's last).
        """
        t = self._clock() if now is None else now
        if isinstance(statement, (bytes, bytearray)):
            statement = SignedStatement.from_bytes(bytes(statement))
        body = self.verifier.verify(statement, now=t)
        if body.kind == "admit" and body.exp <= t:
            _reject("statement: admit already expired")
        with self._lock:
            self._apply(body, statement)
            self._save(t)

    def _apply(self, body: Statement, statement: SignedStatement) -> None:
        mark = self._marks.get(body.node_id)
        if mark is not None and body.seq <= mark.seq:
            _reject(
                f"statement: seq {body.seq} for node {body.node_id[:12]} is not above {mark.seq} (replay)"
            )
        self._marks[body.node_id] = _Mark(body.seq, body.iat, statement)
        if body.kind == "revoke":
            self._entries.pop(body.node_id, None)
            log.info("registry: node %s revoked: %s", body.node_id, body.reason)
            return
        self._entries[body.node_id] = (RegistryEntry.from_admit(body), statement)

    def prune(self, *, now: float | None = None, alive: Collection[str] | None = None) -> list[str]:
        """Drop expired entries and, when ``alive`` is given, nodes not in it. Returns dropped ids."""
        t = self._clock() if now is None else now
        with self._lock:
            dropped = [
                nid
                for nid, (e, _) in self._entries.items()
                if e.expires_at <= t or (alive is not None and nid not in alive)
            ]
            for nid in dropped:
                del self._entries[nid]
            horizon = t - self.verifier.max_age - self.verifier.leeway
            stale = [nid for nid, m in self._marks.items() if m.iat < horizon and nid not in self._entries]
            for nid in stale:  # any older statement for these nodes now fails the iat window anyway
                del self._marks[nid]
            if dropped or stale:
                self._save(t)
        return dropped

    # -- queries -------------------------------------------------------------------------------

    def entries(
        self, *, now: float | None = None, alive: Collection[str] | None = None
    ) -> tuple[RegistryEntry, ...]:
        """Unexpired entries (and, when ``alive`` is given, only nodes in it), sorted by node id."""
        t = self._clock() if now is None else now
        with self._lock:
            return tuple(
                e
                for _, (e, _s) in sorted(self._entries.items())
                if e.expires_at > t and (alive is None or e.node_id in alive)
            )

    def statements(self) -> list[SignedStatement]:
        """The signed admits behind the current entries (callers re-verify them with their own pin)."""
        with self._lock:
            return [s for _, (_e, s) in sorted(self._entries.items())]

    # -- persistence ---------------------------------------------------------------------------

    def _save(self, now: float) -> None:
        if self.path is None:
            return
        keep = {id(s): s for _, s in self._entries.values()}
        for m in self._marks.values():
            keep.setdefault(id(m.statement), m.statement)
        doc = {
            "version": VERSION,
            "registry": self.verifier.registry_id,
            "key": self.verifier.fingerprint,
            "saved_at": int(now),
            "statements": [base64.b64encode(s.to_bytes()).decode() for s in keep.values()],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".registry-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _load(self) -> None:
        assert self.path is not None
        try:
            doc = json.loads(self.path.read_text())
            raw = [base64.b64decode(x, validate=True) for x in doc["statements"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StatementRejected(f"registry file {self.path} is unreadable: {exc}") from None
        if doc.get("registry") != self.verifier.registry_id:
            raise StatementRejected(f"registry file {self.path} is for registry {doc.get('registry')!r}")
        bodies = []
        for data in raw:
            try:
                st = SignedStatement.from_bytes(data)
                bodies.append((self.verifier.verify(st, now=0, fresh=False), st))
            except StatementRejected as exc:  # a forged or corrupted line is never applied
                log.warning("registry file %s: dropped a statement: %s", self.path, exc)
                self.rejected_on_load.append(str(exc))
        for body, st in sorted(bodies, key=lambda b: b[0].seq):
            try:
                self._apply(body, st)
            except StatementRejected:
                log.warning(
                    "registry file %s: skipped out-of-order statement for %s", self.path, body.node_id
                )
