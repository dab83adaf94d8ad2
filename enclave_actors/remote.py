"""``@ray_confidential.remote(domain=...)``: confidential Ray tasks for module-level functions.

    import ray_confidential as rc

    @rc.remote(domain="hospital")
    def mean_age(table):                      # runs inside an enclave executor, on plaintext
        return table["age"].to_numpy().mean()

    ref = mean_age.remote(rc.put(table, domain="hospital"))   # a SealedRef
    rc.get(ref)                                               # the owner opens the result

The Ray task is a thin, untrusted shim (:func:`_shim_task`) placed on a node labelled
``ray-confidential.io/tee``; it hands the executor the function's code bundle (its module's
source), the sealed inputs and the plain parameters, and returns the sealed result. Arguments
that are ``SealedRef`` become sealed inputs; any other argument must be a JSON value (a plain
parameter, at most 64 KiB in all, visible to Ray). Inside the executor the decorator is inert: it
returns a wrapper whose ``__rc_function__`` is the function itself.

What it does NOT do: actors, pools, regions or narrowing options (later issues), or any security
check (the executor does those).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

from ray_confidential.bundle import WRAPPED_ATTR, Bundle, from_callable

TEE_LABEL: Final = "ray-confidential.io/tee"
TEE_KINDS: Final = ("sev-snp", "tdx", "sgx", "nitro")
MAX_PARAMS_BYTES: Final = 64 << 10


def _shim_task(spec: dict[str, Any], bundle: Bundle, *payloads: Any) -> Any:
    """The Ray task body (untrusted glue): forward to the local executor, return sealed bytes."""
    from enclave_actors.shim import ExecutorClient
    from ray_confidential.api import _SealedPayload

    client = ExecutorClient.from_env()
    inputs = [p.data if isinstance(p, _SealedPayload) else p for p in payloads]
    sealed = client.call(
        bundle,
        domain=spec["domain"],
        inputs=inputs,
        args=spec["args"],
        kwargs=dict(zip(spec["kwarg_names"], spec["kwargs"], strict=True)),
        timeout_s=spec.get("timeout_s"),
        recipient=spec.get("recipient"),
    )
    return _SealedPayload(sealed)


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
        self._domain = domain
        self._options = options
        self._bundle: Bundle | None = None
        self._task: Any = None

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
        """A copy with other options (``timeout_s``, ``recipient``, ``tee`` or Ray task options)."""
        copy = ConfidentialFunction(getattr(self, WRAPPED_ATTR), domain=options.pop("domain", self._domain),
                                    options={**self._options, **options})  # fmt: skip
        copy._bundle = self._bundle
        return copy

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Submit the call; returns a ``SealedRef`` to the sealed result (``rc.get`` opens it).

        The ref's ``key_version`` and ``object_id`` are 0 and "" until the call completes (they are
        decided inside the executor); ``rc.get`` and ``rc.export`` work on it as on any SealedRef.
        """
        import ray

        from ray_confidential.api import SealedRef

        spec, refs = encode_call(args, kwargs)
        spec.update(domain=self._domain, timeout_s=self._options.get("timeout_s"),
                    recipient=self._options.get("recipient"))  # fmt: skip
        if self._task is None:
            self._task = ray.remote(_shim_task).options(**self._ray_options())
        object_ref = self._task.remote(spec, self.bundle, *refs)
        return SealedRef(object_ref, domain=self._domain, key_version=0, object_id="", size=0)

    def _ray_options(self) -> dict[str, Any]:
        opts = {k: v for k, v in self._options.items() if k not in ("timeout_s", "recipient", "tee")}
        opts.setdefault("label_selector", placement(self._options.get("tee")))
        opts.setdefault("max_retries", 0)
        return opts


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


def placement(tee: str | tuple[str, ...] | list[str] | None) -> dict[str, str]:
    """The ``label_selector`` of a confidential task or actor: nodes labelled with an allowed TEE kind,
    or, for development executors ``rc.init`` started on nodes Ray cannot label (row 2 of its table),
    those nodes by ``ray.io/node-id``."""
    kinds = (tee,) if isinstance(tee, str) else tuple(tee or TEE_KINDS)
    from ray_confidential import api

    session = api._session
    services = session.services if session is not None else None
    routing = tuple(getattr(services, "routing_nodes", ()))
    if routing and "sev-snp" in kinds:
        return {"ray.io/node-id": f"in({','.join(routing)})"}
    return {TEE_LABEL: f"in({','.join(kinds)})"}


def remote(*, domain: str, **options: Any) -> Callable[[Callable[..., Any]], ConfidentialFunction]:
    """Decorate a module-level function to run confidentially in an enclave executor.

    Args:
        domain: the domain whose policy must approve this function's bundle; results are sealed to it.
        **options: ``timeout_s`` (per-call limit, capped by the executor), ``recipient`` (a
            policy-listed "suite:hex" key to seal results to), ``tee`` (kind or kinds), and Ray task
            options such as ``num_cpus``.
    """
    if callable(domain):
        raise TypeError("use @ray_confidential.remote(domain='name'), not @ray_confidential.remote")

    def decorate(fn: Callable[..., Any]) -> ConfidentialFunction:
        return ConfidentialFunction(fn, domain=domain, options=dict(options))

    return decorate


__all__ = ["TEE_LABEL", "ConfidentialFunction", "encode_call", "placement", "remote"]
