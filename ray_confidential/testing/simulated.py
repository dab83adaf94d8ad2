"""Simulated TEEs: evidence in the real formats, signed by test roots generated at run time.

One verification path serves hardware and simulation: a simulated TEE emits a genuine-format SNP
report, DCAP quote or Nitro document (built by the per-TEE fakes in ``ray_confidential.testing``)
signed by a test hierarchy. The development broker creates the :class:`DevRootOfTrust` of its
process, trusts it (:meth:`DevRootOfTrust.trust_config`) and hands it to the simulated executors it
starts as launch data (:meth:`DevRootOfTrust.to_launch_data`); nothing is a fixed key in the package.
Under ``TrustConfig.production()`` every simulated report fails by construction.

    >>> from ray_confidential.attestation.binding import Binding
    >>> tee = SimulatedTEE("nitro")
    >>> b = Binding(nonce=bytes(32), executor_public_key=bytes(32), hpke_suite="X25519-HKDF-SHA256-AES-256-GCM",
    ...             cluster_id="dev", bundle_digest=bytes(32))
    >>> tee.evidence(b).tee
    'nitro'

What it does NOT simulate: the attestation device's access control (the executor's local socket),
TCB collateral freshness beyond what each fake emits, or event logs.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import threading
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any, ClassVar, Final

from ray_confidential.attestation.binding import Binding
from ray_confidential.attestation.evidence import Evidence
from ray_confidential.attestation.trust import TrustConfig

SIMULATED_KINDS: Final = ("sev-snp", "tdx", "sgx", "nitro")
"""TEE kinds :class:`SimulatedTEE` emits (``nvidia-gpu`` is attached with ``gpus=``)."""

FAKE_MODULES: Final[dict[str, str]] = {
    "sev-snp": "ray_confidential.testing.snp_fake",
    "tdx": "ray_confidential.testing.dcap_fake",
    "sgx": "ray_confidential.testing.dcap_fake",
    "nitro": "ray_confidential.testing.nitro_fake",
    "nvidia-gpu": "ray_confidential.testing.nvidia_fake",
}
"""TEE kind -> module with its test root and evidence builder. TDX and SGX share the Intel-like
hierarchy of ``dcap_fake`` (as real PCK chains share the Intel SGX Root CA)."""

MEASUREMENT_SIZES: Final[dict[str, int]] = {"sev-snp": 48, "tdx": 48, "sgx": 32, "nitro": 48}
"""Size of the measurement each kind reports (SNP MEASUREMENT, TDX MRTD, SGX MRENCLAVE, Nitro PCR0)."""

LAUNCH_DATA_VERSION: Final = 1


def default_measurement(kind: str) -> bytes:
    """The measurement a :class:`SimulatedTEE` reports when none is given (deterministic per kind)."""
    return hashlib.sha384(b"ray_confidential simulated " + kind.encode()).digest()[: MEASUREMENT_SIZES[kind]]


def _fake_module(kind: str) -> ModuleType:
    try:
        path = FAKE_MODULES[kind]
    except KeyError:
        raise ValueError(
            f"no simulator for TEE kind {kind!r}; simulated kinds: {', '.join(FAKE_MODULES)}"
        ) from None
    return importlib.import_module(path)


def _root_class(module: ModuleType) -> Any:
    classes = [
        value
        for name, value in vars(module).items()
        if name.endswith("TestRoot") and isinstance(value, type) and value.__module__ == module.__name__
    ]
    if len(classes) != 1:
        raise RuntimeError(f"{module.__name__} must define exactly one *TestRoot class, found {len(classes)}")
    return classes[0]


def available_kinds(kinds: Iterable[str] = SIMULATED_KINDS) -> tuple[str, ...]:
    """The kinds among ``kinds`` whose fake module can be imported in this build."""
    out = []
    for kind in kinds:
        try:
            _fake_module(kind)
        except ImportError:
            continue
        out.append(kind)
    return tuple(out)


class DevRootOfTrust:
    """The test roots of one development deployment: one per process, generated at run time.

    Roots are generated lazily, one per fake module (TDX and SGX share one). The broker process
    calls :meth:`for_process`, trusts :meth:`trust_config` and passes :meth:`to_launch_data` to
    the executors it starts, which rebuild it with :meth:`from_launch_data` and :meth:`install`.
    Launch data holds private keys: development only.
    """

    _process: ClassVar[DevRootOfTrust | None] = None
    _process_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, roots: Mapping[str, Any] | None = None) -> None:
        self._roots: dict[str, Any] = dict(roots or {})
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DevRootOfTrust(roots={sorted(self._roots)})"

    def __reduce__(self) -> Any:
        raise TypeError(
            "DevRootOfTrust holds private keys: pass to_launch_data() explicitly, never pickle it"
        )

    @classmethod
    def for_process(cls) -> DevRootOfTrust:
        """The process-wide instance (created on first call, or set by :meth:`install`)."""
        with cls._process_lock:
            if cls._process is None:
                cls._process = cls()
            return cls._process

    def install(self) -> None:
        """Make this the process-wide instance (an executor that received launch data)."""
        with DevRootOfTrust._process_lock:
            DevRootOfTrust._process = self

    def root(self, kind: str) -> Any:
        """The test root that signs evidence of ``kind`` (generated on first use)."""
        module = _fake_module(kind)
        with self._lock:
            if module.__name__ not in self._roots:
                self._roots[module.__name__] = _root_class(module).generate()
            return self._roots[module.__name__]

    def _roots_of(self, kinds: Iterable[str] | None) -> dict[str, Any]:
        """Module name -> root for ``kinds`` (default: every kind with a simulator), generated as needed."""
        wanted = available_kinds((*SIMULATED_KINDS, "nvidia-gpu")) if kinds is None else tuple(kinds)
        for kind in wanted:
            self.root(kind)
        names = {_fake_module(kind).__name__ for kind in wanted}
        with self._lock:
            return {name: root for name, root in self._roots.items() if name in names}

    def trust_config(self, kinds: Iterable[str] | None = None) -> TrustConfig:
        """``TrustConfig.development`` over the roots of ``kinds`` only (default: every available kind)."""
        return TrustConfig.development(r.root_certificate for r in self._roots_of(kinds).values())

    def to_launch_data(self, kinds: Iterable[str] | None = None) -> bytes:
        """Version byte || JSON {fake module: base64(root PEM incl. keys)} for the roots of ``kinds``."""
        roots = self._roots_of(kinds)
        body = {name: base64.b64encode(root.to_pem()).decode("ascii") for name, root in roots.items()}
        return bytes([LAUNCH_DATA_VERSION]) + json.dumps(body, sort_keys=True).encode("ascii")

    @classmethod
    def from_launch_data(cls, data: bytes) -> DevRootOfTrust:
        """Inverse of :meth:`to_launch_data`.

        Raises:
            ValueError: wrong version byte, malformed JSON, an unknown module or a bad root PEM.
        """
        if not data or data[0] != LAUNCH_DATA_VERSION:
            raise ValueError("DevRootOfTrust launch data: unsupported version byte")
        try:
            body = json.loads(data[1:])
        except ValueError as exc:
            raise ValueError(f"DevRootOfTrust launch data: not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ValueError("DevRootOfTrust launch data: expected a JSON object")
        roots: dict[str, Any] = {}
        for name, pem in body.items():
            if name not in FAKE_MODULES.values():
                raise ValueError(f"DevRootOfTrust launch data: unknown simulator module {name!r}")
            roots[name] = _root_class(importlib.import_module(name)).from_pem(
                base64.b64decode(pem, validate=True)
            )
        return cls(roots)


_UNTRUSTED: dict[tuple[str, str], Any] = {}
_UNTRUSTED_LOCK = threading.Lock()


def _untrusted_root(label: str, kind: str) -> Any:
    module = _fake_module(kind)
    with _UNTRUSTED_LOCK:
        key = (label, module.__name__)
        if key not in _UNTRUSTED:
            _UNTRUSTED[key] = _root_class(module).generate()
        return _UNTRUSTED[key]


class SimulatedTEE:
    """A TEE of ``kind`` that emits evidence in the real format, bound to a session's binding.

    Args:
        kind: ``"sev-snp"``, ``"tdx"``, ``"sgx"`` or ``"nitro"``.
        measurement: what the evidence reports as its measurement (SNP MEASUREMENT, TDX MRTD, SGX
            MRENCLAVE, Nitro PCR0); default :func:`default_measurement`.
        debug: report a debug TEE (SNP policy bit, TD/SGX attributes, Nitro zero PCRs).
        root: ``"dev"`` signs under the process's :class:`DevRootOfTrust` (or pass one); any other
            string names a separately generated root that nobody trusts.
        gpus: number of simulated NVIDIA GPUs whose evidence :meth:`evidence` attaches (composite
            ``nvidia-gpu`` profile); their SPDM nonce is ``binding.gpu_nonce()``.
        options: extra keyword arguments for the kind's ``build_evidence`` (e.g. SNP ``vmpl=1`` or
            ``version=2``; the fakes' break hooks), to play one attack at a time.
    """

    def __init__(
        self,
        kind: str,
        *,
        measurement: bytes | None = None,
        debug: bool = False,
        root: str | DevRootOfTrust = "dev",
        gpus: int = 0,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if kind not in SIMULATED_KINDS:
            raise ValueError(f"SimulatedTEE kind must be one of {SIMULATED_KINDS}, got {kind!r}")
        if measurement is None:
            measurement = default_measurement(kind)
        if len(measurement) != MEASUREMENT_SIZES[kind]:
            raise ValueError(
                f"{kind} measurement must be {MEASUREMENT_SIZES[kind]} bytes, got {len(measurement)}"
            )
        if gpus < 0:
            raise ValueError("gpus must be >= 0")
        self.kind = kind
        self.measurement = measurement
        self.debug = debug
        self.gpus = gpus
        self.options = dict(options or {})
        self._dev = (
            root
            if isinstance(root, DevRootOfTrust)
            else DevRootOfTrust.for_process()
            if root == "dev"
            else None
        )
        self._label = "dev" if self._dev is not None else str(root)
        self._module = _fake_module(kind)

    def __repr__(self) -> str:
        return f"SimulatedTEE({self.kind!r}, measurement={self.measurement.hex()}, debug={self.debug}, root={self._label!r})"

    def _root(self, kind: str) -> Any:
        return self._dev.root(kind) if self._dev is not None else _untrusted_root(self._label, kind)

    @property
    def root_certificate(self) -> Any:
        """The (x509) root certificate that signs this TEE's evidence."""
        return self._root(self.kind).root_certificate

    def evidence(self, binding: Binding) -> Evidence:
        """Fresh evidence whose binding field commits to ``binding`` (see docs/evidence-profiles.md)."""
        fake = _build(self._module, self.kind, self._root(self.kind), binding, self.measurement, self.debug,
                      self.options)  # fmt: skip
        gpus = tuple(self._gpu_evidence(binding) for _ in range(self.gpus))
        return Evidence.from_fake(fake, gpus=gpus)

    def _gpu_evidence(self, binding: Binding) -> Evidence:
        module = _fake_module("nvidia-gpu")
        fake = module.build_evidence(self._root("nvidia-gpu"), report_data=binding.gpu_nonce())
        return Evidence.from_fake(fake)


def _build(
    module: ModuleType,
    kind: str,
    root: Any,
    binding: Binding,
    measurement: bytes,
    debug: bool,
    options: dict[str, Any],
) -> Any:
    kw: dict[str, Any] = {"report_data": binding.report_data(), "measurement": measurement, "debug": debug}
    if kind == "nitro":
        kw["nonce"] = binding.nonce  # the nitro profile: user_data = report data, nonce = the challenge
    if kind in ("tdx", "sgx"):
        kw["tee"] = kind
    return module.build_evidence(root, **kw, **options)


__all__ = [
    "FAKE_MODULES",
    "SIMULATED_KINDS",
    "DevRootOfTrust",
    "SimulatedTEE",
    "available_kinds",
    "default_measurement",
]
