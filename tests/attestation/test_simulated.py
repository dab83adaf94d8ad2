"""SimulatedTEE and DevRootOfTrust: real formats, run-time roots, launch data, structure vs genuine."""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from ray_confidential.attestation import registry
from ray_confidential.attestation.attest import attest
from ray_confidential.attestation.binding import Binding
from ray_confidential.attestation.policy import AppraisalPolicy
from ray_confidential.attestation.profiles import DIRECT_PROFILE
from ray_confidential.attestation.trust import TrustConfig, fingerprint
from ray_confidential.testing.simulated import (
    LAUNCH_DATA_VERSION,
    DevRootOfTrust,
    SimulatedTEE,
    available_kinds,
    default_measurement,
)

KINDS = [k for k in available_kinds() if k in registry.available()]
B = Binding(nonce=b"\x07" * 32, executor_public_key=b"\x08" * 32, hpke_suite="X25519-HKDF-SHA256-AES-256-GCM",
            cluster_id="dev-cluster", bundle_digest=b"\x09" * 32)  # fmt: skip


def _attest(tee: SimulatedTEE, trust: TrustConfig) -> Any:
    return attest(tee.evidence(B), profile=DIRECT_PROFILE[tee.kind],
                  policy=AppraisalPolicy.from_measurements({tee.kind: [tee.measurement]}), trust=trust,
                  expected_binding=B)  # fmt: skip


def test_dev_root_of_trust_is_one_per_process() -> None:
    assert DevRootOfTrust.for_process() is DevRootOfTrust.for_process()


@pytest.mark.parametrize("kind", KINDS)
def test_launch_data_hands_the_dev_root_to_an_executor(kind: str) -> None:
    broker = DevRootOfTrust()
    trust = broker.trust_config([kind])
    assert trust.allows_test_roots
    launch = broker.to_launch_data([kind])
    assert launch[0] == LAUNCH_DATA_VERSION
    executor_side = DevRootOfTrust.from_launch_data(launch)
    tee = SimulatedTEE(kind, root=executor_side)
    assert fingerprint(tee.root_certificate) == fingerprint(broker.root(kind).root_certificate)
    assert _attest(tee, trust).tee == kind
    # Another broker's deployment does not trust it.
    with pytest.raises(Exception, match=r"(?i)root|chain|trust|allow"):
        _attest(tee, DevRootOfTrust().trust_config([kind]))


@pytest.mark.parametrize("kind", KINDS)
def test_untrusted_root_is_separate(kind: str) -> None:
    dev, other = SimulatedTEE(kind), SimulatedTEE(kind, root="untrusted")
    assert fingerprint(dev.root_certificate) != fingerprint(other.root_certificate)
    assert not DevRootOfTrust.for_process().trust_config([kind]).is_allowed_root(other.root_certificate)


