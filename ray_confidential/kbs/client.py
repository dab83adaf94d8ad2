"""Python client of the key broker, with the broker's TLS CA and release key pinned at construction.

    client = KBSClient("kbs.example:443", release_public_key=RELEASE_PEM, ca_cert=CA_PEM)  # doctest: +SKIP
    challenge = client.challenge()
    token = client.attest(challenge, tee.evidence(binding), profile="snp-direct", executor_key=key,
                          cluster_id="c", bundle_digest=digest, scope="release", node_id="n1",
                          pool="p", region="r", domains=["hospital"])
    dek = client.unwrap(token, header_bytes, key)
    deks = client.unwrap_many(token, [header_a, header_b], key)   # one call, all or nothing

The release key and CA come from the image or launch data, never from the broker or runtime_env
(design.md section 5, step 5). :meth:`KBSClient.unwrap` accepts a response only if it is signed by the
pinned release key and its record names this request's fresh nonce, the header's domain, version
and hash, the token and the executor key; the DEK is then opened with ``info`` = that record.

Owners: a client built with an owner's client certificate and key signs each key version's owner
statement after ``create_domain``, ``update_policy`` and ``rotate`` (``SignDescriptor``), having
checked that the descriptor names itself and the policy it sent. ``descriptor(name, owner_ca=PEM)``
accepts a descriptor only with a valid owner signature by a certificate of that CA naming the
descriptor's owner (docs/kbs.md "Owner signatures").

Retries: only on UNAVAILABLE, with exponential backoff, ``retries`` times; after that the call fails
closed with :class:`BrokerUnavailableError` (a :class:`~ray_confidential.errors.KeyReleaseDenied`).
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ray_confidential.attestation.binding import Binding
from ray_confidential.attestation.evidence import Evidence
from ray_confidential.crypto import hpke
from ray_confidential.domains import DomainDescriptor, DomainPolicy
from ray_confidential.errors import DecryptionError, KeyReleaseDenied
from ray_confidential.kbs import owner_sig
from ray_confidential.kbs import record as rec_mod
from ray_confidential.kbs.broker import MAX_UNWRAP_ITEMS
from ray_confidential.kbs.domains import appraisal_hash
from ray_confidential.kbs.proto import kbs_pb2, kbs_pb2_grpc
from ray_confidential.kbs.server import CHANNEL_OPTIONS, is_loopback, split_address
from ray_confidential.kbs.tokens import TokenClaims, jkt
from ray_confidential.sealed.format import SealedHeader

BACKOFF_BASE: Final = 0.1
BACKOFF_MAX: Final = 2.0
_CHANNEL_OPTIONS: Final = (*CHANNEL_OPTIONS, ("grpc.enable_retries", 0))
"""gRPC's own (transparent) retries are off: :meth:`KBSClient._call` retries UNAVAILABLE itself, with
a bounded backoff, and the retry layer costs every call a buffered copy of its messages."""
T = TypeVar("T")


class BrokerUnavailableError(KeyReleaseDenied):
    """The broker could not be reached within the bounded wait; nothing was released (fail closed)."""


class BrokerRefusedError(KeyReleaseDenied):
    """The broker answered with an error; ``code`` is the coarse gRPC status name."""

    def __init__(self, method: str, code: str) -> None:
        self.code = code
        super().__init__(f"key broker refused {method}: {code} (the broker's audit log has the reason)")


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes
    session_id: bytes
    expires_at: float

    def binding(
        self, executor_key: hpke.PrivateKeyHandle, *, cluster_id: str, bundle_digest: bytes
    ) -> Binding:
        """What the executor's evidence must commit to for this challenge."""
        pub = executor_key.public_key()
        return Binding(nonce=self.nonce, executor_public_key=pub.raw, hpke_suite=pub.suite,
                       cluster_id=cluster_id, bundle_digest=bundle_digest)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Token:
    """A token as received (``raw``) with its claims decoded for the holder's use (the broker verifies)."""

    raw: str = field(repr=False)
    claims: TokenClaims

    @property
    def jti(self) -> str:
        return self.claims.jti

    @property
    def expires_at(self) -> int:
        return self.claims.exp

    @classmethod
    def from_raw(cls, raw: str) -> Token:
        try:
            payload = raw.split(".")[1]
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (IndexError, ValueError) as exc:
            raise KeyReleaseDenied(f"broker returned a malformed token: {exc}") from None
        return cls(raw, TokenClaims.from_jwt_claims(data))


