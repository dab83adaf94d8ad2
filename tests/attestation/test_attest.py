"""attest(): profile lookup, verification, binding, validation, end to end over real formats.

Simulated TEEs emit the real evidence formats and run through the real backends; a tiny fake
backend (fake_backend.py) stands in for kinds whose backend is not built.
"""

from __future__ import annotations

import dataclasses
import warnings
from datetime import datetime, timedelta, timezone

import fake_backend
import pytest

from ray_confidential.attestation import registry
from ray_confidential.attestation.attest import appraise, attest
from ray_confidential.attestation.binding import Binding
from ray_confidential.attestation.evidence import Evidence
from ray_confidential.attestation.policy import MEASUREMENT_KEYS, AppraisalPolicy
from ray_confidential.attestation.profiles import DIRECT_PROFILE, ProfileNotSupportedError
from ray_confidential.attestation.trust import TrustConfig
from ray_confidential.errors import AttestationError, EvidenceFormatError, PolicyViolation
from ray_confidential.testing.simulated import DevRootOfTrust, SimulatedTEE, available_kinds

KINDS = [k for k in available_kinds() if k in registry.available()]
MEASUREMENT_FIELD = {"sev-snp": "measurement", "tdx": "mr_td", "sgx": "mr_enclave", "nitro": "pcr0"}


def binding(**overrides: object) -> Binding:
    fields: dict[str, object] = {
        "nonce": b"\x5a" * 32,
        "executor_public_key": b"\x01" * 32,
        "hpke_suite": "X25519-HKDF-SHA256-AES-256-GCM",
        "cluster_id": "cluster-a",
        "bundle_digest": b"\x02" * 32,
    }
    fields.update(overrides)
    return Binding(**fields)  # type: ignore[arg-type]


def pinned(kind: str, *measurements: bytes) -> AppraisalPolicy:
    return AppraisalPolicy.from_measurements({kind: measurements})


@pytest.fixture(scope="module")
def dev_trust() -> TrustConfig:
    return DevRootOfTrust.for_process().trust_config(KINDS)


def _attest(tee: SimulatedTEE, policy: AppraisalPolicy, trust: TrustConfig, expected: Binding | None = None,
            evidence_binding: Binding | None = None, **kw: object) -> object:  # fmt: skip
    ev = tee.evidence(evidence_binding or binding())
    return attest(ev, profile=DIRECT_PROFILE[tee.kind], policy=policy, trust=trust,
                  expected_binding=expected or binding(), **kw)  # type: ignore[arg-type]  # fmt: skip


# ---- real formats, real backends ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_simulated_evidence_attests_under_dev_trust(kind: str, dev_trust: TrustConfig) -> None:
    tee = SimulatedTEE(kind)
    claims = _attest(tee, pinned(kind, tee.measurement), dev_trust)
    assert claims.tee == kind  # type: ignore[attr-defined]
    assert claims.measurements[MEASUREMENT_FIELD[kind]] == tee.measurement  # type: ignore[attr-defined]
    assert claims.report_data == binding().report_data()  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "other",
    [
        {"executor_public_key": b"\x03" * 32},
        {"nonce": b"\x5b" * 32},
        {"cluster_id": "someone-elses-cluster"},
        {"bundle_digest": b"\x04" * 32},
        {"hpke_suite": "P256-HKDF-SHA256-AES-128-GCM"},
    ],
    ids=["another_key", "another_nonce", "another_cluster", "another_bundle", "another_suite"],
)
def test_report_data_binding_another_session_refused(
    kind: str, other: dict[str, object], dev_trust: TrustConfig
) -> None:
    tee = SimulatedTEE(kind)
    with pytest.raises(AttestationError, match="does not commit to the expected binding"):
        _attest(tee, pinned(kind, tee.measurement), dev_trust, evidence_binding=binding(**other))


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_measurement_under_trusted_root_names_field_got_want(kind: str, dev_trust: TrustConfig) -> None:
    tee = SimulatedTEE(kind)
    approved = bytes(len(tee.measurement))
    with pytest.raises(PolicyViolation) as info:
        _attest(tee, pinned(kind, approved), dev_trust)
    (violation,) = info.value.violations
    assert violation.field == MEASUREMENT_FIELD[kind]
    assert violation.got == tee.measurement.hex()
    assert approved.hex() in violation.want


