"""Appraisal policy: the reference values evidence must satisfy, one typed policy per TEE kind.

:class:`AppraisalPolicy` composes the backends' own ``Policy`` classes (looked up through the
registry) and enters from serialised form through one :meth:`AppraisalPolicy.from_dict` /
:meth:`AppraisalPolicy.from_yaml` (format: ``docs/attestation-policy.md``). Trust settings (roots,
fetcher, clock) are a separate object, :class:`~ray_confidential.attestation.trust.TrustConfig`.

    >>> AppraisalPolicy.from_dict({"version": 1, "tees": {}})
    Traceback (most recent call last):
    ...
    ValueError: AppraisalPolicy: empty 'tees' allow-list; name at least one TEE kind with its reference values

Empty allow-lists are errors; a policy accepting any measurement must say ``UNSAFE_ANY``
(:data:`~ray_confidential.attestation.reference.UNSAFE_ANY_MEASUREMENT`), warns, and fails
:attr:`AppraisalPolicy.pinned`, which a production broker requires.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ray_confidential.attestation import registry
from ray_confidential.attestation.claims import TEE_KINDS
from ray_confidential.attestation.reference import UnsafeAnyMeasurement

POLICY_FORMAT_VERSION: Final = 1

MEASUREMENT_KEYS: Final[dict[str, str]] = {
    "sev-snp": "measurements",
    "tdx": "mr_td",
    "sgx": "mr_enclave",
    "nitro": "measurements",
    "nvidia-gpu": "measurements",
}
"""The key of each backend's ``Policy.from_dict`` that holds its mandatory measurement allow-list
(SNP MEASUREMENT, TDX MRTD, SGX MRENCLAVE, Nitro PCR0)."""

INSPECTION_SETTINGS: Final[dict[str, dict[str, Any]]] = {
    tee: {key: "UNSAFE_ANY", **({"vmpl": None} if tee == "sev-snp" else {})}
    for tee, key in MEASUREMENT_KEYS.items()
}
"""Per-TEE ``Policy.from_dict`` input of the inspection policy, used when a backend's ``Policy`` has no
``inspection()`` classmethod: any measurement, any VMPL, everything else at the backend's defaults
(debug refused, TCB not checked)."""


class _FrozenMap(Mapping[str, Any]):
    """Read-only mapping that pickles (MappingProxyType does not)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)

    def __reduce__(self) -> tuple[type[_FrozenMap], tuple[dict[str, Any]]]:
        return (_FrozenMap, (self._data,))


