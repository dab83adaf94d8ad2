"""Fixtures for executor tests: a development key state, domains, and a simulated executor process."""

from __future__ import annotations

import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from enclave_actors.shim import ExecutorClient
from ray_confidential.domains import DomainPolicy
from ray_confidential.keyservice import DevKeyService
from ray_confidential.sealed.format import DomainPublicKey, seal
from ray_confidential.testing.tee_node import ExecutorProcess, start_executor


@dataclass
class Env:
    service: DevKeyService
    state_dir: Path
    executor: ExecutorProcess
    client: ExecutorClient

    def seal(self, value: Any, domain: str = "exec-a") -> bytes:
        d = self.service.descriptor(domain)
        return bytes(seal(value, DomainPublicKey(domain=domain, version=d.version, public_key=d.public_key)))

    def open(self, data: Any) -> Any:
        from ray_confidential.sealed import open_sealed

        return open_sealed(data, self.service)

    def audit(self) -> str:
        return Path(self.executor.audit_log).read_text() if os.path.exists(self.executor.audit_log) else ""


def make_service(state_dir: Path) -> DevKeyService:
    service = DevKeyService(state_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        service.create_domain("exec-a")
        service.create_domain("exec-b")
        service.create_domain("strict", DomainPolicy(bundles=("00" * 32,)))
    return service


def launch(
    state_dir: Path,
    *,
    tee: str = "sev-snp",
    trusted: bool = True,
    extra: tuple[str, ...] = (),
    wrapper: tuple[str, ...] = (),
) -> ExecutorProcess:
    folder = Path(tempfile.mkdtemp(prefix="rc-exec-test-"))
    return start_executor(node_id="ab" * 28, tee=tee, socket_path=str(folder / "executor.sock"), trusted=trusted,
                          state_dir=state_dir, extra_args=("--poll-interval", "0.3", "--broker-wait", "1",
                                                           "--call-timeout", "20", *extra),
                          wrapper=wrapper)  # fmt: skip


def stop(ex: ExecutorProcess) -> None:
    ex.process.terminate()
    try:
        ex.process.wait(5)
    except subprocess.TimeoutExpired:
        ex.process.kill()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    state_dir = tmp_path_factory.mktemp("exec-state")
    service = make_service(state_dir)
    ex = launch(state_dir)
    try:
        yield Env(service, state_dir, ex, ExecutorClient(ex.socket))
    finally:
        stop(ex)
