"""X.509 certificate-path checks and verified-result caches shared by the attestation backends.

RFC 5280 section 6 path validation, reduced to what the vendor attestation PKIs need (AWS Nitro
``attestation_process.md`` section 3.2.3, NVIDIA nvtrust ``verify_gpu_certificate_chain``). Callers
build and order the chain (leaf first, root last); this module checks it.

    >>> from datetime import datetime, timezone
    >>> from ray_confidential.attestation.trust import TrustConfig
    >>> from ray_confidential.testing.nitro_fake import NitroTestRoot
    >>> pki = NitroTestRoot.generate()
    >>> chain = (pki.leaf_certificate, pki.intermediate_certificate, pki.root_certificate)
    >>> verify_path(chain, trust=TrustConfig.development([pki.root_certificate]),
    ...             now=datetime.now(timezone.utc), label="demo", cache=LRUCache(),
    ...             key=der_digest(der(c) for c in chain))

What :func:`verify_path` checks, stopping at the first failure:

1. the root's SHA-256 fingerprint is allow-listed in the :class:`TrustConfig` (every call);
2. every certificate, the root included, is valid at ``now`` (every call);
3. the root is self-signed, and each certificate is signed by the next one up (issuer name and
   signature, ``verify_directly_issued_by``);
4. every certificate above the leaf has basicConstraints CA (critical), a path length constraint
   that allows the CAs below it, and keyUsage keyCertSign;
5. the leaf is not a CA, may sign (keyUsage digitalSignature, when the extension is present) and
   holds an ECDSA key on the expected curve (P-384 unless told otherwise).

Steps 3-5 are a pure function of the certificates: their success is cached under a key the caller
derives from every certificate in order (:func:`der_digest`), so a result is never reused for
another leaf. Steps 1-2 depend on the trust configuration and the clock and are never cached.
:class:`WindowCache` holds results that depend on time (DCAP chains and collateral): one is reused
only while ``now`` lies inside its window (certificate validity, CRL and collateral ``nextUpdate``).

What it does NOT check: revocation (backends that have CRLs check them), name constraints,
certificate policies, extended key usage, AKI/SKI linkage, unknown critical extensions, or any
signature algorithm allow-list beyond what ``cryptography`` verifies; nor does it build the path.

Errors: a failed check raises :class:`AttestationError` (prefixed with the caller's ``label``);
malformed extensions raise :class:`EvidenceFormatError`. Certificates should be loaded through
:func:`touch`, so that fields ``cryptography`` parses lazily fail at load time; the errors it raises
outside ``ValueError`` become :class:`EvidenceFormatError` there and, as a backstop, in
:func:`~ray_confidential.attestation.trust.certificate_errors_are_format_errors`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from ray_confidential.attestation.trust import TrustConfig, fingerprint
from ray_confidential.errors import AttestationError, EvidenceFormatError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def require_aware(now: object, *, error: type[Exception] = ValueError) -> None:
    """Refuse a ``now`` that is not a timezone-aware datetime (no hidden clocks, no naive times).

    Raises:
        ``error`` (ValueError unless the caller documents another type).
    """
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise error("now must be a timezone-aware datetime, e.g. datetime.now(timezone.utc)")


def touch(cert: x509.Certificate) -> x509.Certificate:
    """Force ``cryptography``'s lazy parsing of every field the checks read, so that a malformed
    certificate fails where it is loaded (callers turn that into a format error)."""
    cert.subject.rfc4514_string()
    cert.issuer.rfc4514_string()
    _ = cert.extensions, cert.not_valid_before_utc, cert.not_valid_after_utc
    _ = cert.signature_hash_algorithm, cert.public_key()
    return cert


def der(cert: x509.Certificate) -> bytes:
    """The DER encoding of ``cert``."""
    return cert.public_bytes(Encoding.DER)


def der_digest(ders: Iterable[bytes]) -> bytes:
    """SHA-256 over every DER in order, each length-prefixed: the cache key of a chain."""
    h = hashlib.sha256()
    for item in ders:
        h.update(len(item).to_bytes(4, "big"))
        h.update(item)
    return h.digest()


class LRUCache(Generic[K, V]):
    """A small thread-safe LRU map (least recently used out first) with hit and miss counts."""

    def __init__(self, maxsize: int = 256) -> None:
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._maxsize = maxsize
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0


class Windowed(Protocol):
    """A verified result usable from ``valid_from`` to ``valid_until`` (inclusive)."""

    @property
    def valid_from(self) -> datetime: ...

    @property
    def valid_until(self) -> datetime: ...


W = TypeVar("W", bound=Windowed)


class WindowCache(LRUCache[K, W]):
    """An :class:`LRUCache` whose entries are reused only while ``now`` lies inside their window."""

    def get_at(self, key: K, now: datetime) -> W | None:
        """The entry for ``key`` if ``now`` lies inside its window (else a miss)."""
        with self._lock:
            value = self._data.get(key)
            if value is None or not value.valid_from <= now <= value.valid_until:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value


def _error(label: str | None, msg: str) -> AttestationError:
    return AttestationError(f"{label}: {msg}" if label else msg)


def extension(
    cert: x509.Certificate, kind: type[x509.ExtensionType], *, label: str | None = None
) -> x509.Extension[x509.ExtensionType] | None:
    """The extension of type ``kind``, or None when absent.

    Raises:
        EvidenceFormatError: duplicate or malformed extensions.
    """
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension) as exc:
        prefix = f"{label}: " if label else ""
        raise EvidenceFormatError(f"{prefix}malformed certificate extensions: {exc}") from exc


def is_ca(cert: x509.Certificate, *, label: str | None = None) -> bool:
    """basicConstraints CA is present and true (criticality is :func:`check_ca`'s business)."""
    bc = extension(cert, x509.BasicConstraints, label=label)
    return bc is not None and isinstance(bc.value, x509.BasicConstraints) and bc.value.ca


def valid_at(cert: x509.Certificate, now: datetime) -> bool:
    """``cert`` is within its validity period at ``now`` (both ends inclusive)."""
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def not_valid_error(
    cert: x509.Certificate, now: datetime, *, what: str, label: str | None = None
) -> AttestationError:
    """The error for a certificate that is not :func:`valid_at` ``now`` (name it only on failure:
    ``if not valid_at(cert, now): raise not_valid_error(cert, now, what=...)``)."""
    return _error(
        label,
        f"{what} is not valid at {now.isoformat()} "
        f"(valid {cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()})",
    )


def check_signed_by(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    *,
    what: str,
    label: str | None = None,
    by: str = "its issuer (the next certificate in the chain)",
) -> None:
    """``cert`` names ``issuer`` as its issuer and carries a valid signature by its key.

    Raises:
        AttestationError: name or signature mismatch, or a key type that cannot sign certificates.
    """
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise _error(label, f"{what} is not signed by {by}") from exc


def check_ca(cert: x509.Certificate, *, cas_below: int, what: str, label: str | None = None) -> None:
    """basicConstraints CA (critical) whose path length allows ``cas_below`` CAs, and keyCertSign.

    Raises:
        AttestationError: a constraint fails.
    """
    bc = extension(cert, x509.BasicConstraints, label=label)
    if bc is None or not bc.critical or not isinstance(bc.value, x509.BasicConstraints) or not bc.value.ca:
        raise _error(label, f"{what} is not a CA certificate (basicConstraints CA, critical)")
    if bc.value.path_length is not None and cas_below > bc.value.path_length:
        raise _error(label, f"{what} path length constraint {bc.value.path_length} exceeded")
    ku = extension(cert, x509.KeyUsage, label=label)
    if ku is None or not isinstance(ku.value, x509.KeyUsage) or not ku.value.key_cert_sign:
        raise _error(label, f"{what} may not sign certificates (keyUsage)")


_CURVE_NAMES: dict[type[ec.EllipticCurve], str] = {ec.SECP256R1: "P-256", ec.SECP384R1: "P-384"}


def check_leaf(
    cert: x509.Certificate,
    *,
    what: str = "leaf certificate",
    label: str | None = None,
    curve: type[ec.EllipticCurve] = ec.SECP384R1,
) -> ec.EllipticCurvePublicKey:
    """An end-entity signing key: not a CA, keyUsage (when present) allows digitalSignature, ECDSA on
    ``curve``. Returns the key.

    Raises:
        AttestationError: a constraint fails.
    """
    if is_ca(cert, label=label):
        raise _error(label, f"{what} is a CA")
    ku = extension(cert, x509.KeyUsage, label=label)
    if ku is not None and isinstance(ku.value, x509.KeyUsage) and not ku.value.digital_signature:
        raise _error(label, f"{what} may not sign (keyUsage)")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, curve):
        raise _error(label, f"{what} key is not ECDSA {_CURVE_NAMES.get(curve, curve.__name__)}")
    return key


