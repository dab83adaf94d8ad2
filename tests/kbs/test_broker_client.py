"""KBSClient against real servers on 127.0.0.1: pinned release key, replay, fail-closed, the
KeyService adapter, named secrets."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from ray_confidential.crypto import hpke
from ray_confidential.errors import KeyReleaseDenied
from ray_confidential.kbs import record as rec_mod
from ray_confidential.kbs.client import BrokerRefusedError, BrokerUnavailableError, KBSClient
from ray_confidential.kbs.config import public_pem
from ray_confidential.kbs.keyservice import AttestedKeyService
from ray_confidential.kbs.proto import kbs_pb2, kbs_pb2_grpc
from ray_confidential.kbs.tokens import new_signing_key
from ray_confidential.sealed import open_sealed
from ray_confidential.sealed.format import DomainPublicKey, seal
from tests.kbs.broker_env import PKI, Executor, Harness, pinned_policy


@pytest.fixture
def h(pki: PKI) -> Iterator[Harness]:
    harness = Harness(pki=pki, secrets={("hospital", "db-password"): b"s3cret"})
    owner = harness.client("owner-a")
    owner.create_domain("hospital", pinned_policy("tdx"))
    yield harness
    harness.close()


def _blob(h: Harness, value: Any = b"x-ray") -> bytes:
    d = h.client().descriptor("hospital")
    return bytes(seal(value, DomainPublicKey(domain="hospital", version=d.version, public_key=d.public_key)))


class Rogue(kbs_pb2_grpc.KeyBrokerServicer):
    """A man in the middle (or a rogue head node's broker address) in front of the real broker."""

    def __init__(self, upstream: kbs_pb2_grpc.KeyBrokerStub, mode: str) -> None:
        self.up, self.mode = upstream, mode
        self.saved: Any = None
        self.other_key = new_signing_key()

    def GetChallenge(self, request: Any, context: Any) -> Any:
        return self.up.GetChallenge(request)

    def Attest(self, request: Any, context: Any) -> Any:
        return self.up.Attest(request)

    def GetDescriptor(self, request: Any, context: Any) -> Any:
        resp = self.up.GetDescriptor(request)
        if self.mode == "resign":
            resp = kbs_pb2.DescriptorResponse(descriptor=resp.descriptor,
                                              signature=rec_mod.sign(self.other_key, resp.descriptor))  # fmt: skip
        return resp

    def Unwrap(self, request: Any, context: Any) -> Any:
        resp = self.up.Unwrap(request)
        if self.mode == "resign":  # same record, the attacker's own signature
            return kbs_pb2.KeyResponse(record=resp.record, signature=rec_mod.sign(self.other_key, resp.record),
                                       sealed_key=resp.sealed_key)  # fmt: skip
        if self.mode == "replay":  # answer every request with the first genuine response
            self.saved = self.saved or resp
            return self.saved
        return resp


@pytest.fixture
def rogue(h: Harness, pki: PKI, request: pytest.FixtureRequest) -> Iterator[tuple[Rogue, str]]:
    channel = grpc.secure_channel(h.target, grpc.ssl_channel_credentials(root_certificates=pki.ca_pem))
    servicer = Rogue(kbs_pb2_grpc.KeyBrokerStub(channel), request.param)  # type: ignore[no-untyped-call]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    kbs_pb2_grpc.add_KeyBrokerServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)
    channel.close()


@pytest.mark.parametrize("rogue", ["resign"], indirect=True)
def test_response_not_signed_by_pinned_key_refused(h: Harness, rogue: tuple[Rogue, str]) -> None:
    _, target = rogue
    blob = _blob(h)
    with KBSClient(target, release_public_key=h.release_pem, ca_cert=None) as client:
        ex = Executor.create("tdx")
        token = ex.attest(client, domains=("hospital",))
        with pytest.raises(KeyReleaseDenied, match="not signed by the pinned release key"):
            client.unwrap(token, blob, ex.key)
        with pytest.raises(KeyReleaseDenied, match="pinned release key"):
            client.descriptor("hospital")
    # Pinning the attacker's key instead is the only way the forged response passes.


@pytest.mark.parametrize("rogue", ["replay"], indirect=True)
def test_response_replayed_from_another_request_refused(h: Harness, rogue: tuple[Rogue, str]) -> None:
    _, target = rogue
    first, second = _blob(h, b"first"), _blob(h, b"second")
    with KBSClient(target, release_public_key=h.release_pem, ca_cert=None) as client:
        ex = Executor.create("tdx")
        token = ex.attest(client, domains=("hospital",))
        assert len(client.unwrap(token, first, ex.key)) == 32
        with pytest.raises(KeyReleaseDenied, match="request nonce"):
            client.unwrap(token, first, ex.key)  # same object, replayed answer: stale nonce
        with pytest.raises(KeyReleaseDenied, match="replayed"):
            client.unwrap(token, second, ex.key)


def test_pinned_key_must_be_the_brokers(h: Harness) -> None:
    wrong = public_pem(new_signing_key())
    client = h.client(release_public_key=wrong)
    ex = Executor.create("tdx")
    token = ex.attest(client, domains=("hospital",))
    with pytest.raises(KeyReleaseDenied, match="pinned"):
        client.unwrap(token, _blob(h), ex.key)


def test_plaintext_only_for_loopback() -> None:
    pem = public_pem(new_signing_key())
    with pytest.raises(ValueError, match="ca_cert"):
        KBSClient("kbs.example.com:443", release_public_key=pem, ca_cert=None)
    with pytest.raises(ValueError, match="P-256"):
        KBSClient("127.0.0.1:1", release_public_key=b"not a key", ca_cert=None)


def test_unreachable_broker_fails_closed_after_bounded_wait() -> None:
    pem = public_pem(new_signing_key())
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = KBSClient(f"127.0.0.1:{port}", release_public_key=pem, ca_cert=None, timeout=0.5, retries=2)
    start = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="unreachable after 3 attempts"):
        client.challenge()
    assert time.monotonic() - start < 5
    client.close()