def _load_release_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise ValueError(
            "release_public_key must be a PEM P-256 public key (the broker's release key)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("release_public_key must be a PEM P-256 public key")
    return key


def _evidence_msg(ev: Evidence) -> kbs_pb2.Evidence:
    return kbs_pb2.Evidence(tee=ev.tee, evidence=ev.evidence, certs=list(ev.certs),
                            collateral=ev.collateral or b"", has_collateral=ev.collateral is not None,
                            gpus=[_evidence_msg(g) for g in ev.gpus])  # fmt: skip


def _policy_json(policy: DomainPolicy | Mapping[str, Any]) -> str:
    return json.dumps(policy.to_dict() if isinstance(policy, DomainPolicy) else dict(policy), sort_keys=True)


def _expected_hashes(policy_json: str, appraisal: Mapping[str, Any] | None) -> tuple[str, str]:
    """(policy_hash, appraisal_hash) the broker must report for the policy this owner sent."""
    sent = json.loads(json.dumps(appraisal)) if appraisal else None
    return DomainPolicy.from_dict(json.loads(policy_json)).policy_hash(), appraisal_hash(sent)


def _owner_credentials(
    client_cert: bytes | None, client_key: bytes | None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    if client_cert is None or client_key is None:
        return None
    try:
        key = owner_sig.load_owner_key(client_key)
        cert = x509.load_pem_x509_certificates(client_cert)[0]
        owner_sig.certificate_key(cert)
    except owner_sig.OwnerSignatureError as exc:
        raise ValueError(f"client_key / client_cert: {exc}") from None
    if cert.public_key() != key.public_key():
        raise ValueError("client_key is not the key of client_cert (the first certificate of the PEM chain)")
    return key, cert


def open_channel(
    target: str, *, ca_cert: bytes | None, client_cert: bytes | None = None, client_key: bytes | None = None
) -> grpc.Channel:
    """A gRPC channel to the broker: TLS pinned to ``ca_cert``, or plaintext only to a loopback
    development broker (``ca_cert=None``).

    Raises:
        ValueError: plaintext to a non-loopback target, or a client certificate without TLS.
    """
    host, _ = split_address(target)
    if ca_cert is None:
        if not is_loopback(host):
            raise ValueError(
                f"ca_cert=None (plaintext) is only for the development broker on 127.0.0.1; pin the "
                f"CA of {target!r} with ca_cert=open('kbs-ca.pem','rb').read()"
            )
        if client_cert is not None:
            raise ValueError("client certificates need TLS: pass ca_cert")
        return grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
    creds = grpc.ssl_channel_credentials(root_certificates=ca_cert, private_key=client_key,
                                         certificate_chain=client_cert)  # fmt: skip
    return grpc.secure_channel(target, creds, options=_CHANNEL_OPTIONS)


class KBSClient:
    """Client of one key broker.

    Args:
        target: ``HOST:PORT``.
        release_public_key: the broker's release key (PEM), pinned: responses signed otherwise are refused.
        ca_cert: PEM CA that issued the broker's TLS certificate. None only for the development broker
            on a loopback address (plaintext).
        client_cert / client_key: PEM certificate and key of an owner (mutual TLS for owner RPCs). The
            key (ECDSA P-256, the owner certificates' type) also signs the owner statements.
        timeout: seconds per attempt.
        retries: extra attempts after UNAVAILABLE (exponential backoff from 0.1 s, at most 2 s).

    Raises:
        ValueError: ``ca_cert`` is None for a non-loopback target, or a key is not P-256.
    """

    def __init__(
        self,
        target: str,
        *,
        release_public_key: bytes,
        ca_cert: bytes | None,
        client_cert: bytes | None = None,
        client_key: bytes | None = None,
        timeout: float = 5.0,
        retries: int = 3,
    ) -> None:
        self._release_key = _load_release_key(release_public_key)
        self._owner = _owner_credentials(client_cert, client_key)
        self._channel = open_channel(target, ca_cert=ca_cert, client_cert=client_cert, client_key=client_key)
        self._stub = kbs_pb2_grpc.KeyBrokerStub(self._channel)  # type: ignore[no-untyped-call]
        self.target, self.timeout, self.retries = target, timeout, max(0, retries)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KBSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any) -> Any:
        delay = BACKOFF_BASE
        for attempt in range(self.retries + 1):
            try:
                return getattr(self._stub, method)(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise BrokerRefusedError(method, code.name) from None
                if attempt == self.retries:
                    break
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        raise BrokerUnavailableError(
            f"key broker at {self.target} unreachable after {self.retries + 1} attempts; nothing was released"
        )

    # -- executors ---------------------------------------------------------------------------------
    def challenge(self) -> Challenge:
        r = self._call("GetChallenge", kbs_pb2.ChallengeRequest())
        if len(r.nonce) != 32:
            raise KeyReleaseDenied("broker returned a malformed challenge")
        return Challenge(bytes(r.nonce), bytes(r.session_id), r.expires_at_ms / 1000)

    def attest(
        self,
        challenge: Challenge,
        evidence: Evidence,
        *,
        profile: str,
        executor_key: hpke.PrivateKeyHandle,
        cluster_id: str,
        bundle_digest: bytes,
        scope: str,
        node_id: str,
        pool: str,
        region: str,
        domains: Iterable[str] = (),
    ) -> Token:
        """Present evidence bound to ``challenge`` and this key; returns the broker's token."""
        r = self._call("Attest", self._attest_request(
            challenge, evidence, profile=profile, executor_key=executor_key, cluster_id=cluster_id,
            bundle_digest=bundle_digest, scope=scope, node_id=node_id, pool=pool, region=region,
            domains=domains, unwrap=()))  # fmt: skip
        return self._token(r, executor_key)

    def attest_and_unwrap(
        self,
        challenge: Challenge,
        evidence: Evidence,
        headers: Sequence[bytes],
        *,
        profile: str,
        executor_key: hpke.PrivateKeyHandle,
        cluster_id: str,
        bundle_digest: bytes,
        node_id: str,
        pool: str,
        region: str,
        domains: Iterable[str],
    ) -> tuple[Token, list[bytes]]:
        """:meth:`attest` for a release-scope token and :meth:`unwrap` of each of ``headers`` in one
        call (at most 16): the broker runs and audits every Unwrap check per object; each key response
        is verified here exactly as :meth:`unwrap` verifies it. Returns the token and the DEKs in order.

        Raises:
            BrokerRefusedError: the broker refused the attestation or any of the unwraps.
            KeyReleaseDenied: a response is not the pinned broker's answer to this request.
        """
        parsed = [SealedHeader.parse(h) for h in headers]
        nonces = [os.urandom(32) for _ in parsed]
        r = self._call("Attest", self._attest_request(
            challenge, evidence, profile=profile, executor_key=executor_key, cluster_id=cluster_id,
            bundle_digest=bundle_digest, scope="release", node_id=node_id, pool=pool, region=region,
            domains=domains, unwrap=[kbs_pb2.UnwrapItem(header=p.header_bytes, request_nonce=n)
                                     for p, n in zip(parsed, nonces, strict=True)]))  # fmt: skip
        token = self._token(r, executor_key)
        return token, self._open_deks(r.keys, parsed, nonces, token=token, key=executor_key)

    @staticmethod
    def _attest_request(
        challenge: Challenge, evidence: Evidence, *, profile: str, executor_key: hpke.PrivateKeyHandle,
        cluster_id: str, bundle_digest: bytes, scope: str, node_id: str, pool: str, region: str,
        domains: Iterable[str], unwrap: Sequence[kbs_pb2.UnwrapItem],
    ) -> kbs_pb2.AttestRequest:  # fmt: skip
        pub = executor_key.public_key()
        return kbs_pb2.AttestRequest(
            session_id=challenge.session_id, nonce=challenge.nonce, evidence=_evidence_msg(evidence),
            profile=profile, hpke_suite=pub.suite, executor_public_key=pub.raw, cluster_id=cluster_id,
            bundle_digest=bundle_digest, scope=scope, node_id=node_id, pool=pool, region=region,
            domains=list(domains), unwrap=list(unwrap))  # fmt: skip

    @staticmethod
    def _token(r: Any, executor_key: hpke.PrivateKeyHandle) -> Token:
        token = Token.from_raw(r.token)
        if token.claims.jkt != jkt(executor_key.public_key()):
            raise KeyReleaseDenied("broker issued a token for another key")
        return token

    def _open_deks(
        self, keys: Sequence[Any], headers: Sequence[SealedHeader], nonces: Sequence[bytes], *, token: Token,
        key: hpke.PrivateKeyHandle,
    ) -> list[bytes]:  # fmt: skip
        """The data keys in ``keys``, one per header in order, each verified by :meth:`_open`.

        Raises:
            KeyReleaseDenied: another number of keys than headers, or any response refused.
        """
        if len(keys) != len(headers):
            raise KeyReleaseDenied("broker answered another number of objects than requested")
        deks = []
        for resp, header, nonce in zip(keys, headers, nonces, strict=True):
            dek = self._open(resp, token=token, key=key, nonce=nonce, domain=header.domain,
                             version=header.key_version, subject=header.header_hash)  # fmt: skip
            if len(dek) != 32:
                raise KeyReleaseDenied("broker released a key of the wrong size")
            deks.append(dek)
        return deks

    def _open(
        self, resp: Any, *, token: Token, key: hpke.PrivateKeyHandle, nonce: bytes, domain: str,
        version: int | None, subject: bytes,
    ) -> bytes:  # fmt: skip
        body = bytes(resp.record)
        rec_mod.verify(self._release_key, body, bytes(resp.signature))
        rec = rec_mod.ReleaseRecord.decode(body)
        checks = (
            ("request nonce", hmac.compare_digest(rec.request_nonce, nonce)),
            ("domain", rec.domain == domain),
            ("key version", version is None or rec.key_version == version),
            ("token", rec.token_id == token.jti),
            ("key", hmac.compare_digest(rec.key_hash, rec_mod.key_hash(key.public_key()))),
            ("object", hmac.compare_digest(rec.header_hash, subject)),
        )
        for what, ok in checks:
            if not ok:
                raise KeyReleaseDenied(f"broker response names another {what} (replayed or misdirected)")
        try:
            return key.unwrap(bytes(resp.sealed_key), info=body)
        except DecryptionError:
            raise KeyReleaseDenied("broker response does not open with this key and record") from None

    def unwrap(self, token: Token, header_bytes: bytes, executor_key: hpke.PrivateKeyHandle) -> bytes:
        """The DEK of the sealed object whose header is ``header_bytes``.

        Raises:
            BrokerRefusedError: the broker refused (denied, not found, rate limited).
            KeyReleaseDenied: the response is not the pinned broker's answer to this request.
            BrokerUnavailableError: the broker is unreachable.
        """
        header = SealedHeader.parse(header_bytes)
        nonce = os.urandom(32)
        pub = executor_key.public_key()
        resp = self._call("Unwrap", kbs_pb2.UnwrapRequest(
            token=token.raw, header=header.header_bytes, request_nonce=nonce, hpke_suite=pub.suite,
            executor_public_key=pub.raw))  # fmt: skip
        return self._open_deks([resp], [header], [nonce], token=token, key=executor_key)[0]

    def unwrap_many(
        self, token: Token, headers: Sequence[bytes], executor_key: hpke.PrivateKeyHandle
    ) -> list[bytes]:
        """The DEKs of the sealed objects whose headers are ``headers``, in order, with one
        ``UnwrapMany`` call per :data:`~ray_confidential.kbs.broker.MAX_UNWRAP_ITEMS` objects. Each
        object gets its own fresh request nonce, and each key response is verified exactly as
        :meth:`unwrap` verifies it. The broker grants a call all or nothing.

        Raises:
            BrokerRefusedError: the broker refused a call (any object denied, rate limited); the keys
                of earlier calls are not returned either.
            KeyReleaseDenied: a response is not the pinned broker's answer to this request (another
                number of keys, a record of another object or request, another signer).
            BrokerUnavailableError: the broker is unreachable.
        """
        parsed = [SealedHeader.parse(h) for h in headers]
        pub = executor_key.public_key()
        deks: list[bytes] = []
        for at in range(0, len(parsed), MAX_UNWRAP_ITEMS):
            chunk = parsed[at : at + MAX_UNWRAP_ITEMS]
            nonces = [os.urandom(32) for _ in chunk]
            r = self._call("UnwrapMany", kbs_pb2.UnwrapManyRequest(
                token=token.raw, hpke_suite=pub.suite, executor_public_key=pub.raw,
                items=[kbs_pb2.UnwrapItem(header=h.header_bytes, request_nonce=n)
                       for h, n in zip(chunk, nonces, strict=True)]))  # fmt: skip
            deks += self._open_deks(r.keys, chunk, nonces, token=token, key=executor_key)
        return deks

    def release(self, token: Token, domain: str, name: str, executor_key: hpke.PrivateKeyHandle) -> bytes:
        """A named secret of ``domain``, under the same checks as :meth:`unwrap`."""
        nonce = os.urandom(32)
        pub = executor_key.public_key()
        resp = self._call("Release", kbs_pb2.ReleaseRequest(
            token=token.raw, domain=domain, name=name, request_nonce=nonce, hpke_suite=pub.suite,
            executor_public_key=pub.raw))  # fmt: skip
        return self._open(resp, token=token, key=executor_key, nonce=nonce, domain=domain, version=0,
                          subject=rec_mod.secret_subject(name))  # fmt: skip

    def revocation_epoch(self) -> int:
        return int(self._call("GetRevocationEpoch", kbs_pb2.RevocationEpochRequest()).epoch)

    def jwks(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._call("GetJWKS", kbs_pb2.JWKSRequest()).jwks)
        return result

    # -- descriptors -------------------------------------------------------------------------------
    def _verified(self, resp: Any, name: str, version: int | None) -> dict[str, Any]:
        body = bytes(resp.descriptor)
        rec_mod.verify(self._release_key, body, bytes(resp.signature))
        d: dict[str, Any] = json.loads(body)
        if d.get("name") != name or (version is not None and d.get("version") != version):
            raise KeyReleaseDenied("broker descriptor names another domain or version")
        return d

    def _descriptor(self, resp: Any, name: str, version: int | None) -> DomainDescriptor:
        return DomainDescriptor.from_dict(self._verified(resp, name, version))  # the signed body's fields

    def descriptor(
        self, name: str, version: int | None = None, *, owner_ca: bytes | None = None
    ) -> DomainDescriptor:
        """The domain's descriptor (newest live version by default), signed by the pinned release key.

        Args:
            owner_ca: PEM of the owner CA to pin. Given, the descriptor must also carry its owner's
                signature: the certificate must chain to ``owner_ca`` and name the descriptor's
                ``owner``, and its key must have signed the owner statement rebuilt from the
                descriptor's verified fields (docs/kbs.md "Owner signatures").

        Raises:
            OwnerSignatureError: ``owner_ca`` given and the owner signature is missing or invalid.
            KeyReleaseDenied: not signed by the pinned release key, or another domain or version.
        """
        resp = self._call("GetDescriptor", kbs_pb2.GetDescriptorRequest(name=name, version=version or 0))
        d = self._verified(resp, name, version)
        if owner_ca is not None:
            verify_owner_signature(d, bytes(resp.owner_signature), bytes(resp.owner_certificate),
                                   owner_ca=owner_ca)  # fmt: skip
        return DomainDescriptor.from_dict(d)

    # -- owner signatures --------------------------------------------------------------------------
    def _sign(self, resp: Any, name: str, version: int | None, expect: tuple[str, str] | None) -> Any:
        """Sign the owner statement of the verified descriptor in ``resp``; returns SignDescriptor's answer."""
        if self._owner is None:
            raise ValueError("signing needs the owner's client_cert and client_key")
        key, cert = self._owner
        d = self._verified(resp, name, version)
        me = cert.subject.rfc4514_string()
        if d.get("owner") != me:
            raise KeyReleaseDenied(
                f"broker descriptor names owner {d.get('owner')!r}, not {me!r}: not signing"
            )
        if expect is not None and (d.get("policy_hash"), d.get("appraisal_hash")) != expect:
            raise KeyReleaseDenied("broker descriptor names another policy than the one sent: not signing")
        signature = owner_sig.sign_statement(key, owner_sig.statement_from_descriptor(d))
        signed = self._call("SignDescriptor", kbs_pb2.SignDescriptorRequest(
            name=name, version=int(d["version"]), signature=signature))  # fmt: skip
        self._verified(signed, name, int(d["version"]))
        if bytes(signed.owner_signature) != signature:
            raise KeyReleaseDenied("broker did not keep the owner signature")
        return signed

    def sign_descriptor(
        self, name: str, version: int | None = None, *, policy: DomainPolicy | Mapping[str, Any] | None = None,
        appraisal: Mapping[str, Any] | None = None,
    ) -> DomainDescriptor:  # fmt: skip
        """Sign the owner statement of ``version`` (newest live by default) as this client's owner.

        Args:
            policy / appraisal: when given, sign only if the descriptor names exactly this policy
                (and appraisal policy; None = derived from the policy).

        Raises:
            ValueError: this client holds no owner key.
            KeyReleaseDenied: the descriptor names another owner or policy; the broker refused.
        """
        resp = self._call("GetDescriptor", kbs_pb2.GetDescriptorRequest(name=name, version=version or 0))
        expect = None if policy is None else _expected_hashes(_policy_json(policy), appraisal)
        return self._descriptor(self._sign(resp, name, version, expect), name, version)

    def _sign_after(self, resp: Any, name: str, sign: bool, expect: tuple[str, str] | None) -> Any:
        return self._sign(resp, name, None, expect) if sign and self._owner is not None else resp

    # -- owners (mutual TLS) -----------------------------------------------------------------------
    def create_domain(
        self, name: str, policy: DomainPolicy | Mapping[str, Any], *, appraisal: Mapping[str, Any] | None = None,
        suite: str = hpke.DEFAULT_SUITE, sign: bool = True,
    ) -> DomainDescriptor:  # fmt: skip
        """Create (or confirm) a domain; with the owner's key (and ``sign``), sign its statement once the
        descriptor names this owner and exactly this policy."""
        policy_json = _policy_json(policy)
        resp = self._call("CreateDomain", kbs_pb2.CreateDomainRequest(
            name=name, policy_json=policy_json, appraisal_json=json.dumps(appraisal) if appraisal else "",
            hpke_suite=suite))  # fmt: skip
        resp = self._sign_after(resp, name, sign, _expected_hashes(policy_json, appraisal))
        return self._descriptor(resp, name, None)

    def update_policy(
        self,
        name: str,
        policy: DomainPolicy | Mapping[str, Any],
        *,
        appraisal: Mapping[str, Any] | None = None,
        sign: bool = True,
    ) -> DomainDescriptor:
        """Replace the domain's policy. The broker drops every owner signature over the old policy; with
        the owner's key (and ``sign``) this signs the new statement of every live key version."""
        policy_json = _policy_json(policy)
        resp = self._call("UpdatePolicy", kbs_pb2.UpdatePolicyRequest(
            name=name, policy_json=policy_json,
            appraisal_json=json.dumps(appraisal) if appraisal else ""))  # fmt: skip
        expect = _expected_hashes(policy_json, appraisal)
        resp = self._sign_after(resp, name, sign, expect)
        if sign and self._owner is not None:
            live = self._verified(resp, name, None)
            retired = set(live.get("retired_versions") or ())
            for number in range(1, int(live["version"])):
                if number not in retired:
                    older = self._call(
                        "GetDescriptor", kbs_pb2.GetDescriptorRequest(name=name, version=number)
                    )
                    self._sign(older, name, number, expect)
        return self._descriptor(resp, name, None)

    def rotate(self, name: str, *, suite: str | None = None, sign: bool = True) -> DomainDescriptor:
        """A new key version; with the owner's key (and ``sign``) sign its statement (the policy hashes
        are the broker's current ones, which rotation does not change)."""
        resp = self._call("Rotate", kbs_pb2.RotateRequest(name=name, hpke_suite=suite or ""))
        resp = self._sign_after(resp, name, sign, None)
        return self._descriptor(resp, name, None)

    def retire(self, name: str, version: int) -> None:
        self._call("Retire", kbs_pb2.RetireRequest(name=name, version=version))

    def revoke(self, kind: str, value: str, *, reason: str = "") -> int:
        """Revoke a node, measurement, tcb, token (jti) or bundle digest; returns the new epoch."""
        return int(self._call("Revoke", kbs_pb2.RevokeRequest(kind=kind, value=value, reason=reason)).epoch)

    def audit_checkpoint(self) -> bytes:
        """A signed checkpoint of the broker's audit log (owners only). Verify it with the audit public
        key (``ray_confidential.kbs.audit.parse_checkpoint``) and keep it away from the broker; later
        ``ray-confidential audit verify LOG --checkpoint FILE`` detects truncation and rewrites up to it."""
        return bytes(self._call("GetAuditCheckpoint", kbs_pb2.AuditCheckpointRequest()).checkpoint)


def verify_owner_signature(
    descriptor: Mapping[str, Any], signature: bytes, certificate: bytes, *, owner_ca: bytes
) -> None:
    """Check the owner signature of a descriptor already verified under the release key.

    Raises:
        OwnerSignatureError: no signature; the certificate does not chain to ``owner_ca``, does not
            name the descriptor's owner or has no P-256 key; or the signature does not verify over
            the owner statement rebuilt from ``descriptor``.
    """
    if not signature or not certificate:
        raise owner_sig.OwnerSignatureError(
            f"descriptor of {descriptor.get('name')!r} v{descriptor.get('version')} carries no owner signature "
            "(the owner has not signed this version under the current policy)"
        )
    cert = owner_sig.verify_owner_certificate(
        certificate, owner_ca=owner_ca, owner=str(descriptor.get("owner"))
    )
    statement = owner_sig.statement_from_descriptor(dict(descriptor))
    owner_sig.verify_statement(owner_sig.certificate_key(cert), statement, signature)


__all__ = [
    "BrokerRefusedError",
    "BrokerUnavailableError",
    "Challenge",
    "KBSClient",
    "Token",
    "verify_owner_signature",
]
