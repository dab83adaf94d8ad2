"""gRPC servicer of ``ray_confidential.kbs.v1.KeyBroker``: proto <-> :class:`~ray_confidential.kbs.broker.Broker`.

Transport duties only: caller identity (an owner is the subject of a verified client certificate;
other callers are keyed by their network address), per-client rate limits, and coarse wire errors.
The full reason of a refusal goes to the log and the audit record, never to the caller.

What it does NOT do: any security decision beyond identity and rate (the broker decides).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ray_confidential.attestation.evidence import Evidence
from ray_confidential.kbs.broker import (
    MAX_ATTEST_UNWRAPS,
    MAX_UNWRAP_ITEMS,
    AttestRequest,
    Broker,
    Denied,
    KeyResponse,
)
from ray_confidential.kbs.proto import kbs_pb2, kbs_pb2_grpc
from ray_confidential.kbs.ratelimit import RateLimiter
from ray_confidential.kbs.statement_feed import MAX_WAIT_S, StatementFeed

log = logging.getLogger("ray_confidential.kbs")

T = TypeVar("T")

_CODES = {
    "PERMISSION_DENIED": (grpc.StatusCode.PERMISSION_DENIED, "permission denied"),
    "NOT_FOUND": (grpc.StatusCode.NOT_FOUND, "not found"),
    "INVALID_ARGUMENT": (grpc.StatusCode.INVALID_ARGUMENT, "invalid argument"),
    "RESOURCE_EXHAUSTED": (grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit exceeded"),
    "ALREADY_EXISTS": (grpc.StatusCode.ALREADY_EXISTS, "already exists with a different policy"),
}


def _client_certificate(context: grpc.ServicerContext) -> x509.Certificate | None:
    """The verified client certificate (mutual TLS), or None."""
    if context.peer_identities() is None:
        return None
    pems = context.auth_context().get("x509_pem_cert")
    return x509.load_pem_x509_certificate(pems[0]) if pems else None


def owner_identity(context: grpc.ServicerContext) -> str | None:
    """RFC 4514 subject of the verified client certificate, or None (no mutual TLS)."""
    cert = _client_certificate(context)
    return cert.subject.rfc4514_string() if cert is not None else None


def owner_certificate(context: grpc.ServicerContext) -> bytes | None:
    """DER of the verified client certificate (the owner's, mutual TLS), or None."""
    cert = _client_certificate(context)
    return cert.public_bytes(serialization.Encoding.DER) if cert is not None else None


def client_key(context: grpc.ServicerContext, owner: str | None) -> str:
    """Rate-limit key: the owner identity, else the peer's host (``ipv4:1.2.3.4:port`` -> ``ipv4:1.2.3.4``)."""
    if owner:
        return "owner:" + owner
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


def _evidence(msg: kbs_pb2.Evidence) -> Evidence:
    return Evidence(
        tee=msg.tee,
        evidence=bytes(msg.evidence),
        certs=tuple(bytes(c) for c in msg.certs),
        collateral=bytes(msg.collateral) if msg.has_collateral else None,
        gpus=tuple(_evidence(g) for g in msg.gpus),
    )


def _json_or_none(text: str) -> Mapping[str, Any] | None:
    if not text:
        return None
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


class KeyBrokerService(kbs_pb2_grpc.KeyBrokerServicer):
    """The servicer. ``dev_owner``: identity given to callers without a client certificate (dev only)."""

    def __init__(
        self,
        broker: Broker,
        *,
        limiter: RateLimiter | None,
        secrets: Mapping[tuple[str, str], bytes] | None = None,
        dev_owner: str | None = None,
        feed: StatementFeed | None = None,
    ) -> None:
        self.broker, self.limiter, self.dev_owner = broker, limiter, dev_owner
        self.secrets = dict(secrets or {})
        self.feed = feed

    def _run(
        self, rpc: str, context: grpc.ServicerContext, fn: Callable[[str | None, str], T], cost: int = 1
    ) -> T:
        """Identify the caller, charge ``cost`` against its rate limit, run ``fn(owner, client)``, and
        turn a refusal into its coarse wire error."""
        owner = owner_identity(context) or self.dev_owner
        client = client_key(context, owner)
        try:
            if self.limiter is not None and not self.limiter.allow(client, cost):
                raise self.broker._deny("rate_limit", "RESOURCE_EXHAUSTED", f"{rpc}: rate limit exceeded",
                                        client=client)  # fmt: skip
            return fn(owner, client)
        except Denied as exc:
            code, message = _CODES[exc.code]
            context.abort(code, message)
        except (ValueError, TypeError) as exc:  # malformed request fields
            log.warning("%s: invalid argument from %s: %s", rpc, client, exc)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid argument")
        raise AssertionError("unreachable")  # context.abort raises

    @staticmethod
    def _key(resp: KeyResponse) -> kbs_pb2.KeyResponse:
        return kbs_pb2.KeyResponse(record=resp.record, signature=resp.signature, sealed_key=resp.sealed_key)

    def _descriptor(self, name: str, version: int = 0) -> kbs_pb2.DescriptorResponse:
        body, sig, owner = self.broker.signed_descriptor(name, version)
        if owner is None:
            return kbs_pb2.DescriptorResponse(descriptor=body, signature=sig)
        return kbs_pb2.DescriptorResponse(descriptor=body, signature=sig, owner_signature=owner.signature,
                                          owner_certificate=owner.certificate)  # fmt: skip

    # -- executors ---------------------------------------------------------------------------------
    def GetChallenge(self, request: kbs_pb2.ChallengeRequest, context: grpc.ServicerContext) -> Any:
        def fn(owner: str | None, client: str) -> kbs_pb2.ChallengeResponse:
            c = self.broker.challenge()
            return kbs_pb2.ChallengeResponse(nonce=c.nonce, session_id=c.session_id,
                                             expires_at_ms=int(c.expires_at * 1000))  # fmt: skip

        return self._run("GetChallenge", context, fn)

    def Attest(self, request: kbs_pb2.AttestRequest, context: grpc.ServicerContext) -> Any:
        def fn(owner: str | None, client: str) -> kbs_pb2.AttestResponse:
            req = AttestRequest(
                session_id=bytes(request.session_id), nonce=bytes(request.nonce),
                evidence=_evidence(request.evidence), profile=request.profile, hpke_suite=request.hpke_suite,
                executor_public_key=bytes(request.executor_public_key), cluster_id=request.cluster_id,
                bundle_digest=bytes(request.bundle_digest), scope=request.scope, node_id=request.node_id,
                pool=request.pool, region=request.region, domains=tuple(request.domains),
            )  # fmt: skip
            if not request.unwrap:
                token, claims = self.broker.attest(req, client=client)
                return kbs_pb2.AttestResponse(token=token, expires_at=claims.exp)
            items = [(bytes(u.header), bytes(u.request_nonce)) for u in request.unwrap]
            token, claims, keys = self.broker.attest_and_unwrap(req, client=client, unwrap=items)
            return kbs_pb2.AttestResponse(
                token=token, expires_at=claims.exp, keys=[self._key(k) for k in keys]
            )

        # The attestation costs one unit, and each object it unwraps one more, as separate Unwraps would.
        return self._run("Attest", context, fn, 1 + min(len(request.unwrap), MAX_ATTEST_UNWRAPS))

    def Unwrap(self, request: kbs_pb2.UnwrapRequest, context: grpc.ServicerContext) -> Any:
        def fn(owner: str | None, client: str) -> kbs_pb2.KeyResponse:
            return self._key(
                self.broker.unwrap(token=request.token, header=bytes(request.header),
                                   request_nonce=bytes(request.request_nonce), hpke_suite=request.hpke_suite,
                                   executor_public_key=bytes(request.executor_public_key), client=client)
            )  # fmt: skip

        return self._run("Unwrap", context, fn)

    def UnwrapMany(self, request: kbs_pb2.UnwrapManyRequest, context: grpc.ServicerContext) -> Any:
        def fn(owner: str | None, client: str) -> kbs_pb2.UnwrapManyResponse:
            items = [(bytes(u.header), bytes(u.request_nonce)) for u in request.items]
            keys = self.broker.unwrap_many(token=request.token, items=items, hpke_suite=request.hpke_suite,
                                           executor_public_key=bytes(request.executor_public_key), client=client)  # fmt: skip
            return kbs_pb2.UnwrapManyResponse(keys=[self._key(k) for k in keys])

        # One rate-limit unit per object, as for as many Unwrap calls: batching saves round trips, not
        # rate. An oversized request is charged the maximum, then refused by the broker (audited).
        cost = max(1, min(len(request.items), MAX_UNWRAP_ITEMS))
        return self._run("UnwrapMany", context, fn, cost)

    def Release(self, request: kbs_pb2.ReleaseRequest, context: grpc.ServicerContext) -> Any:
        def fn(owner: str | None, client: str) -> kbs_pb2.KeyResponse:
            return self._key(
                self.broker.release(token=request.token, domain=request.domain, name=request.name,
                                    request_nonce=bytes(request.request_nonce), hpke_suite=request.hpke_suite,
                                    executor_public_key=bytes(request.executor_public_key), client=client,
                                    secrets=self.secrets)
            )  # fmt: skip

        return self._run("Release", context, fn)

    def GetRevocationEpoch(
        self, request: kbs_pb2.RevocationEpochRequest, context: grpc.ServicerContext
    ) -> Any:
        return self._run("GetRevocationEpoch", context,
                         lambda o, c: kbs_pb2.RevocationEpochResponse(epoch=self.broker.revocation_epoch))  # fmt: skip

    def GetJWKS(self, request: kbs_pb2.JWKSRequest, context: grpc.ServicerContext) -> Any:
        return self._run("GetJWKS", context,
                         lambda o, c: kbs_pb2.JWKSResponse(jwks=json.dumps(self.broker.jwks(), sort_keys=True)))  # fmt: skip

    def GetStatements(self, request: kbs_pb2.StatementsRequest, context: grpc.ServicerContext) -> Any:
        feed = self.feed
        if feed is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this broker publishes no registry statements")
            raise AssertionError("unreachable")

        def fn(owner: str | None, client: str) -> kbs_pb2.StatementsResponse:
            page = feed.since(request.registry_id, feed_id=request.feed_id, after=request.after,
                              wait_s=min(request.wait_ms, int(MAX_WAIT_S * 1000)) / 1000)  # fmt: skip
            return kbs_pb2.StatementsResponse(
                feed_id=page.feed_id, cursor=page.cursor, statements=page.statements
            )

        return self._run("GetStatements", context, fn)

    def GetDescriptor(self, request: kbs_pb2.GetDescriptorRequest, context: grpc.ServicerContext) -> Any:
        return self._run(
            "GetDescriptor", context, lambda o, c: self._descriptor(request.name, request.version)
        )

    # -- owners ------------------------------------------------------------------------------------
    def CreateDomain(self, request: kbs_pb2.CreateDomainRequest, context: grpc.ServicerContext) -> Any:
        def fn(owner: str | None, client: str) -> kbs_pb2.DescriptorResponse:
            policy = _json_or_none(request.policy_json) or {}
            d = self.broker.create_domain(owner, request.name, policy, _json_or_none(request.appraisal_json),
                                          request.hpke_suite or "x25519")  # fmt: skip
            return self._descriptor(d.name)

        return self._run("CreateDomain", context, fn)

    def UpdatePolicy(self, request: kbs_pb2.UpdatePolicyRequest, context: grpc.ServicerContext) -> Any:
        def fn(owner: str | None, client: str) -> kbs_pb2.DescriptorResponse:
            policy = _json_or_none(request.policy_json) or {}
            d = self.broker.update_policy(owner, request.name, policy, _json_or_none(request.appraisal_json))
            return self._descriptor(d.name)

        return self._run("UpdatePolicy", context, fn)

    def Rotate(self, request: kbs_pb2.RotateRequest, context: grpc.ServicerContext) -> Any:
        def fn(owner: str | None, client: str) -> kbs_pb2.DescriptorResponse:
            d = self.broker.rotate(owner, request.name, request.hpke_suite or None)
            return self._descriptor(d.name)

        return self._run("Rotate", context, fn)

    def Retire(self, request: kbs_pb2.RetireRequest, context: grpc.ServicerContext) -> Any:
        def fn(owner: str | None, client: str) -> kbs_pb2.DescriptorResponse:
            d = self.broker.retire(owner, request.name, request.version)
            return self._descriptor(d.name, request.version)

        return self._run("Retire", context, fn)

    def SignDescriptor(self, request: kbs_pb2.SignDescriptorRequest, context: grpc.ServicerContext) -> Any:
        def fn(owner: str | None, client: str) -> kbs_pb2.DescriptorResponse:
            d = self.broker.sign_descriptor(owner, request.name, request.version, bytes(request.signature),
                                            owner_certificate(context))  # fmt: skip
            return self._descriptor(d.name, request.version)

        return self._run("SignDescriptor", context, fn)

    def Revoke(self, request: kbs_pb2.RevokeRequest, context: grpc.ServicerContext) -> Any:
        def fn(owner: str | None, client: str) -> kbs_pb2.RevokeResponse:
            return kbs_pb2.RevokeResponse(
                epoch=self.broker.revoke(owner, request.kind, request.value, request.reason)
            )

        return self._run("Revoke", context, fn)

    def GetAuditCheckpoint(
        self, request: kbs_pb2.AuditCheckpointRequest, context: grpc.ServicerContext
    ) -> Any:
        return self._run("GetAuditCheckpoint", context,
                         lambda o, c: kbs_pb2.AuditCheckpointResponse(checkpoint=self.broker.audit_checkpoint(o)))  # fmt: skip


__all__ = ["KeyBrokerService", "client_key", "owner_certificate", "owner_identity"]