def test_wrong_ca_is_unreachable_not_trusted(h: Harness) -> None:
    other = PKI.create(owners=())
    client = KBSClient(h.target, release_public_key=h.release_pem, ca_cert=other.ca_pem, timeout=1, retries=0)
    with pytest.raises(BrokerUnavailableError):
        client.challenge()
    client.close()


def test_named_secret_release(h: Harness) -> None:
    client = h.client()
    ex = Executor.create("tdx")
    token = ex.attest(client, domains=("hospital",))
    assert client.release(token, "hospital", "db-password", ex.key) == b"s3cret"
    with pytest.raises(BrokerRefusedError) as exc:
        client.release(token, "hospital", "nope", ex.key)
    assert exc.value.code == "NOT_FOUND"
    with pytest.raises(BrokerRefusedError) as exc:
        client.release(token, "hospital", "db-password", hpke.generate_private_key())
    assert exc.value.code == "PERMISSION_DENIED"


def test_attested_key_service_opens_caches_and_drops_on_revocation(h: Harness) -> None:
    client = h.client()
    ex = Executor.create("tdx")
    attests: list[int] = []

    def obtain() -> Any:
        attests.append(1)
        return ex.attest(client, domains=("hospital",))

    now = [time.time()]
    svc = AttestedKeyService(client, executor_key=ex.key, obtain_token=obtain, clock=lambda: now[0],
                             epoch_interval=10.0)  # fmt: skip
    blob = _blob(h, {"a": 1})
    assert open_sealed(blob, svc) == {"a": 1}

    def unwraps() -> int:
        return sum(1 for r in h.audit.records if r["event"] == "unwrap")

    assert open_sealed(blob, svc) == {"a": 1} and unwraps() == 1  # cached DEK
    h.client("owner-a").revoke("node", "node-1")
    now[0] += 10.0  # the next poll sees the new epoch: cache and token dropped
    with pytest.raises(KeyReleaseDenied):
        open_sealed(blob, svc)
    assert len(attests) == 2
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(svc)