def _describe(i: int, cert: x509.Certificate) -> str:
    return "leaf certificate" if i == 0 else f"chain certificate {i} ({cert.subject.rfc4514_string()})"


def verify_path(
    chain: Sequence[x509.Certificate],
    *,
    trust: TrustConfig,
    now: datetime,
    label: str,
    cache: LRUCache[bytes, tuple[x509.Certificate, ...]],
    key: bytes,
    describe: Callable[[int, x509.Certificate], str] = _describe,
    leaf_what: str = "leaf certificate",
) -> None:
    """Steps 1-5 of the module docstring for ``chain`` (leaf first, root last) at ``now``.

    Args:
        cache, key: where steps 3-5 are remembered; ``key`` must cover every certificate of the
            chain in order (:func:`der_digest`). On success the chain is stored under ``key``.
        describe: names certificate ``i`` in error messages; ``leaf_what`` names the leaf.

    Raises:
        AttestationError: root not allow-listed or not self-signed, a certificate not valid at
            ``now``, a bad signature, or a CA / leaf constraint.
        EvidenceFormatError: malformed extensions.
    """
    root = chain[-1]
    # (1) The root is one we trust (by fingerprint; per call: trust configurations differ).
    if not trust.is_allowed_root(root):
        raise _error(label, f"root certificate {fingerprint(root)} is not allow-listed")
    # (2) Every certificate is valid at `now` (per call: time moves).
    for i, cert in enumerate(chain):
        if not valid_at(cert, now):
            raise not_valid_error(cert, now, what=describe(i, cert), label=label)
    if cache.get(key) is not None:
        return
    # (3)-(4) The root is self-signed; each certificate is signed by the next one up; CAs are CAs.
    check_signed_by(root, root, what="root certificate", label=label, by="itself (roots are self-signed)")
    for i, cert in enumerate(chain):
        if i > 0:
            check_ca(cert, cas_below=i - 1, what=describe(i, cert), label=label)
        if i + 1 < len(chain):
            check_signed_by(cert, chain[i + 1], what=describe(i, cert), label=label)
    # (5) The leaf is an end-entity signing key.
    check_leaf(chain[0], what=leaf_what, label=label)
    cache.put(key, tuple(chain))
