"""One entry point: verify evidence, check it commits to the expected binding, validate it.

    attest(evidence, profile="snp-direct", policy=policy, trust=TrustConfig.production(),
           expected_binding=binding)  # -> VerifiedClaims, or raises

Steps (numbered as in the body, after sigstore-python ``verify/verifier.py``):

1. Look up the evidence profile (which TEE, where the binding sits).
2. Parse and verify the evidence with the TEE's backend: signatures, certificate chain to an
   allow-listed root, revocation where the format has it. Stops at the first failure.
3. Check the binding: the evidence commits to exactly ``expected_binding`` (report data; Nitro
   user data and nonce; each GPU's SPDM nonce derived from this CPU session).
4. Validate the claims against the appraisal policy: every violation is collected.

What it does NOT do: fetch anything (certificates and collateral come with the evidence; TCB status
is ``unknown`` without collateral), check that the nonce is fresh or single-use (the broker's
challenge store does), or decide whether a development trust configuration is acceptable (the broker
refuses ``trust.allows_test_roots`` in production).
"""

from __future__ import annotations

import dataclasses
import hmac
from datetime import datetime, timezone

from ray_confidential.attestation import registry
from ray_confidential.attestation.binding import Binding
from ray_confidential.attestation.claims import VerifiedClaims, Violation
from ray_confidential.attestation.evidence import Evidence
from ray_confidential.attestation.policy import AppraisalPolicy
from ray_confidential.attestation.profiles import DIRECT_PROFILE, EvidenceProfile, get_profile
from ray_confidential.attestation.trust import TrustConfig
from ray_confidential.errors import AttestationError, EvidenceFormatError, PolicyViolation


def attest(
    evidence: Evidence,
    *,
    profile: str | EvidenceProfile,
    policy: AppraisalPolicy,
    trust: TrustConfig,
    expected_binding: Binding,
    now: datetime | None = None,
) -> VerifiedClaims:
    """Appraise ``evidence`` under ``profile``; return its claims only if every check passes.

    Args:
        evidence: the evidence record (for ``nvidia-gpu``: CPU evidence with ``gpus`` attached).
        profile: evidence profile name (``snp-direct``, ``tdx-direct``, ``sgx-gramine``, ``nitro``,
            ``nvidia-gpu``).
        policy: reference values per TEE kind.
        trust: allow-listed roots (production or development).
        expected_binding: what the evidence must commit to (this session's nonce, key, cluster, bundle).
        now: time at which certificates, CRLs and collateral must be valid; None = current UTC time.

    Returns:
        The CPU evidence's claims; for ``nvidia-gpu`` with ``details["gpus"]`` = the GPUs' claims.

    Raises:
        ValueError / ProfileNotSupportedError: unknown or unsupported profile, naive ``now``.
        TypeError: an argument of the wrong type.
        EvidenceFormatError: the evidence does not parse, or is not of the profile's kind.
        AttestationError: signature, chain or revocation failure, or a binding mismatch.
        PolicyViolation: the claims break the policy (``.violations`` lists each field, got, want).
    """
    if not isinstance(evidence, Evidence):
        raise TypeError(f"evidence must be an Evidence record, got {type(evidence).__name__}")
    if not isinstance(policy, AppraisalPolicy):
        raise TypeError(f"policy must be an AppraisalPolicy, got {type(policy).__name__}")
    if not isinstance(trust, TrustConfig):
        raise TypeError(f"trust must be a TrustConfig, got {type(trust).__name__}")
    if not isinstance(expected_binding, Binding):
        raise TypeError(f"expected_binding must be a Binding, got {type(expected_binding).__name__}")
    if now is None:
        now = datetime.now(timezone.utc)
    elif now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware, e.g. datetime(2024, 1, 1, tzinfo=timezone.utc)")

    # (1) Profile lookup: which TEE kind, where the binding sits. A composite profile appraises the
    #     CPU evidence under that kind's direct profile and each attached GPU under its own.
    prof = get_profile(profile)
    if prof.composite:
        if evidence.tee not in DIRECT_PROFILE:
            raise EvidenceFormatError(
                f"profile {prof.name!r} needs CPU evidence with GPUs attached, got {evidence.tee!r}"
            )
        if not evidence.gpus:
            raise EvidenceFormatError(
                f"profile {prof.name!r} needs at least one GPU evidence in Evidence.gpus"
            )
        cpu_profile = get_profile(DIRECT_PROFILE[evidence.tee])
    else:
        if evidence.tee != prof.tee:
            raise EvidenceFormatError(
                f"evidence is {evidence.tee!r} but profile {prof.name!r} appraises {prof.tee!r} evidence"
            )
        if evidence.gpus:
            raise EvidenceFormatError(
                f"profile {prof.name!r} takes no GPU evidence; use the 'nvidia-gpu' profile"
            )
        cpu_profile = prof

    # (2) Parse and verify with the backend: signatures, chain to an allow-listed root, CRLs. The
    #     backend raises EvidenceFormatError / AttestationError at the first failure.
    claims = _verify(evidence, trust=trust, now=now)
    gpu_claims = tuple(_verify(gpu, trust=trust, now=now) for gpu in evidence.gpus)

    # (3) Binding: the evidence must commit to exactly this session (nonce, key, cluster, bundle).
    _check_binding(claims, cpu_profile, expected_binding)
    for index, gpu in enumerate(gpu_claims):
        if not hmac.compare_digest(gpu.report_data, expected_binding.gpu_nonce()):
            raise AttestationError(
                f"GPU {index}: SPDM nonce is not derived from this session's binding (relayed GPU evidence?)"
            )

    # (4) Validate against the policy; collect every violation, then refuse if there is any.
    violations = _validate(claims, policy)
    for index, gpu in enumerate(gpu_claims):
        violations += [
            dataclasses.replace(v, field=f"gpus[{index}].{v.field}") for v in _validate(gpu, policy)
        ]
    if violations:
        raise PolicyViolation(violations)

    if gpu_claims:
        claims = dataclasses.replace(claims, details={**claims.details, "gpus": gpu_claims})
    return claims