@pytest.mark.parametrize(
    "data, match",
    [(b"", "version"), (b"\x02{}", "version"), (b"\x01not json", "JSON"), (b'\x01{"os": "AAAA"}', "unknown")],
)
def test_bad_launch_data_refused(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DevRootOfTrust.from_launch_data(data)


def test_dev_root_of_trust_refuses_pickling() -> None:
    with pytest.raises(TypeError, match="launch_data"):
        pickle.dumps(DevRootOfTrust())


def test_simulated_tee_argument_checks() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        SimulatedTEE("nvidia-gpu")
    with pytest.raises(ValueError, match="measurement must be"):
        SimulatedTEE("sev-snp", measurement=b"\x00" * 32)
    assert len(default_measurement("sgx")) == 32
    assert default_measurement("tdx") != default_measurement("sev-snp")


@pytest.mark.parametrize("kind", KINDS)
def test_simulated_evidence_is_fresh_per_binding(kind: str) -> None:
    tee = SimulatedTEE(kind)
    other = dataclasses.replace(B, nonce=b"\x06" * 32)
    assert tee.evidence(B).evidence != tee.evidence(other).evidence


# ---- structure: simulated evidence parses like genuine evidence -------------------------------------

# Fields allowed to differ in value AND presence: signature, chain, measurement, binding fields
# (and DCAP ``trailing``: the dcap-qvl TDX sample carries 70 bytes of padding after its quote).
EXEMPT = {
    "sev-snp": {"signature", "measurement", "report_data"},
    "nitro": {"signature", "certificate", "cabundle", "user_data", "nonce", "public_key", "payload", "pcrs"},
    "tdx": {"signature", "signature_data", "certification_data", "mr_td", "report_data", "trailing"},
    "sgx": {"signature", "signature_data", "certification_data", "mr_enclave", "report_data", "trailing"},
}


def _shape(value: Any, exempt: set[str]) -> Any:
    """Field names and value types (bytes: with length), recursively; exempt fields by name only."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (
            type(value).__name__,
            {
                f.name: ("exempt" if f.name in exempt else _shape(getattr(value, f.name), exempt))
                for f in dataclasses.fields(value)
            },
        )
    if isinstance(value, bytes):
        return ("bytes", len(value))
    if isinstance(value, Mapping):
        return ("mapping", {k: _shape(v, exempt) for k, v in value.items()})
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, [_shape(v, exempt) for v in value])
    return type(value).__name__


def _genuine(vectors: Path) -> list[tuple[str, bytes, dict[str, Any], Callable[[bytes], Any]]]:
    out: list[tuple[str, bytes, dict[str, Any], Callable[[bytes], Any]]] = []
    if "sev-snp" in KINDS:
        from ray_confidential.attestation.snp.abi import SNPReport

        virtee = bytes.fromhex((vectors / "sev-snp/virtee-sev/report_milan.hex").read_text().strip())
        out.append(("sev-snp", virtee, {"version": 2}, SNPReport.from_bytes))
        out.append(
            (
                "sev-snp",
                (vectors / "sev-snp/teekit/sev-gcp.bin").read_bytes(),
                {"version": 5},
                SNPReport.from_bytes,
            )
        )
    if "nitro" in KINDS:
        from ray_confidential.attestation.nitro import parse_document

        doc = (vectors / "nitro/EternisAI-remote-attestation-verifier/example_attestation").read_bytes()
        out.append(("nitro", doc, {}, parse_document))
    for kind, path in (("tdx", "tdx/dcap-qvl/tdx_quote"), ("sgx", "sgx-dcap/dcap-qvl/sgx_quote")):
        if kind in KINDS:
            from ray_confidential.attestation.dcap.abi import parse_quote

            out.append((kind, (vectors / path).read_bytes(), {}, parse_quote))
    return out


def test_simulated_evidence_parses_like_genuine_evidence(vectors: Path) -> None:
    cases = _genuine(vectors)
    if not cases:
        pytest.skip("no backend with a simulator is built")
    for kind, genuine, options, parse in cases:
        simulated = SimulatedTEE(kind, options=options).evidence(B).evidence
        want = _shape(parse(genuine), EXEMPT[kind])
        got = _shape(parse(simulated), EXEMPT[kind])
        assert got == want, (
            f"{kind} {options}: simulated evidence differs in structure from the genuine sample"
        )


def test_simulated_and_genuine_pass_the_same_verifier(vectors: Path) -> None:
    """One verification path: the genuine Milan report verifies with the same backend under production."""
    if "sev-snp" not in KINDS:
        pytest.skip("sev-snp backend not built")
    from ray_confidential.attestation.snp import verify_evidence

    base = vectors / "sev-snp/virtee-sev"
    claims = verify_evidence(
        bytes.fromhex((base / "report_milan.hex").read_text().strip()),
        trust=TrustConfig.production(),
        certs=[(base / "vcek_milan.der").read_bytes(), (base / "cert_chain_milan").read_bytes()],
        now=datetime(2024, 6, 1, tzinfo=timezone.utc),
    )
    assert claims.tee == "sev-snp" and not claims.debug
    simulated = SimulatedTEE("sev-snp").evidence(B)
    sim_claims = verify_evidence(simulated.evidence, trust=DevRootOfTrust.for_process().trust_config(["sev-snp"]),
                                 certs=simulated.certs, now=datetime.now(timezone.utc))  # fmt: skip
    assert set(sim_claims.details) == set(claims.details)
    assert set(sim_claims.measurements) == set(claims.measurements)
