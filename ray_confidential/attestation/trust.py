"""Trust configuration: which roots of trust are allowed, and the clock. Separate from appraisal policy.

Vendor roots are pinned by the SHA-256 fingerprint of their DER encoding (facts, not files: the
package ships no certificate). Certificates arrive with the evidence; a chain is accepted only if it
ends at a self-signed root whose fingerprint is on the allow-list.

    >>> trust = TrustConfig.production()
    >>> VENDOR_ROOT_FINGERPRINTS["amd-ark-milan"] in trust.root_fingerprints
    True
    >>> trust.allows_test_roots
    False
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ray_confidential.errors import EvidenceFormatError

# SHA-256 over the DER of each vendor root (shared/vectors/roots/FINGERPRINTS.txt, checked by tests
# against the PEM files there).
VENDOR_ROOT_FINGERPRINTS: dict[str, str] = {
    "amd-ark-milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "amd-ark-genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "amd-ark-turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
    "intel-sgx-root-ca": "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3",
    "aws-nitro-enclaves-root-g1": "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b",
    "nvidia-device-identity-ca": "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48",
    "nvidia-corim-rim-signing-root-ca": "12977b5115acb0381179279fffeb5a8c4d264971ebb32298023a465fa41df5d1",
}


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 (lower-case hex) of a certificate's DER encoding."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustConfig:
    """Allow-listed roots, optional certificate fetcher, and whether test roots are admitted.

    Attributes:
        root_fingerprints: SHA-256 hex fingerprints of acceptable root certificates.
        test_roots: certificates of simulated roots generated at run time (development only). They
            are added to the allow-list and flip :attr:`allows_test_roots`, which a production
            broker refuses.
        fetcher: ``url -> bytes`` for collateral or certificates not carried in the evidence; None
            means no network (the default; tests and the CLI pass files instead).
    """

    root_fingerprints: frozenset[str]
    test_roots: tuple[x509.Certificate, ...] = ()
    fetcher: Callable[[str], bytes] | None = field(default=None, compare=False)

    @classmethod
    def production(cls, *, fetcher: Callable[[str], bytes] | None = None) -> TrustConfig:
        """The vendor allow-list only: a simulated TEE's evidence fails here by construction."""
        return cls(root_fingerprints=frozenset(VENDOR_ROOT_FINGERPRINTS.values()), fetcher=fetcher)

    @classmethod
    def development(cls, test_roots: Iterable[x509.Certificate]) -> TrustConfig:
        """Vendor roots plus run-time generated test roots. Never valid for a production broker."""
        roots = tuple(test_roots)
        return cls(
            root_fingerprints=frozenset(VENDOR_ROOT_FINGERPRINTS.values()) | {fingerprint(c) for c in roots},
            test_roots=roots,
        )

    @property
    def allows_test_roots(self) -> bool:
        return bool(self.test_roots) or not self.root_fingerprints <= set(VENDOR_ROOT_FINGERPRINTS.values())

    def is_allowed_root(self, cert: x509.Certificate) -> bool:
        """True when the fingerprint of ``cert`` is allow-listed (callers still check its signatures)."""
        return fingerprint(cert) in self.root_fingerprints


_P = ParamSpec("_P")
_R = TypeVar("_R")


def certificate_errors_are_format_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorator for a backend's ``verify_evidence``: certificate parsing errors that ``cryptography``
    raises lazily and outside ``ValueError`` (duplicate extensions, unsupported name types) become
    :class:`EvidenceFormatError`, so a verifier never leaks another exception type on bad input."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except (x509.DuplicateExtension, x509.UnsupportedGeneralNameType, x509.InvalidVersion) as exc:
            raise EvidenceFormatError(f"malformed certificate: {exc}") from exc

    return wrapper
