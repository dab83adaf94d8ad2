"""The evidence record that :func:`ray_confidential.attestation.attest` appraises.

>>> ev = Evidence(tee="sev-snp", evidence=b"...", certs=(b"vcek-der",))
>>> ev.gpus
()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray_confidential.attestation.claims import TEE_KINDS


@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    """Evidence from one TEE, with what its verifier needs beside it.

    Attributes:
        tee: TEE kind of ``evidence`` (one of ``TEE_KINDS``).
        evidence: the raw evidence in the vendor's format (SNP attestation report, DCAP quote, Nitro
            COSE_Sign1 document, NVIDIA SPDM GET_MEASUREMENTS request || response).
        certs: certificates the evidence does not carry (DER, or PEM holding one or more), any order:
            SNP VCEK/VLEK + ASK/ASVK + ARK, NVIDIA device chain.
        collateral: TEE-specific collateral (Intel: QuoteCollateralV3 JSON), or None (TCB unknown).
        gpus: for the composite ``nvidia-gpu`` profile only: evidence of each GPU (tee
            ``nvidia-gpu``) attached to this CPU evidence, each bound to the CPU session through
            ``Binding.gpu_nonce()``.
    """

    tee: str
    evidence: bytes
    certs: tuple[bytes, ...] = ()
    collateral: bytes | None = None
    gpus: tuple[Evidence, ...] = ()

    def __post_init__(self) -> None:
        if self.tee not in TEE_KINDS:
            raise ValueError(f"unknown TEE kind {self.tee!r}; known kinds: {', '.join(TEE_KINDS)}")
        if not isinstance(self.evidence, bytes):
            raise TypeError(f"Evidence.evidence must be bytes, got {type(self.evidence).__name__}")
        if isinstance(self.certs, (bytes, str)) or not all(isinstance(c, bytes) for c in self.certs):
            raise TypeError("Evidence.certs must be a tuple of bytes (DER or PEM)")
        object.__setattr__(self, "certs", tuple(self.certs))
        object.__setattr__(self, "gpus", tuple(self.gpus))
        for gpu in self.gpus:
            if not isinstance(gpu, Evidence) or gpu.tee != "nvidia-gpu" or gpu.gpus:
                raise ValueError("Evidence.gpus holds only Evidence(tee='nvidia-gpu') records without gpus")

    @classmethod
    def from_fake(cls, fake: Any, *, gpus: tuple[Evidence, ...] = ()) -> Evidence:
        """Convert a :class:`ray_confidential.testing.evidence.FakeEvidence` (same fields)."""
        return cls(
            tee=fake.tee,
            evidence=fake.evidence,
            certs=tuple(fake.certs),
            collateral=fake.collateral,
            gpus=gpus,
        )


__all__ = ["Evidence"]
