"""The broker's gRPC server: TLS (mutual TLS for owners), health service, graceful shutdown.

    server = KBSServer(broker, address="127.0.0.1:0", tls=TLSFiles(cert, key, client_ca),
                       owner_address="127.0.0.1:0")  # doctest: +SKIP
    port = server.start(); ...; server.stop(grace=5)

Two listeners: ``address`` for executors and drivers (server-authenticated TLS), ``owner_address`` for
owners (mutual TLS: a client certificate issued by ``client_ca`` is required; its subject is the owner).
gRPC offers no "request but do not require" client-certificate mode, hence two ports. Owner RPCs that
arrive without a verified certificate are refused. Without TLS the server binds only loopback
addresses (the development broker); anything else is refused.
The standard ``grpc.health.v1`` service answers SERVING for service "" once the broker is ready and
NOT_SERVING while it shuts down.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass
from types import FrameType
from typing import Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ray_confidential.kbs.broker import Broker
from ray_confidential.kbs.proto import kbs_pb2_grpc
from ray_confidential.kbs.ratelimit import RateLimiter
from ray_confidential.kbs.service import KeyBrokerService
from ray_confidential.kbs.statement_feed import StatementFeed

log = logging.getLogger("ray_confidential.kbs")

MAX_MESSAGE: Final = 4 << 20
LOOPBACK_NAMES: Final = ("localhost",)
DEFAULT_WORKERS: Final = 8
CHANNEL_OPTIONS: Final = (("grpc.http2.bdp_probe", 0),)
"""HTTP/2 options of both ends. Broker messages are small (a few KiB, evidence aside), so
bandwidth-delay probing buys nothing; its PING frames only add wake-ups (docs/kbs.md "Benchmark")."""


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM bytes: server certificate chain and key; ``client_ca`` verifies owner certificates on the
    owner listener."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address must be HOST:PORT, got {address!r}")
    return host, int(port)


class KBSServer:
    """A running key broker.

    Args:
        broker: the decisions.
        address: ``HOST:PORT`` (port 0 picks one).
        owner_address: ``HOST:PORT`` of the mutual-TLS owner listener (needs ``tls.client_ca``), or None.
        tls: certificates, or None for plaintext (loopback only).
        limiter: per-client rate limits (None: unlimited).
        secrets: named secrets ``(domain, name) -> bytes`` served by ``Release``.
        dev_owner: identity of certificate-less callers for owner RPCs (development broker only).
        max_workers: gRPC handler threads. Few suffice: handlers hold the GIL except while they wait
            for the audit fsync (group commit batches those waits); many threads only add GIL
            hand-offs (docs/kbs.md "Benchmark").
        feed: the trust-registry statement feed served by ``GetStatements`` (None: UNIMPLEMENTED).
    """

    def __init__(
        self,
        broker: Broker,
        *,
        address: str,
        tls: TLSFiles | None,
        owner_address: str | None = None,
        limiter: RateLimiter | None = None,
        secrets: Mapping[tuple[str, str], bytes] | None = None,
        dev_owner: str | None = None,
        max_workers: int = DEFAULT_WORKERS,
        feed: StatementFeed | None = None,
    ) -> None:
        host, _ = split_address(address)
        if tls is None and not is_loopback(host):
            raise ValueError(
                f"refusing to serve plaintext gRPC on {host!r}: without TLS the broker binds only "
                "127.0.0.1 (configure tls: cert/key to listen elsewhere)"
            )
        if owner_address is not None:
            split_address(owner_address)
            if tls is None or tls.client_ca is None:
                raise ValueError("the owner listener needs tls with client_ca (owners use mutual TLS)")
        if dev_owner is not None and broker.settings.production:
            raise ValueError("a production broker has no certificate-less owner")
        self.broker, self.address, self.tls, self.owner_address = broker, address, tls, owner_address
        self.feed = feed
        self.health = health.HealthServicer()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kbs"),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.so_reuseport", 0),
                *CHANNEL_OPTIONS,
            ],
        )
        kbs_pb2_grpc.add_KeyBrokerServicer_to_server(  # type: ignore[no-untyped-call]
            KeyBrokerService(broker, limiter=limiter, secrets=secrets, dev_owner=dev_owner, feed=feed),
            self._server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = 0
        self.owner_port = 0
        self._stopped = threading.Event()

    def start(self) -> int:
        """Bind and serve; returns the port. Health turns SERVING."""
        if self.tls is None:
            self.port = self._server.add_insecure_port(self.address)
        else:
            creds = grpc.ssl_server_credentials(
                [(self.tls.private_key, self.tls.cert_chain)],
                root_certificates=self.tls.client_ca,
            )
            self.port = self._server.add_secure_port(self.address, creds)
            if self.owner_address is not None:
                owner_creds = grpc.ssl_server_credentials(
                    [(self.tls.private_key, self.tls.cert_chain)],
                    root_certificates=self.tls.client_ca,
                    require_client_auth=True,
                )
                self.owner_port = self._server.add_secure_port(self.owner_address, owner_creds)
                if self.owner_port == 0:
                    raise OSError(f"could not bind {self.owner_address}")
        if self.port == 0:
            raise OSError(f"could not bind {self.address}")
        self._server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("key broker serving on %s (port %d, %s)", self.address, self.port,
                 "TLS" if self.tls else "PLAINTEXT")  # fmt: skip
        return self.port

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls, let running ones finish within ``grace`` seconds."""
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()

    def install_signal_handlers(self, grace: float = 5.0) -> None:
        """SIGTERM / SIGINT -> graceful :meth:`stop` (from a helper thread, not the signal frame)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: shutting down gracefully", signum)
            threading.Thread(target=self.stop, args=(grace,), daemon=True).start()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


__all__ = ["CHANNEL_OPTIONS", "DEFAULT_WORKERS", "KBSServer", "TLSFiles", "is_loopback", "split_address"]