@dataclass(frozen=True, slots=True, kw_only=True)
class AppraisalPolicy:
    """Reference values per TEE kind; evidence of a kind not listed here is refused.

    Attributes:
        tees: TEE kind -> that backend's ``Policy`` (e.g. ``ray_confidential.attestation.snp.Policy``).
            Non-empty. For the composite ``nvidia-gpu`` profile both the CPU kind and ``nvidia-gpu``
            must be listed.
        name: a label shown by the CLI and in audit records (``"inspection"`` for
            :meth:`inspection`).

    Raises:
        ValueError: ``tees`` is empty or names an unknown TEE kind.
        TypeError: a value is not the ``Policy`` class of its kind's backend.
    """

    tees: Mapping[str, Any]
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.tees:
            raise ValueError(
                "AppraisalPolicy: empty 'tees' allow-list; name at least one TEE kind with its reference values"
            )
        for tee, policy in self.tees.items():
            if tee not in TEE_KINDS:
                raise ValueError(
                    f"AppraisalPolicy: unknown TEE kind {tee!r}; known kinds: {', '.join(TEE_KINDS)}"
                )
            policy_cls = registry.backend(tee).Policy
            if not isinstance(policy, policy_cls):
                raise TypeError(
                    f"AppraisalPolicy: the policy for {tee!r} must be {policy_cls.__module__}.Policy, "
                    f"got {type(policy).__name__}"
                )
        object.__setattr__(self, "tees", _FrozenMap(self.tees))

    def for_tee(self, tee: str) -> Any | None:
        """The backend policy for ``tee``, or None when this policy does not admit that kind."""
        return self.tees.get(tee)

    @property
    def pinned(self) -> bool:
        """True when no per-TEE policy accepts any measurement (what a production broker requires)."""
        return not any(_accepts_any_measurement(p) for p in self.tees.values())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AppraisalPolicy:
        """Build from the serialised form ``{"version": 1, "name": ..., "tees": {kind: {...}}}``.

        Each ``tees`` entry is handed to that backend's ``Policy.from_dict``.

        Raises:
            ValueError: unknown keys, wrong version, empty ``tees``, or a backend's own error.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"AppraisalPolicy: expected a mapping, got {type(data).__name__}")
        unknown = set(data) - {"version", "name", "tees"}
        if unknown:
            raise ValueError(f"AppraisalPolicy: unknown keys {sorted(unknown)}; allowed: version, name, tees")
        if data.get("version") != POLICY_FORMAT_VERSION:
            raise ValueError(
                f"AppraisalPolicy: 'version' must be {POLICY_FORMAT_VERSION}, got {data.get('version')!r}"
            )
        tees = data.get("tees")
        if not isinstance(tees, Mapping):
            raise ValueError("AppraisalPolicy: 'tees' must be a mapping of TEE kind -> reference values")
        built: dict[str, Any] = {}
        for tee, section in tees.items():
            if tee not in TEE_KINDS:
                raise ValueError(
                    f"AppraisalPolicy: unknown TEE kind {tee!r}; known kinds: {', '.join(TEE_KINDS)}"
                )
            if not isinstance(section, Mapping):
                raise ValueError(f"AppraisalPolicy: the section for {tee!r} must be a mapping")
            try:
                built[tee] = registry.backend(tee).Policy.from_dict(dict(section))
            except (TypeError, KeyError) as exc:
                raise ValueError(f"AppraisalPolicy: invalid section for {tee!r}: {exc}") from exc
        name = data.get("name", "custom")
        if not isinstance(name, str):
            raise ValueError("AppraisalPolicy: 'name' must be a string")
        return cls(tees=built, name=name)

    @classmethod
    def from_yaml(cls, source: str | bytes | os.PathLike[str]) -> AppraisalPolicy:
        """Load from YAML text, or from a file when ``source`` is a path.

        Raises:
            ValueError: not valid YAML, or see :meth:`from_dict`.
        """
        import yaml  # imported here: keep `import ray_confidential.attestation` light

        text = Path(source).read_bytes() if isinstance(source, os.PathLike) else source
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"AppraisalPolicy: not valid YAML: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_measurements(
        cls, pins: Mapping[str, Iterable[bytes | str]], *, name: str = "custom"
    ) -> AppraisalPolicy:
        """A policy pinning only each kind's measurement, backend defaults otherwise.

            AppraisalPolicy.from_measurements({"sev-snp": [launch_digest]})   # doctest: +SKIP

        Raises:
            ValueError: an empty allow-list, or see :meth:`from_dict`.
        """
        tees: dict[str, Any] = {}
        for tee, values in pins.items():
            if tee not in MEASUREMENT_KEYS:
                raise ValueError(
                    f"AppraisalPolicy: unknown TEE kind {tee!r}; known kinds: {', '.join(TEE_KINDS)}"
                )
            hexes = [v if isinstance(v, str) else bytes(v).hex() for v in values]
            if not hexes:
                raise ValueError(f"AppraisalPolicy: empty measurement allow-list for {tee!r}")
            tees[tee] = {MEASUREMENT_KEYS[tee]: hexes}
        return cls.from_dict({"version": POLICY_FORMAT_VERSION, "name": name, "tees": tees})

    @classmethod
    def inspection(cls, tees: Iterable[str] | None = None) -> AppraisalPolicy:
        """The CLI's policy when none is given: allow-listed vendor roots (the trust config's job),
        debug refused, ANY measurement, any VMPL, TCB not checked.

        A verification tool's policy: it is not :attr:`pinned`, so a production broker refuses it.
        The ``UNSAFE_ANY`` warning is not repeated here; the name says it.

        Args:
            tees: kinds to include (default: every kind whose backend is available).
        """
        kinds = list(tees) if tees is not None else list(registry.available())
        built: dict[str, Any] = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="UNSAFE_ANY_MEASUREMENT", category=UserWarning)
            for tee in kinds:
                policy_cls = registry.backend(tee).Policy
                make = getattr(policy_cls, "inspection", None)
                built[tee] = (
                    make() if callable(make) else policy_cls.from_dict(dict(INSPECTION_SETTINGS[tee]))
                )
        return cls(tees=built, name="inspection")


def _accepts_any_measurement(policy: Any) -> bool:
    if dataclasses.is_dataclass(policy):
        values = [getattr(policy, f.name) for f in dataclasses.fields(policy)]
    else:
        values = list(vars(policy).values()) if hasattr(policy, "__dict__") else []
    return any(isinstance(v, UnsafeAnyMeasurement) for v in values)


__all__ = ["INSPECTION_SETTINGS", "MEASUREMENT_KEYS", "POLICY_FORMAT_VERSION", "AppraisalPolicy"]
