"""Evidence produced by the simulated TEEs, in the same shape the verifiers consume."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeEvidence:
    """What a simulated TEE emits: evidence bytes in the real format, plus certificates and collateral.

    Attributes:
        tee: the TEE kind ("sev-snp", "tdx", "sgx", "nitro", "nvidia-gpu").
        evidence: the raw evidence (SNP report, DCAP quote, Nitro COSE_Sign1 document, ...).
        certs: DER certificates the verifier needs that the evidence does not carry.
        collateral: TEE-specific collateral (Intel: the QuoteCollateralV3 JSON), or None.
    """

    tee: str
    evidence: bytes
    certs: tuple[bytes, ...] = ()
    collateral: bytes | None = None
