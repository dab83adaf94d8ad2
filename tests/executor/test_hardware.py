"""The executor's hardware evidence path (enclave_actors.hardware): which guest interface serves which
TEE, evidence collected through an emulated configfs-tsm that the real development broker accepts,
collection failures that give the broker nothing, and the CLI refusing to start without a device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclave_actors.daemon import Executor
from enclave_actors.hardware import choose_interface, hardware_evidence
from enclave_actors.keys import KBSKeyReleaser, LaunchData, NodeFacts
from ray_confidential.attestation.binding import Binding
from ray_confidential.bundle import from_callable
from ray_confidential.errors import AttestationError, KeyReleaseDenied
from ray_confidential.kbs.embedded import EmbeddedBroker
from ray_confidential.sealed.format import DomainPublicKey, SealedHeader, open_with_dek, seal
from ray_confidential.testing.simulated import DevRootOfTrust
from tests.attestation.fake_kernel import FakeTSM, snp_maker
from tests.executor import conf_funcs
from tests.executor.conftest import executor_start, make_service

TOTAL = from_callable(conf_funcs.total)
B = Binding(nonce=b"\x01" * 32, executor_public_key=b"\x02" * 32, hpke_suite="x25519", cluster_id="c",
            bundle_digest=b"\x03" * 32)  # fmt: skip


def _tree(root: Path, *paths: str) -> Path:
    for p in paths:
        target = root / p
        if p.endswith("/"):
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"")
    return root


def test_each_tee_kind_uses_its_guest_interfaces(tmp_path: Path) -> None:
    both = _tree(tmp_path / "both", "sys/kernel/config/tsm/report/", "dev/sev-guest")
    old_snp = _tree(tmp_path / "old", "dev/sev-guest")
    assert choose_interface("sev-snp", root=both) == "configfs-tsm"
    assert choose_interface("sev-snp", root=old_snp) == "sev-guest"
    assert choose_interface("tdx", root=both) == "configfs-tsm"
    assert choose_interface("nitro", root=_tree(tmp_path / "nitro", "dev/nsm")) == "nsm"
    assert choose_interface("sgx", root=_tree(tmp_path / "sgx", "dev/attestation/quote")) == "gramine"
    with pytest.raises(ValueError, match="looked for configfs-tsm"):
        choose_interface("tdx", root=old_snp)  # TDX has no /dev/sev-guest
    with pytest.raises(ValueError, match="cannot attest a sev-snp guest"):
        choose_interface("sev-snp", "nsm")
    with pytest.raises(ValueError, match="no guest attestation interface"):
        choose_interface("nvidia-gpu")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[EmbeddedBroker, Any]]:
    service = make_service(tmp_path / "state")
    broker = EmbeddedBroker.start(tmp_path / "state")
    try:
        yield broker, service
    finally:
        broker.stop()


def _executor(broker: EmbeddedBroker, evidence: Any) -> tuple[Executor, KBSKeyReleaser]:
    launch = LaunchData.from_file(broker.launch_path)
    facts = NodeFacts(tee="sev-snp", node_id="cd" * 28, cluster_id=launch.cluster_id, pool="p", region="r")
    releaser = KBSKeyReleaser(launch.connect, facts=facts, evidence=evidence)
    return Executor(releaser, facts), releaser


def test_evidence_from_configfs_tsm_gets_keys_from_the_broker(broker: Any, tmp_path: Path) -> None:
    """The executor's evidence comes from the (emulated) kernel's configfs-tsm, with the certificate
    table the host provides; the broker appraises it as hardware evidence and releases the key."""
    b, service = broker
    tsm = tmp_path / "tsm"
    tsm.mkdir()
    ops = FakeTSM("sev_guest", snp_maker(DevRootOfTrust.for_process().root("sev-snp")))
    executor, releaser = _executor(b, hardware_evidence("sev-snp", "configfs-tsm", base=tsm, ops=ops))
    try:
        d = service.descriptor("exec-a")
        sealed = bytes(
            seal(np.arange(4.0), DomainPublicKey(domain="exec-a", version=d.version, public_key=d.public_key))
        )
        _, deks = executor._keys(TOTAL.digest, ("exec-a",), [SealedHeader.parse(sealed)])
        assert open_with_dek(sealed, deks[0], allow_pickle=False).sum() == 6.0
    finally:
        releaser.close()
    assert ops.instances and ops.removed == ops.instances and not any(tsm.iterdir())
    assert ("privlevel", b"0") in ops.writes  # the VMPL is written deliberately


def test_a_failed_or_foreign_collection_gives_the_broker_nothing(broker: Any, tmp_path: Path) -> None:
    b, service = broker
    tsm = tmp_path / "tsm"
    tsm.mkdir()
    maker = snp_maker(DevRootOfTrust.for_process().root("sev-snp"))
    racing = hardware_evidence(
        "sev-snp", "configfs-tsm", base=tsm, ops=FakeTSM("sev_guest", maker, interfere=True)
    )
    with pytest.raises(AttestationError, match="another writer"):
        racing(B)
    foreign = hardware_evidence(
        "sev-snp", "configfs-tsm", base=tsm, ops=FakeTSM("tdx_guest", maker, privlevel_floor=None)
    )
    with pytest.raises(AttestationError):
        foreign(B)  # a TDX provider cannot answer for an SNP node (nor take its privlevel)
    executor, releaser = _executor(b, racing)
    try:
        d = service.descriptor("exec-a")
        sealed = bytes(
            seal(np.ones(2), DomainPublicKey(domain="exec-a", version=d.version, public_key=d.public_key))
        )
        with pytest.raises(KeyReleaseDenied, match="attestation failed"):
            executor._keys(TOTAL.digest, ("exec-a",), [SealedHeader.parse(sealed)])
    finally:
        releaser.close()
    assert not any(r["event"] == "attest" and r["decision"] == "grant" for r in b.audit_records())


def test_the_executor_refuses_to_start_without_an_attestation_device(tmp_path: Path) -> None:
    """Without development roots it needs this TEE's guest interface; this machine has none."""
    from ray_confidential.kbs.config import public_pem
    from ray_confidential.kbs.tokens import new_signing_key

    key = tmp_path / "release.pem"
    key.write_bytes(public_pem(new_signing_key()))
    base = ("--tee", "tdx", "--node-id", "ab" * 28, "--kbs", "127.0.0.1:1", "--release-key", str(key))
    auto = executor_start(tmp_path, *base)
    assert auto.returncode == 2 and "no attestation interface for tdx" in auto.stderr
    simulated = executor_start(tmp_path, *base, "--attestation", "simulated")
    assert simulated.returncode == 2 and "needs development roots" in simulated.stderr
    wrong = executor_start(tmp_path, *base, "--attestation", "nsm")
    assert wrong.returncode == 2 and "cannot attest a tdx guest" in wrong.stderr
    assert not (tmp_path / "s").exists()
