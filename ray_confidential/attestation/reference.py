"""Building blocks shared by every TEE's reference values (appraisal policy).

A policy must pin measurements. The only way to build one that does not is to pass the sentinel
:data:`UNSAFE_ANY_MEASUREMENT`, which warns when used and which a production broker refuses.

    >>> pins = measurement_pins(["aa" * 48])
    >>> len(pins)
    1
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Final, Literal


class UnsafeAnyMeasurement:
    """Sentinel type: accept any measurement. Development and inspection only."""

    _instance: UnsafeAnyMeasurement | None = None

    def __new__(cls) -> UnsafeAnyMeasurement:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSAFE_ANY_MEASUREMENT"

    def __reduce__(self) -> tuple[type[UnsafeAnyMeasurement], tuple[()]]:
        return (UnsafeAnyMeasurement, ())


UNSAFE_ANY_MEASUREMENT: Final = UnsafeAnyMeasurement()

MeasurementPins = frozenset[bytes] | UnsafeAnyMeasurement


def measurement_pins(
    values: Iterable[bytes | str] | UnsafeAnyMeasurement | Literal["UNSAFE_ANY"],
) -> MeasurementPins:
    """Normalise an allow-list of measurements (bytes or hex strings).

    Raises:
        ValueError: the allow-list is empty (an empty allow-list is never "any"; say so explicitly
            with ``UNSAFE_ANY_MEASUREMENT``).
    """
    if isinstance(values, UnsafeAnyMeasurement) or values == "UNSAFE_ANY":
        warnings.warn(
            "UNSAFE_ANY_MEASUREMENT: this policy accepts any code in the TEE; production brokers refuse it",
            UserWarning,
            stacklevel=2,
        )
        return UNSAFE_ANY_MEASUREMENT
    pins = frozenset(bytes.fromhex(v) if isinstance(v, str) else bytes(v) for v in values)
    if not pins:
        raise ValueError(
            "empty measurement allow-list: list the approved measurements, or pass "
            "UNSAFE_ANY_MEASUREMENT explicitly for development"
        )
    return pins


def is_pinned(pins: MeasurementPins) -> bool:
    """True when ``pins`` is a real allow-list (what a production broker requires)."""
    return not isinstance(pins, UnsafeAnyMeasurement)


def reference_bytes(value: bytes | str, name: str) -> bytes:
    """One reference value from a policy file or code: bytes, or a hex string.

    Raises:
        ValueError: a string that is not hex. TypeError: neither bytes nor a string.
    """
    if isinstance(value, str):
        try:
            return bytes.fromhex(value)
        except ValueError as exc:
            raise ValueError(f"{name} must be hex, e.g. {'00' * 4!r}") from exc
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    raise TypeError(f"{name} must be bytes or a hex string")
