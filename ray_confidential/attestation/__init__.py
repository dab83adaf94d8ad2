"""Attestation: verify TEE evidence, validate it against reference values, bind it to a session.

    >>> from ray_confidential.attestation import Binding, attest  # doctest: +SKIP

Names are imported on first access (PEP 562), so ``import ray_confidential.attestation`` stays
light: no backend, no ``cryptography`` until used.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "attest": "ray_confidential.attestation.attest",
    "Binding": "ray_confidential.attestation.binding",
    "AppraisalPolicy": "ray_confidential.attestation.policy",
    "TrustConfig": "ray_confidential.attestation.trust",
    "VerifiedClaims": "ray_confidential.attestation.claims",
    "Violation": "ray_confidential.attestation.claims",
    "Evidence": "ray_confidential.attestation.evidence",
    "EvidenceProfile": "ray_confidential.attestation.profiles",
    "get_profile": "ray_confidential.attestation.profiles",
}

if TYPE_CHECKING:
    from ray_confidential.attestation.attest import attest
    from ray_confidential.attestation.binding import Binding
    from ray_confidential.attestation.claims import VerifiedClaims, Violation
    from ray_confidential.attestation.evidence import Evidence
    from ray_confidential.attestation.policy import AppraisalPolicy
    from ray_confidential.attestation.profiles import EvidenceProfile, get_profile
    from ray_confidential.attestation.trust import TrustConfig


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """The package module. The submodule ``attest`` shares its name with the function it defines;
    importing the submodule would rebind ``ray_confidential.attestation.attest`` to the module, so
    that binding is redirected to the function (``sys.modules`` still holds the module)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "attest" and isinstance(value, types.ModuleType):
            value = value.attest
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "AppraisalPolicy",
    "Binding",
    "Evidence",
    "EvidenceProfile",
    "TrustConfig",
    "VerifiedClaims",
    "Violation",
    "attest",
    "get_profile",
]
