"""Error hierarchy of ray_confidential.

Every security failure is a subclass of :class:`ConfidentialError`. Misuse of an API (wrong type,
unknown option) is a plain ``TypeError`` / ``ValueError`` whose message shows the fix.

    >>> from ray_confidential.errors import ConfidentialError, DecryptionError
    >>> issubclass(DecryptionError, ConfidentialError)
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfidentialError(Exception):
    """Root of every security-relevant error raised by ray_confidential."""


class EvidenceFormatError(ConfidentialError):
    """Attestation evidence (or collateral) could not be parsed: truncated, oversized or malformed."""


class AttestationError(ConfidentialError):
    """Evidence parsed but failed verification (signature, certificate chain, revocation, binding)."""


class PolicyViolation(ConfidentialError):
    """Verified evidence does not satisfy the appraisal policy.

    ``violations`` lists every mismatch found (validation collects them all), each an object with
    ``field``, ``got`` and ``want`` (see :class:`ray_confidential.attestation.claims.Violation`).
    """

    def __init__(self, violations: Iterable[Any], message: str | None = None) -> None:
        self.violations = tuple(violations)
        if message is None:
            message = "; ".join(str(v) for v in self.violations) or "policy violated"
        super().__init__(message)


class KeyReleaseDenied(ConfidentialError):
    """The caller may not obtain the key (no right, failed attestation, revoked, not approved)."""


class DecryptionError(ConfidentialError):
    """A sealed object could not be opened.

    Deliberately opaque: it never says which check failed (tag, key commitment, framing, version),
    so that it cannot be used as an oracle.
    """

    def __init__(self, message: str = "sealed object could not be opened") -> None:
        super().__init__(message)


class NoAttestedNodeError(ConfidentialError):
    """No node that satisfies the domain policy became available within the configured wait."""


class SealedTaskError(ConfidentialError):
    """A confidential call failed. The detail is sealed; message and repr never contain it."""

    def __init__(self, sealed_detail: bytes | None = None, message: str = "confidential call failed") -> None:
        self.sealed_detail = sealed_detail
        super().__init__(message)

    def __reduce__(self) -> tuple[type[SealedTaskError], tuple[bytes | None, str]]:
        return (type(self), (self.sealed_detail, str(self.args[0])))

    def __repr__(self) -> str:
        return f"SealedTaskError({self.args[0]!r}, sealed_detail=<{len(self.sealed_detail or b'')} bytes>)"


__all__ = [
    "AttestationError",
    "ConfidentialError",
    "DecryptionError",
    "EvidenceFormatError",
    "KeyReleaseDenied",
    "NoAttestedNodeError",
    "PolicyViolation",
    "SealedTaskError",
]