def _verify(evidence: Evidence, *, trust: TrustConfig, now: datetime) -> VerifiedClaims:
    backend = registry.backend(evidence.tee)
    claims = backend.verify_evidence(
        evidence.evidence, trust=trust, certs=evidence.certs, collateral=evidence.collateral, now=now
    )
    if claims.tee != evidence.tee:  # a backend bug, never an attacker's choice; refuse anyway
        raise AttestationError(f"backend for {evidence.tee!r} returned claims for {claims.tee!r}")
    return claims


def _check_binding(claims: VerifiedClaims, profile: EvidenceProfile, binding: Binding) -> None:
    if profile.binding == "report_data":
        if not hmac.compare_digest(claims.report_data, binding.report_data()):
            raise AttestationError(
                f"{profile.name}: report data does not commit to the expected binding "
                "(another key, nonce, cluster or bundle)"
            )
    elif profile.binding == "nitro_user_data_and_nonce":
        nonce = claims.details.get("nonce")
        if not hmac.compare_digest(claims.report_data, binding.report_data()):
            raise AttestationError(
                "nitro: user_data does not commit to the expected binding (another key, nonce, cluster or bundle)"
            )
        if not isinstance(nonce, bytes) or not hmac.compare_digest(nonce, binding.nonce):
            raise AttestationError("nitro: the document's nonce is not this session's challenge nonce")
    else:  # pragma: no cover - get_profile() refuses unsupported profiles before this point
        raise AttestationError(f"{profile.name}: binding location {profile.binding!r} is not supported")


def _validate(claims: VerifiedClaims, policy: AppraisalPolicy) -> list[Violation]:
    tee_policy = policy.for_tee(claims.tee)
    if tee_policy is None:
        return [Violation(field="tee", got=claims.tee, want=f"one of [{', '.join(policy.tees)}]")]
    return list(registry.backend(claims.tee).validate_claims(claims, tee_policy))


def appraise(
    evidence: Evidence, *, policy: AppraisalPolicy, trust: TrustConfig, now: datetime
) -> tuple[VerifiedClaims, list[Violation]]:
    """Steps (2) and (4) without a binding, for inspection tools (the CLI): the claims and every
    violation. Never use it to admit an executor: it proves nothing about freshness or the key."""
    claims = _verify(evidence, trust=trust, now=now)
    return claims, _validate(claims, policy)


__all__ = ["appraise", "attest"]
