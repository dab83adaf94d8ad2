"""``@ray_confidential.remote(domain=...)``: confidential Ray tasks for module-level functions.

    import ray_confidential as rc

    @rc.remote(domain="hospital")
    def mean_age(table):                      # runs inside an enclave executor, on plaintext
        return table["age"].to_numpy().mean()

    ref = mean_age.remote(rc.put(table, domain="hospital"))   # a SealedRef
    rc.get(ref)                                               # the owner opens the result

The Ray task is a thin, untrusted shim (:func:`_shim_task`); it hands the executor the function's
code bundle (its module's source), the sealed inputs and the plain parameters, and returns the
sealed result. Inside the executor the decorator is inert: it returns a wrapper whose
``__rc_function__`` is the function itself.

Contract (docs/executor.md "Decorated calls"):

* ``.remote(...)`` returns a :class:`~ray_confidential.SealedRef` directly (its ``object_ref`` is the
  shim task's ObjectRef, whose value is the sealed result); ``rc.get`` / ``rc.export`` accept it and
  also an ObjectRef holding one.
* Arguments: ``SealedRef`` pass by reference (sealed inputs); any other argument must be a JSON value
  (a plain parameter, at most :data:`MAX_PARAMS_BYTES` = 64 KiB in all, visible to Ray), unless the
  domain's policy sets ``seal_arguments``: then every other argument is sealed with ``rc.put`` first
  (:func:`seal_arguments_for`) and the executor refuses plain parameters.
* Placement (``scheduler.calls``): the decorator checks options statically (it may run at import
  time, before ``rc.init``); each ``.remote()`` computes a ``label_selector`` over the trust
  registry's attested nodes from the domain policy narrowed by ``tee`` / ``pools`` / ``regions`` /
  ``gpu_cc``, waiting at most ``rc.init(placement_wait_s=...)`` before ``NoAttestedNodeError``.
  Options that could widen placement are refused with the fix in the message.
* Retries: ``max_retries`` (default 0) re-runs the call at least once more on failure; a retry keeps
  the selector, so it lands only on a node that qualified at submission (at-least-once).

What it does NOT do: any security check (the executor and the broker do those).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Final

from ray_confidential.bundle import WRAPPED_ATTR, Bundle, from_callable

TEE_LABEL: Final = "ray-confidential.io/tee"
TEE_KINDS: Final = ("sev-snp", "tdx", "sgx", "nitro")
MAX_PARAMS_BYTES: Final = 64 << 10


_UNPACKED: dict[str, Bundle] = {}
"""Bundles this Ray worker has unpacked, by digest (each checked against it; a handful per job)."""


def shim_bundle(value: Bundle | list[Any]) -> Bundle:
    """The bundle a shim was handed: a ``Bundle``, or its ``Bundle.pack()`` form (what decorated
    calls send, unpacked once per worker and digest)."""
    if isinstance(value, Bundle):
        return value
    named = value[0] if isinstance(value, list) and value else None
    bundle = _UNPACKED.get(named) if isinstance(named, str) else None
    if bundle is None:
        bundle = Bundle.unpack(value)
        if len(_UNPACKED) >= 32:
            _UNPACKED.clear()
        _UNPACKED[bundle.digest_hex] = bundle
    return bundle


def _shim_task(spec: dict[str, Any], bundle: Bundle | list[Any], *payloads: Any) -> Any:
    """The Ray task body (untrusted glue): forward to the local executor, return sealed bytes."""
    from enclave_actors.shim import ExecutorClient
    from ray_confidential.api import sealed_data, storable

    client = ExecutorClient.from_env()
    inputs = [sealed_data(p) for p in payloads]
    sealed = client.call(
        shim_bundle(bundle),
        domain=spec["domain"],
        inputs=inputs,
        args=spec["args"],
        kwargs=dict(zip(spec["kwarg_names"], spec["kwargs"], strict=True)),
        timeout_s=spec.get("timeout_s"),
        recipient=spec.get("recipient"),
    )
    return storable(sealed)


class ConfidentialFunction:
    """What ``@ray_confidential.remote(domain=...)`` returns. Call ``.remote(...)``."""

    def __init__(self, fn: Callable[..., Any], *, domain: str, options: dict[str, Any]) -> None:
        if not isinstance(domain, str) or not domain:
            raise TypeError("domain must be a domain name, e.g. @ray_confidential.remote(domain='hospital')")
        setattr(self, WRAPPED_ATTR, fn)
        self.__wrapped__ = fn
        self.__name__ = getattr(fn, "__name__", "confidential")
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)
        self.__module__ = getattr(fn, "__module__", __name__)
        self.__doc__ = getattr(fn, "__doc__", None)
        from scheduler.calls import check_static

        check_static(options)  # static only: no cluster, no policy (may run at import time)
        self._domain = domain
        self._options = options
        self._bundle: Bundle | None = None
        self._packed: list[Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"confidential function {self.__name__!r} cannot be called directly; "
            f"use {self.__name__}.remote(...) (it runs inside an enclave executor)"
        )

    @property
    def bundle(self) -> Bundle:
        """The code bundle (module source + entry point) whose digest the domain must approve."""
        if self._bundle is None:
            self._bundle = from_callable(getattr(self, WRAPPED_ATTR))
        return self._bundle

    def options(self, **options: Any) -> ConfidentialFunction:
        """A new handle with these options added (``tee``, ``pools``, ``regions``, ``gpu_cc``,
        ``timeout_s``, ``recipients`` or Ray task options); this one is unchanged."""
        copy = ConfidentialFunction(getattr(self, WRAPPED_ATTR), domain=options.pop("domain", self._domain),
                                    options={**self._options, **options})  # fmt: skip
        copy._bundle, copy._packed = self._bundle, self._packed
        return copy

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Submit the call; returns a ``SealedRef`` to the sealed result (``rc.get`` opens it).

        The ref's ``key_version`` and ``object_id`` are 0 and "" until the call completes (they are
        decided inside the executor); ``rc.get`` and ``rc.export`` work on it as on any SealedRef.
        """
        from ray_confidential.api import SealedRef
        from scheduler.calls import call_options, recipient

        spec, refs = encode_call(*seal_arguments_for(self._domain, args, kwargs))
        spec.update(domain=self._domain, timeout_s=self._options.get("timeout_s"),
                    recipient=recipient(self._options))  # fmt: skip
        opts = call_options(self._domain, self._options)
        opts.setdefault("max_retries", 0)
        if self._packed is None:
            self._packed = self.bundle.pack()
        object_ref = _shim_with(opts).remote(spec, self._packed, *refs)
        return SealedRef(object_ref, domain=self._domain, key_version=0, object_id="", size=0)