@pytest.mark.parametrize("kind", KINDS)
def test_test_root_under_production_trust_refused(kind: str) -> None:
    tee = SimulatedTEE(kind)
    with pytest.raises(AttestationError):
        _attest(tee, pinned(kind, tee.measurement), TrustConfig.production())


@pytest.mark.parametrize("kind", KINDS)
def test_untrusted_root_refused_under_dev_trust(kind: str, dev_trust: TrustConfig) -> None:
    tee = SimulatedTEE(kind, root="untrusted")
    with pytest.raises(AttestationError):
        _attest(tee, pinned(kind, tee.measurement), dev_trust)


@pytest.mark.parametrize("kind", KINDS)
def test_debug_tee_refused(kind: str, dev_trust: TrustConfig) -> None:
    tee = SimulatedTEE(kind, debug=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = AppraisalPolicy.inspection([kind])
    with pytest.raises(PolicyViolation) as info:
        _attest(tee, policy, dev_trust)
    assert "debug" in [v.field for v in info.value.violations]


@pytest.mark.parametrize("kind", KINDS)
def test_policy_without_this_tee_refused(kind: str, dev_trust: TrustConfig) -> None:
    other = next(k for k in registry.available() if k != kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = AppraisalPolicy.inspection([other])
    with pytest.raises(PolicyViolation) as info:
        _attest(SimulatedTEE(kind), policy, dev_trust)
    assert info.value.violations[0].field == "tee"
    assert info.value.violations[0].got == kind


@pytest.mark.skipif("nitro" not in KINDS, reason="nitro backend or simulator not built")
def test_nitro_nonce_from_another_session_refused(dev_trust: TrustConfig) -> None:
    from ray_confidential.testing import nitro_fake

    root = DevRootOfTrust.for_process().root("nitro")
    tee = SimulatedTEE("nitro")
    fake = nitro_fake.build_evidence(root, report_data=binding().report_data(), measurement=tee.measurement,
                                     nonce=b"\x5b" * 32)  # fmt: skip
    with pytest.raises(AttestationError, match="nonce is not this session's challenge"):
        attest(Evidence.from_fake(fake), profile="nitro", policy=pinned("nitro", tee.measurement), trust=dev_trust,
               expected_binding=binding())  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_certificates_expired_at_a_later_now_refused(kind: str, dev_trust: TrustConfig) -> None:
    tee = SimulatedTEE(kind)
    later = datetime.now(timezone.utc) + timedelta(days=365 * 40)
    with pytest.raises(AttestationError):
        _attest(tee, pinned(kind, tee.measurement), dev_trust, now=later)


def test_genuine_snp_report_verifies_then_fails_the_binding(vectors: object) -> None:
    if "sev-snp" not in registry.available():
        pytest.skip("sev-snp backend not built")
    base = vectors / "sev-snp" / "virtee-sev"  # type: ignore[operator]
    ev = Evidence(
        tee="sev-snp",
        evidence=bytes.fromhex((base / "report_milan.hex").read_text().strip()),
        certs=((base / "vcek_milan.der").read_bytes(), (base / "cert_chain_milan").read_bytes()),
    )
    now = datetime(2024, 6, 1, tzinfo=timezone.utc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = AppraisalPolicy.inspection(["sev-snp"])
    claims, violations = appraise(ev, policy=policy, trust=TrustConfig.production(), now=now)
    assert violations == []
    assert claims.measurements["measurement"].hex().startswith("7a1e5c266c0108db")
    with pytest.raises(AttestationError, match="does not commit"):
        attest(ev, profile="snp-direct", policy=policy, trust=TrustConfig.production(), expected_binding=binding(),
               now=now)  # fmt: skip


# ---- the layer itself, on a fake backend -----------------------------------------------------------


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> fake_backend.FakeRoot:
    fake_backend.install(monkeypatch, "sev-snp", "nitro", "nvidia-gpu")
    return fake_backend.FakeRoot()


def _fake_policy(*tees: str) -> AppraisalPolicy:
    return AppraisalPolicy.from_dict({"version": 1, "tees": {t: {"measurements": ["11" * 48]} for t in tees}})


def test_fake_backend_attests(fake: fake_backend.FakeRoot) -> None:
    data, cert = fake.evidence("sev-snp", report_data=binding().report_data())
    claims = attest(Evidence(tee="sev-snp", evidence=data, certs=(cert,)), profile="snp-direct",
                    policy=_fake_policy("sev-snp"), trust=TrustConfig.development([fake.root_certificate]),
                    expected_binding=binding())  # fmt: skip
    assert claims.tee == "sev-snp"


def _composite(fake: fake_backend.FakeRoot, cpu: Binding, *gpus: Binding) -> Evidence:
    data, cert = fake.evidence("sev-snp", report_data=cpu.report_data())
    gpu_evidence = []
    for b in gpus:
        g, c = fake.evidence("nvidia-gpu", report_data=b.gpu_nonce())
        gpu_evidence.append(Evidence(tee="nvidia-gpu", evidence=g, certs=(c,)))
    return Evidence(tee="sev-snp", evidence=data, certs=(cert,), gpus=tuple(gpu_evidence))


def test_composite_gpu_bound_to_this_session_accepted(fake: fake_backend.FakeRoot) -> None:
    ev = _composite(fake, binding(), binding(), binding())
    claims = attest(ev, profile="nvidia-gpu", policy=_fake_policy("sev-snp", "nvidia-gpu"),
                    trust=TrustConfig.development([fake.root_certificate]), expected_binding=binding())  # fmt: skip
    assert [g.tee for g in claims.details["gpus"]] == ["nvidia-gpu", "nvidia-gpu"]


def test_gpu_nonce_from_another_session_refused(fake: fake_backend.FakeRoot) -> None:
    ev = _composite(fake, binding(), binding(), binding(nonce=b"\x77" * 32))
    with pytest.raises(AttestationError, match="GPU 1: SPDM nonce is not derived from this session"):
        attest(ev, profile="nvidia-gpu", policy=_fake_policy("sev-snp", "nvidia-gpu"),
               trust=TrustConfig.development([fake.root_certificate]), expected_binding=binding())  # fmt: skip


def test_gpu_violations_are_prefixed(fake: fake_backend.FakeRoot) -> None:
    data, cert = fake.evidence("sev-snp", report_data=binding().report_data())
    g, c = fake.evidence("nvidia-gpu", report_data=binding().gpu_nonce(), debug=True)
    ev = Evidence(
        tee="sev-snp",
        evidence=data,
        certs=(cert,),
        gpus=(Evidence(tee="nvidia-gpu", evidence=g, certs=(c,)),),
    )
    with pytest.raises(PolicyViolation) as info:
        attest(ev, profile="nvidia-gpu", policy=_fake_policy("sev-snp", "nvidia-gpu"),
               trust=TrustConfig.development([fake.root_certificate]), expected_binding=binding())  # fmt: skip
    assert [v.field for v in info.value.violations] == ["gpus[0].debug"]


def test_composite_without_gpus_refused(fake: fake_backend.FakeRoot) -> None:
    ev = _composite(fake, binding())
    with pytest.raises(EvidenceFormatError, match="at least one GPU"):
        attest(ev, profile="nvidia-gpu", policy=_fake_policy("sev-snp", "nvidia-gpu"),
               trust=TrustConfig.development([fake.root_certificate]), expected_binding=binding())  # fmt: skip


def test_gpus_under_a_direct_profile_refused(fake: fake_backend.FakeRoot) -> None:
    ev = _composite(fake, binding(), binding())
    with pytest.raises(EvidenceFormatError, match="takes no GPU evidence"):
        attest(ev, profile="snp-direct", policy=_fake_policy("sev-snp", "nvidia-gpu"),
               trust=TrustConfig.development([fake.root_certificate]), expected_binding=binding())  # fmt: skip


def test_nitro_profile_checks_user_data_and_nonce(fake: fake_backend.FakeRoot) -> None:
    trust = TrustConfig.development([fake.root_certificate])
    ok, cert = fake.evidence("nitro", report_data=binding().report_data(), nonce=binding().nonce)
    attest(Evidence(tee="nitro", evidence=ok, certs=(cert,)), profile="nitro", policy=_fake_policy("nitro"),
           trust=trust, expected_binding=binding())  # fmt: skip
    relayed, cert = fake.evidence("nitro", report_data=binding().report_data(), nonce=b"\x00" * 32)
    with pytest.raises(AttestationError, match="nonce"):
        attest(Evidence(tee="nitro", evidence=relayed, certs=(cert,)), profile="nitro", policy=_fake_policy("nitro"),
               trust=trust, expected_binding=binding())  # fmt: skip
    no_nonce, cert = fake.evidence("nitro", report_data=binding().report_data())
    with pytest.raises(AttestationError, match="nonce"):
        attest(Evidence(tee="nitro", evidence=no_nonce, certs=(cert,)), profile="nitro", policy=_fake_policy("nitro"),
               trust=trust, expected_binding=binding())  # fmt: skip


def test_wrong_signature_stops_before_binding_and_policy(fake: fake_backend.FakeRoot) -> None:
    data, cert = fake.evidence("sev-snp", report_data=b"\x00" * 64, measurement=b"\x22" * 48)
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(AttestationError, match="bad signature"):
        attest(Evidence(tee="sev-snp", evidence=tampered, certs=(cert,)), profile="snp-direct",
               policy=_fake_policy("sev-snp"), trust=TrustConfig.development([fake.root_certificate]),
               expected_binding=binding())  # fmt: skip


def test_binding_checked_before_policy(fake: fake_backend.FakeRoot) -> None:
    data, cert = fake.evidence("sev-snp", report_data=b"\x00" * 64, measurement=b"\x22" * 48)
    with pytest.raises(AttestationError, match="does not commit"):
        attest(Evidence(tee="sev-snp", evidence=data, certs=(cert,)), profile="snp-direct",
               policy=_fake_policy("sev-snp"), trust=TrustConfig.development([fake.root_certificate]),
               expected_binding=binding())  # fmt: skip


@pytest.mark.parametrize("profile", ["snp-azure-vtpm", "tdx-azure-vtpm"])
def test_azure_vtpm_profiles_not_yet_supported(profile: str, fake: fake_backend.FakeRoot) -> None:
    data, cert = fake.evidence("sev-snp", report_data=binding().report_data())
    with pytest.raises(ProfileNotSupportedError, match="not yet supported"):
        attest(Evidence(tee="sev-snp", evidence=data, certs=(cert,)), profile=profile,
               policy=_fake_policy("sev-snp"), trust=TrustConfig.production(), expected_binding=binding())  # fmt: skip


def test_profile_of_another_tee_refused(fake: fake_backend.FakeRoot) -> None:
    data, cert = fake.evidence("sev-snp", report_data=binding().report_data())
    with pytest.raises(EvidenceFormatError, match="appraises 'tdx' evidence"):
        attest(Evidence(tee="sev-snp", evidence=data, certs=(cert,)), profile="tdx-direct",
               policy=_fake_policy("sev-snp"), trust=TrustConfig.production(), expected_binding=binding())  # fmt: skip


def test_misuse_is_type_or_value_error(fake: fake_backend.FakeRoot) -> None:
    data, cert = fake.evidence("sev-snp", report_data=binding().report_data())
    ev = Evidence(tee="sev-snp", evidence=data, certs=(cert,))
    common = {"profile": "snp-direct", "policy": _fake_policy("sev-snp"), "trust": TrustConfig.production()}
    with pytest.raises(ValueError, match="timezone-aware"):
        attest(ev, expected_binding=binding(), now=datetime(2024, 1, 1), **common)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected_binding must be a Binding"):
        attest(ev, expected_binding=binding().report_data(), **common)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Evidence record"):
        attest(data, expected_binding=binding(), **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown evidence profile"):
        attest(ev, expected_binding=binding(), **{**common, "profile": "sev-snp"})  # type: ignore[arg-type]


def test_claims_are_returned_unchanged_for_direct_profiles(fake: fake_backend.FakeRoot) -> None:
    data, cert = fake.evidence("sev-snp", report_data=binding().report_data())
    ev = Evidence(tee="sev-snp", evidence=data, certs=(cert,))
    trust = TrustConfig.development([fake.root_certificate])
    claims = attest(
        ev, profile="snp-direct", policy=_fake_policy("sev-snp"), trust=trust, expected_binding=binding()
    )
    again, _ = appraise(ev, policy=_fake_policy("sev-snp"), trust=trust, now=datetime.now(timezone.utc))
    assert dataclasses.asdict(claims) == dataclasses.asdict(again)


# ---- composite nvidia-gpu over the real backends ---------------------------------------------------

GPU = "nvidia-gpu" in registry.available() and "nvidia-gpu" in available_kinds(["nvidia-gpu"])


def _gpu_policy(tee: SimulatedTEE) -> AppraisalPolicy:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tees = {
            tee.kind: {MEASUREMENT_KEYS[tee.kind]: [tee.measurement.hex()]},
            "nvidia-gpu": {"measurements": "UNSAFE_ANY"},
        }
        return AppraisalPolicy.from_dict({"version": 1, "tees": tees})


@pytest.mark.skipif(not GPU, reason="nvidia-gpu backend or simulator not built")
@pytest.mark.parametrize("kind", [k for k in KINDS if k in ("sev-snp", "tdx")])
def test_cpu_with_gpus_of_this_session_accepted(kind: str) -> None:
    tee = SimulatedTEE(kind, gpus=2)
    trust = DevRootOfTrust.for_process().trust_config([kind, "nvidia-gpu"])
    claims = attest(tee.evidence(binding()), profile="nvidia-gpu", policy=_gpu_policy(tee), trust=trust,
                    expected_binding=binding())  # fmt: skip
    assert [g.report_data for g in claims.details["gpus"]] == [binding().gpu_nonce()] * 2


@pytest.mark.skipif(not GPU, reason="nvidia-gpu backend or simulator not built")
def test_real_gpu_report_from_another_session_refused() -> None:
    kind = KINDS[0]
    tee = SimulatedTEE(kind, gpus=1)
    trust = DevRootOfTrust.for_process().trust_config([kind, "nvidia-gpu"])
    ours = tee.evidence(binding())
    relayed_gpu = tee.evidence(binding(nonce=b"\x99" * 32)).gpus
    with pytest.raises(AttestationError, match="GPU 0: SPDM nonce is not derived from this session"):
        attest(dataclasses.replace(ours, gpus=relayed_gpu), profile="nvidia-gpu", policy=_gpu_policy(tee),
               trust=trust, expected_binding=binding())  # fmt: skip


@pytest.mark.skipif(not GPU, reason="nvidia-gpu backend or simulator not built")
def test_simulated_gpu_under_production_trust_refused() -> None:
    kind = KINDS[0]
    tee = SimulatedTEE(kind, gpus=1)
    cpu_only = DevRootOfTrust.for_process().trust_config([kind])
    prod_gpu = TrustConfig(root_fingerprints=cpu_only.root_fingerprints, test_roots=cpu_only.test_roots)
    with pytest.raises(AttestationError):
        attest(tee.evidence(binding()), profile="nvidia-gpu", policy=_gpu_policy(tee), trust=prod_gpu,
               expected_binding=binding())  # fmt: skip


def test_package_reexports_are_lazy_and_attest_is_the_function() -> None:
    import subprocess
    import sys
    import types

    import ray_confidential.attestation as pkg
    import ray_confidential.attestation.attest  # noqa: F401  (binds the submodule name on the package)

    assert isinstance(pkg.attest, types.FunctionType) and pkg.attest is attest
    assert (
        pkg.Binding is Binding and pkg.AppraisalPolicy is AppraisalPolicy and pkg.TrustConfig is TrustConfig
    )
    probe = (
        "import sys, ray_confidential.attestation; print('cryptography' in sys.modules, 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
