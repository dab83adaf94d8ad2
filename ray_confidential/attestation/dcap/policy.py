"""Helpers shared by the TDX and SGX appraisal policies (normalising pins, TCB status sets).

    >>> sorted(tcb_statuses(["UpToDate", "SWHardeningNeeded"]))
    ['SWHardeningNeeded', 'UpToDate']

These helpers build and compare reference values; they do NOT verify evidence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ray_confidential.attestation.claims import Violation
from ray_confidential.attestation.reference import MeasurementPins, UnsafeAnyMeasurement, measurement_pins

from .collateral import STATUSES


def fixed_hex(value: bytes | str | None, size: int, name: str) -> bytes | None:
    """None, or exactly ``size`` bytes (bytes or hex)."""
    if value is None:
        return None
    raw = bytes.fromhex(value) if isinstance(value, str) else bytes(value)
    if len(raw) != size:
        raise ValueError(f"{name} must be {size} bytes ({2 * size} hex digits), got {len(raw)}")
    return raw


def pins(value: Any, size: int, name: str) -> MeasurementPins:
    """Mandatory measurement allow-list (``reference.measurement_pins``) with a size check."""
    if isinstance(value, UnsafeAnyMeasurement):
        return value
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a list of values (or UNSAFE_ANY_MEASUREMENT), not a single value")
    result = measurement_pins(value)
    if not isinstance(result, UnsafeAnyMeasurement):
        for v in result:
            if len(v) != size:
                raise ValueError(f"{name} pins must be {size} bytes each, got {len(v)}")
    return result


def optional_pins(value: Any, size: int, name: str) -> frozenset[bytes] | None:
    """None (not checked) or a non-empty allow-list of ``size``-byte values."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        value = [value]
    out = frozenset(bytes.fromhex(v) if isinstance(v, str) else bytes(v) for v in value)
    if not out:
        raise ValueError(f"{name}: empty allow-list; use None for 'not checked'")
    if any(len(v) != size for v in out):
        raise ValueError(f"{name} values must be {size} bytes each")
    return out


def tcb_statuses(value: Iterable[str] | None) -> frozenset[str] | None:
    """None or a non-empty set of Intel TCB status names."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    out = frozenset(value)
    unknown = out - set(STATUSES)
    if not out or unknown:
        raise ValueError(
            f"accepted_tcb_statuses must be a non-empty subset of {STATUSES}; unknown: {sorted(unknown)}"
        )
    return out


def one_of(values: Iterable[bytes]) -> str:
    return "one of [" + ", ".join(sorted(v.hex() for v in values)) + "]"


def check_pins(
    out: list[Violation], field: str, got: bytes | None, allowed: MeasurementPins | frozenset[bytes] | None
) -> None:
    if allowed is None or isinstance(allowed, UnsafeAnyMeasurement):
        return
    if got is None or got not in allowed:
        out.append(
            Violation(field=field, got=got.hex() if got is not None else "missing", want=one_of(allowed))
        )


def check_common(
    out: list[Violation],
    claims: Any,
    *,
    tee: str,
    allow_debug: bool,
    report_data: bytes | None,
    accepted_tcb_statuses: frozenset[str] | None,
) -> None:
    """Checks every DCAP policy makes: TEE kind, debug, report data, TCB status."""
    if claims.tee != tee:
        out.append(Violation(field="tee", got=str(claims.tee), want=tee))
    if claims.debug and not allow_debug:
        out.append(Violation(field="debug", got="true", want="false"))
    if report_data is not None and claims.report_data != report_data:
        out.append(Violation(field="report_data", got=claims.report_data.hex(), want=report_data.hex()))
    if accepted_tcb_statuses is not None and claims.tcb_status not in accepted_tcb_statuses:
        out.append(
            Violation(
                field="tcb_status",
                got=str(claims.tcb_status),
                want="one of " + str(sorted(accepted_tcb_statuses)),
            )
        )


def reject_unknown_keys(d: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
    unknown = set(d) - set(allowed)
    if unknown:
        raise ValueError(f"{what}: unknown policy keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def policy_args(
    d: Mapping[str, Any], allowed: Iterable[str], *, what: str, pin_field: str, pin_what: str
) -> dict[str, Any]:
    """Keyword arguments for a policy class from YAML/JSON ``d``: unknown keys refused, the mandatory
    measurement allow-list ``pin_field`` (hex values, or ``UNSAFE_ANY``) normalised."""
    reject_unknown_keys(d, allowed, what)
    if pin_field not in d:
        raise ValueError(f"{what} needs {pin_field} (a list of {pin_what} hex values, or UNSAFE_ANY)")
    args = dict(d)
    pinned = args.pop(pin_field)
    args[pin_field] = measurement_pins(pinned if pinned == "UNSAFE_ANY" else list(pinned))
    return args
