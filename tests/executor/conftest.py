"""Fixtures for executor tests: a development key state, its embedded broker, and a simulated executor."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from enclave_actors.shim import ExecutorClient
from ray_confidential.domains import DomainPolicy
from ray_confidential.kbs.embedded import EmbeddedBroker
from ray_confidential.keyservice import DevKeyService
from ray_confidential.sealed.format import DomainPublicKey, seal
from ray_confidential.testing.tee_node import ExecutorProcess, start_executor, stop_executor

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Env:
    service: DevKeyService
    state_dir: Path
    executor: ExecutorProcess
    client: ExecutorClient
    broker: EmbeddedBroker

    def seal(self, value: Any, domain: str = "exec-a") -> bytes:
        d = self.service.descriptor(domain)
        return bytes(seal(value, DomainPublicKey(domain=domain, version=d.version, public_key=d.public_key)))

    def open(self, data: Any) -> Any:
        from ray_confidential.sealed import open_sealed

        return open_sealed(data, self.service)

    def audit(self) -> list[dict[str, Any]]:
        """The broker's audit records (the signed, chained log as written)."""
        return self.broker.audit_records()


def make_service(state_dir: Path) -> DevKeyService:
    service = DevKeyService(state_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        service.create_domain("exec-a")
        service.create_domain("exec-b")
        service.create_domain("strict", DomainPolicy(bundles=("00" * 32,)))
    return service


def launch(
    broker: EmbeddedBroker,
    *,
    tee: str = "sev-snp",
    trusted: bool = True,
    extra: tuple[str, ...] = (),
    wrapper: tuple[str, ...] = (),
) -> ExecutorProcess:
    folder = Path(tempfile.mkdtemp(prefix="rc-exec-test-"))
    return start_executor(node_id=os.urandom(28).hex(), tee=tee, socket_path=str(folder / "executor.sock"),
                          trusted=trusted, broker=broker,
                          extra_args=("--poll-interval", "0.3", "--broker-wait", "1", "--call-timeout", "20", *extra),
                          wrapper=wrapper)  # fmt: skip


def stop(ex: ExecutorProcess) -> None:
    stop_executor(ex)


def executor_start(socket_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``ray-confidential executor --socket DIR/s ARGS`` run to its end (for start-up refusals)."""
    cmd = [sys.executable, "-m", "enclave_actors.cli", "executor", "--socket", str(socket_dir / "s"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    state_dir = tmp_path_factory.mktemp("exec-state")
    service = make_service(state_dir)
    broker = EmbeddedBroker.start(state_dir)
    ex = launch(broker)
    try:
        yield Env(service, state_dir, ex, ExecutorClient(ex.socket), broker)
    finally:
        stop(ex)
        broker.stop()