_SHIM: Any = None


def _shim_remote() -> Any:
    global _SHIM
    if _SHIM is None:
        import ray

        _SHIM = ray.remote(_shim_task)
    return _SHIM


_SHIM_OPTIONS: dict[Any, Any] = {}
"""``_shim_task`` with Ray options applied, by the options (placement changes them only when the
trust registry or the call's options change)."""


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return ("dict", *((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return (type(value).__name__, *(_freeze(v) for v in value))
    hash(value)  # TypeError for anything else unhashable
    return (type(value).__name__, value)


def _shim_with(opts: dict[str, Any]) -> Any:
    """``_shim_remote().options(**opts)``, reused while the options are the same (Ray builds and
    validates a wrapper per ``.options()`` call, about 40 µs of the driver's time per call)."""
    try:
        key = _freeze(opts)
    except TypeError:
        return _shim_remote().options(**opts)
    shim = _SHIM_OPTIONS.get(key)
    if shim is None:
        if len(_SHIM_OPTIONS) >= 64:
            _SHIM_OPTIONS.clear()
        shim = _SHIM_OPTIONS[key] = _shim_remote().options(**opts)
    return shim


def seal_arguments_for(
    domain: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwargs`` with every value that is not a ``SealedRef`` sealed to ``domain``
    (``rc.put``) when the domain's descriptor sets ``seal_arguments``; unchanged otherwise."""
    from ray_confidential.api import SealedRef, _session_or_die, put

    if not (args or kwargs) or not _session_or_die().key_service.descriptor(domain).seal_arguments:
        return args, kwargs

    def sealed(value: Any) -> Any:
        return value if isinstance(value, SealedRef) else put(value, domain=domain)

    return tuple(sealed(a) for a in args), {k: sealed(v) for k, v in kwargs.items()}


def encode_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """Plain parameters (``["j", v]``) and sealed inputs (``["s", i]``, their ObjectRefs in order).

    Raises:
        TypeError: an argument is neither a SealedRef nor a JSON value.
        ValueError: plain parameters over 64 KiB.
    """
    from ray_confidential.api import SealedRef

    refs: list[Any] = []

    def encode(value: Any) -> list[Any]:
        if isinstance(value, SealedRef):
            refs.append(value.object_ref)
            return ["s", len(refs) - 1]
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise TypeError(
                f"argument of type {type(value).__name__} is neither a SealedRef nor a JSON value; "
                "seal it with rc.put(value, domain=...) and pass the SealedRef"
            ) from None
        return ["j", value]

    spec = {"args": [encode(a) for a in args], "kwarg_names": list(kwargs),
            "kwargs": [encode(v) for v in kwargs.values()]}  # fmt: skip
    if len(json.dumps([spec["args"], spec["kwargs"]])) > MAX_PARAMS_BYTES:
        raise ValueError("plain parameters of a confidential call are limited to 64 KiB; seal larger data")
    return spec, refs


def remote(
    *,
    domain: str,
    tee: str | Sequence[str] | None = None,
    pools: str | Sequence[str] | None = None,
    regions: str | Sequence[str] | None = None,
    recipients: str | Sequence[str] | None = None,
    **options: Any,
) -> Callable[[Callable[..., Any]], ConfidentialFunction]:
    """Decorate a module-level function to run confidentially in an enclave executor.

    Args:
        domain: the domain whose policy must approve this function's bundle; results are sealed to it.
        tee, pools, regions: narrow the domain policy's TEE kinds, pools and regions (a name or a
            sequence; ``"*"`` = as the policy); a value outside the policy is refused at ``.remote()``.
        recipients: seal results to this policy-listed ``"suite:hex"`` key instead (one).
        **options: ``timeout_s`` (per-call limit, capped by the executor), ``gpu_cc``, and Ray task
            options (``num_cpus``, ``num_gpus``, ``memory``, ``max_retries``, ``name``, ...).
            ``fallback_strategy``, scheduling strategies and placement groups are refused.
    """
    if callable(domain):
        raise TypeError("use @ray_confidential.remote(domain='name'), not @ray_confidential.remote")
    narrowing = {k: v for k, v in (("tee", tee), ("pools", pools), ("regions", regions),
                                   ("recipients", recipients)) if v is not None}  # fmt: skip
    all_options = {**options, **narrowing}
    from scheduler.calls import check_static

    check_static(all_options)

    def decorate(fn: Callable[..., Any]) -> ConfidentialFunction:
        return ConfidentialFunction(fn, domain=domain, options=dict(all_options))

    return decorate


__all__ = [
    "MAX_PARAMS_BYTES",
    "TEE_LABEL",
    "ConfidentialFunction",
    "encode_call",
    "remote",
    "seal_arguments_for",
]
