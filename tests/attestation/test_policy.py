"""AppraisalPolicy: one door for serialised policies, mandatory pins, inspection, the docs example."""

from __future__ import annotations

import dataclasses
import pickle
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from ray_confidential.attestation import registry
from ray_confidential.attestation.attest import appraise
from ray_confidential.attestation.binding import Binding
from ray_confidential.attestation.evidence import Evidence
from ray_confidential.attestation.policy import INSPECTION_SETTINGS, MEASUREMENT_KEYS, AppraisalPolicy
from ray_confidential.attestation.reference import UNSAFE_ANY_MEASUREMENT
from ray_confidential.attestation.trust import TrustConfig
from ray_confidential.testing.simulated import (
    MEASUREMENT_SIZES,
    DevRootOfTrust,
    SimulatedTEE,
    available_kinds,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "attestation-policy.md"
AVAILABLE = list(registry.available())


def _doc_example() -> dict[str, Any]:
    (block,) = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    data = yaml.safe_load(block)
    data["tees"] = {k: v for k, v in data["tees"].items() if k in AVAILABLE}
    return data


def test_docs_example_loads_and_is_pinned() -> None:
    policy = AppraisalPolicy.from_dict(_doc_example())
    assert policy.name == "example-prod"
    assert set(policy.tees) == set(_doc_example()["tees"])
    assert policy.pinned
    for tee, section in policy.tees.items():
        assert isinstance(section, registry.backend(tee).Policy)


def test_from_yaml_text_and_path_agree(tmp_path: Path) -> None:
    text = yaml.safe_dump(_doc_example())
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    assert AppraisalPolicy.from_yaml(text) == AppraisalPolicy.from_yaml(path)


def _genuine(vectors: Path) -> dict[str, tuple[Evidence, datetime]]:
    v = vectors
    out: dict[str, tuple[Evidence, datetime]] = {}
    base = v / "sev-snp/virtee-sev"
    out["sev-snp"] = (
        Evidence(tee="sev-snp", evidence=bytes.fromhex((base / "report_milan.hex").read_text().strip()),
                 certs=((base / "vcek_milan.der").read_bytes(), (base / "cert_chain_milan").read_bytes())),
        datetime(2024, 6, 1, tzinfo=timezone.utc),
    )  # fmt: skip
    out["nitro"] = (
        Evidence(
            tee="nitro",
            evidence=(v / "nitro/EternisAI-remote-attestation-verifier/example_attestation").read_bytes(),
        ),
        datetime(2024, 9, 6, 5, 0, tzinfo=timezone.utc),
    )
    nv = v / "nvidia-gpu/nvtrust"
    out["nvidia-gpu"] = (
        Evidence(tee="nvidia-gpu", evidence=(nv / "hopperAttestationReport.txt").read_bytes(),
                 certs=((nv / "hopperCertChain.txt").read_bytes(),)),
        datetime(2024, 6, 1, tzinfo=timezone.utc),
    )  # fmt: skip
    return out


def test_docs_example_accepts_the_genuine_samples_it_pins(vectors: Path) -> None:
    policy = AppraisalPolicy.from_dict(_doc_example())
    checked = []
    for tee, (evidence, now) in _genuine(vectors).items():
        if tee not in policy.tees:
            continue
        _, violations = appraise(evidence, policy=policy, trust=TrustConfig.production(), now=now)
        fields = [v.field for v in violations]
        if tee == "nitro":  # the sample comes from a DEBUG enclave (PCR0..2 zero): refused, and only for that
            assert fields and set(fields) <= {"debug", "pcr0"}
        else:
            assert violations == [], (tee, violations)
        checked.append(tee)
    assert "sev-snp" in checked


def test_wrong_vmpl_under_docs_policy_refused(vectors: Path) -> None:
    if "sev-snp" not in AVAILABLE:
        pytest.skip("sev-snp backend not built")
    example = _doc_example()
    example["tees"] = {"sev-snp": {**example["tees"]["sev-snp"], "vmpl": 1}}
    evidence, now = _genuine(vectors)["sev-snp"]
    _, violations = appraise(
        evidence, policy=AppraisalPolicy.from_dict(example), trust=TrustConfig.production(), now=now
    )
    assert [(v.field, v.got, v.want) for v in violations] == [("vmpl", "0", "1")]


@pytest.mark.parametrize(
    "data, match",
    [
        ({"version": 1, "tees": {}}, "empty 'tees' allow-list"),
        ({"version": 2, "tees": {"sev-snp": {}}}, "'version' must be 1"),
        ({"tees": {"sev-snp": {}}}, "'version' must be 1"),
        ({"version": 1, "tees": {"sev-snp": {}}, "extra": 1}, "unknown keys"),
        ({"version": 1, "tees": {"sev": {"measurements": ["00" * 48]}}}, "unknown TEE kind 'sev'"),
        ({"version": 1, "tees": ["sev-snp"]}, "'tees' must be a mapping"),
        ({"version": 1, "tees": {"sev-snp": ["00" * 48]}}, "must be a mapping"),
        ({"version": 1, "tees": {"sev-snp": {"measurements": []}}}, "empty measurement allow-list"),
        ({"version": 1, "tees": {"sev-snp": {}}}, "measurements"),
        ({"version": 1, "tees": {"sev-snp": {"measurements": ["00" * 48], "vmpll": 0}}}, "unknown"),
        (
            {"version": 1, "name": 3, "tees": {"sev-snp": {"measurements": ["00" * 48]}}},
            "'name' must be a string",
        ),
        ("not a mapping", "expected a mapping"),
    ],
)
def test_malformed_policies_refused(data: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AppraisalPolicy.from_dict(data)


def test_invalid_yaml_refused() -> None:
    with pytest.raises(ValueError, match="not valid YAML"):
        AppraisalPolicy.from_yaml("tees: [unclosed")


@pytest.mark.parametrize("tee", AVAILABLE)
def test_unsafe_any_measurement_warns_and_is_not_pinned(tee: str) -> None:
    with pytest.warns(UserWarning, match="UNSAFE_ANY_MEASUREMENT"):
        policy = AppraisalPolicy.from_dict(
            {"version": 1, "tees": {tee: {MEASUREMENT_KEYS[tee]: "UNSAFE_ANY"}}}
        )
    assert not policy.pinned
    assert getattr(policy.tees[tee], MEASUREMENT_KEYS[tee]) is UNSAFE_ANY_MEASUREMENT


def test_from_measurements() -> None:
    policy = AppraisalPolicy.from_measurements({"sev-snp": [b"\x01" * 48]})
    assert policy.pinned and policy.tees["sev-snp"].measurements == frozenset({b"\x01" * 48})
    with pytest.raises(ValueError, match="empty measurement allow-list"):
        AppraisalPolicy.from_measurements({"sev-snp": []})


def test_inspection_policy() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inspection() itself does not warn
        policy = AppraisalPolicy.inspection()
    assert policy.name == "inspection" and not policy.pinned
    assert set(policy.tees) == set(AVAILABLE)
    if "sev-snp" in policy.tees:
        assert policy.tees["sev-snp"].vmpl is None  # any VMPL
    for section in policy.tees.values():
        assert section.allow_debug is False  # debug refused
    dev = DevRootOfTrust.for_process()
    binding = Binding(nonce=bytes(32), executor_public_key=b"k", hpke_suite="X25519-HKDF-SHA256-AES-256-GCM",
                      cluster_id="c", bundle_digest=bytes(32))  # fmt: skip
    for tee in available_kinds():
        _, violations = appraise(SimulatedTEE(tee, debug=True).evidence(binding), policy=policy,
                                 trust=dev.trust_config([tee]), now=datetime.now(timezone.utc))  # fmt: skip
        assert [v.field for v in violations] == ["debug"], tee
        _, violations = appraise(SimulatedTEE(tee, measurement=b"\x42" * MEASUREMENT_SIZES[tee]).evidence(binding),
                                 policy=policy, trust=dev.trust_config([tee]), now=datetime.now(timezone.utc))  # fmt: skip
        assert violations == [], tee  # any measurement
    assert set(INSPECTION_SETTINGS) == set(MEASUREMENT_KEYS)


def test_policy_is_frozen_and_pickles() -> None:
    policy = AppraisalPolicy.from_measurements({"sev-snp": [b"\x01" * 48]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.tees["tdx"] = None  # type: ignore[index]
    assert pickle.loads(pickle.dumps(policy)) == policy


def test_wrong_policy_class_refused() -> None:
    snp_policy = AppraisalPolicy.from_measurements({"sev-snp": [b"\x01" * 48]}).tees["sev-snp"]
    other = next(t for t in AVAILABLE if t != "sev-snp")
    with pytest.raises(TypeError, match=f"the policy for '{other}' must be"):
        AppraisalPolicy(tees={other: snp_policy})
    with pytest.raises(ValueError, match="empty"):
        AppraisalPolicy(tees={})
