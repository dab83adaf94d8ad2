"""``@ray_confidential.enclave_actor(domain=...)``: actors whose state lives in an enclave executor.

    import ray_confidential as rc

    @rc.enclave_actor(domain="hospital")
    class Counter:                                  # runs inside an executor subprocess, on plaintext
        def __init__(self, start):
            self.total = start
        def add(self, table):
            self.total += table.num_rows
            return self.total

    counter = Counter.remote(0)                     # an EnclaveActorHandle
    ref = counter.add.remote(rc.put(table, domain="hospital"))    # a SealedRef
    rc.get(ref)                                     # the owner opens the result

The Ray actor is an untrusted shim (:class:`_EnclaveShim`) placed like a confidential task (the
same options and checks, ``scheduler.calls``: placement is decided once, at ``.remote()``); on
creation it opens its own connection to the node's executor, which starts a worker subprocess
dedicated to this instance and constructs the class there from sealed inputs and plain parameters.
Method calls route to that subprocess and return results sealed to the domain. The instance never
leaves it: when the Ray actor dies its connection closes and the executor ends the subprocess; on
revocation the executor stops it (the state is lost, docs/executor.md). The shim's ``repr`` shows
its trust state, e.g. ``Enclave[sev-snp pool=eu attested-until=2025-01-01T00:05:00Z]``.

What it does NOT do: pass actor handles into other confidential calls, async or concurrent methods,
or restart an actor (``max_restarts`` is 0: a restarted shim would have lost the state anyway).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import Any

from ray_confidential.bundle import WRAPPED_ATTR, Bundle, from_callable


def _format_until(ts: Any) -> str:
    try:
        when = datetime.datetime.fromtimestamp(float(ts), datetime.timezone.utc)
    except (TypeError, ValueError, OverflowError):
        return "?"
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class _EnclaveShim:
    """The Ray actor body (untrusted glue): one executor connection, one enclave actor behind it."""

    def __init__(self, spec: dict[str, Any], bundle: Bundle, *payloads: Any) -> None:
        from enclave_actors.shim import ExecutorClient, resolve_socket_path
        from ray_confidential.api import sealed_data

        # A dedicated connection: the executor ends the actor's subprocess when it closes.
        self._client = ExecutorClient(resolve_socket_path())
        self._timeout = spec.get("timeout_s")
        self._name = str(spec.get("class_name", "actor"))
        state = self._client.actor_create(
            bundle,
            domain=spec["domain"],
            inputs=[sealed_data(p) for p in payloads],
            args=spec["args"],
            kwargs=dict(zip(spec["kwarg_names"], spec["kwargs"], strict=True)),
            timeout_s=self._timeout,
        )
        self._actor_id = str(state["actor_id"])
        self._state = {k: state.get(k) for k in ("tee", "pool", "region", "node_id", "attested_until")}

    def call(self, method: str, spec: dict[str, Any], *payloads: Any) -> Any:
        from ray_confidential.api import sealed_data, storable

        sealed, state = self._client.actor_call(
            self._actor_id,
            method,
            inputs=[sealed_data(p) for p in payloads],
            args=spec["args"],
            kwargs=dict(zip(spec["kwarg_names"], spec["kwargs"], strict=True)),
            timeout_s=self._timeout,
        )
        if state.get("attested_until") is not None:
            self._state["attested_until"] = state["attested_until"]
        return storable(sealed)

    def trust_state(self) -> dict[str, Any]:
        """Where the actor's state lives (public metadata only), and this shim's repr."""
        return {**self._state, "repr": repr(self)}

    def __repr__(self) -> str:
        s = getattr(self, "_state", None) or {}
        return (f"Enclave[{s.get('tee', '?')} pool={s.get('pool') or '-'} "
                f"attested-until={_format_until(s.get('attested_until'))}]")  # fmt: skip


class _EnclaveMethod:
    def __init__(self, handle: EnclaveActorHandle, name: str) -> None:
        self._handle, self._name = handle, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Call the method inside the executor; returns a ``SealedRef`` to the sealed result."""
        from enclave_actors.remote import encode_call, seal_arguments_for
        from ray_confidential.api import SealedRef

        spec, refs = encode_call(*seal_arguments_for(self._handle.domain, args, kwargs))
        ref = self._handle.actor.call.remote(self._name, spec, *refs)
        return SealedRef(ref, domain=self._handle.domain, key_version=0, object_id="", size=0)


class EnclaveActorHandle:
    """What ``EnclaveClass.remote(...)`` returns: ``handle.method.remote(...)`` -> ``SealedRef``.

    ``actor`` is the underlying Ray actor handle (the shim): ``ray.kill(handle.actor)`` ends the
    enclave actor too.
    """

    def __init__(self, actor: Any, *, domain: str, class_name: str) -> None:
        self.actor, self.domain, self.class_name = actor, domain, class_name

    def __getattr__(self, name: str) -> _EnclaveMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _EnclaveMethod(self, name)

    def trust_state(self) -> Any:
        """An ObjectRef of the shim's trust state: ``tee``, ``pool``, ``region``, ``node_id``,
        ``attested_until`` and ``repr`` (``Enclave[...]``)."""
        return self.actor.trust_state.remote()

    def __repr__(self) -> str:
        return f"EnclaveActorHandle({self.class_name}, domain={self.domain!r})"


class EnclaveActorClass:
    """What ``@ray_confidential.enclave_actor(domain=...)`` returns. Call ``.remote(...)``."""

    def __init__(self, cls: type, *, domain: str, options: dict[str, Any]) -> None:
        if not isinstance(domain, str) or not domain:
            raise TypeError(
                "domain must be a domain name, e.g. @ray_confidential.enclave_actor(domain='hospital')"
            )
        if not isinstance(cls, type):
            raise TypeError("@ray_confidential.enclave_actor decorates a class; use @ray_confidential.remote "
                            "for functions")  # fmt: skip
        setattr(self, WRAPPED_ATTR, cls)
        self.__wrapped__ = cls
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__module__ = cls.__module__
        self.__doc__ = cls.__doc__
        from scheduler.calls import check_static

        check_static(options)  # static only: no cluster, no policy (may run at import time)
        if "recipient" in options or "recipients" in options:
            raise ValueError("enclave actor results are sealed to the domain; recipients are not supported")
        self._domain = domain
        self._options = options
        self._bundle: Bundle | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"enclave actor class {self.__name__!r} cannot be instantiated directly; "
            f"use {self.__name__}.remote(...) (its state lives inside an enclave executor)"
        )

    @property
    def bundle(self) -> Bundle:
        """The code bundle (module source + class name) whose digest the domain must approve."""
        if self._bundle is None:
            self._bundle = from_callable(getattr(self, WRAPPED_ATTR))
        return self._bundle

    def options(self, **options: Any) -> EnclaveActorClass:
        """A new handle with these options added (``tee``, ``pools``, ``regions``, ``gpu_cc``,
        ``timeout_s`` or Ray actor options such as ``num_cpus``); this one is unchanged."""
        copy = EnclaveActorClass(getattr(self, WRAPPED_ATTR), domain=options.pop("domain", self._domain),
                                 options={**self._options, **options})  # fmt: skip
        copy._bundle = self._bundle
        return copy

    def remote(self, *args: Any, **kwargs: Any) -> EnclaveActorHandle:
        """Create the actor: a Ray shim actor and, behind it, the instance inside the executor."""
        import ray

        from enclave_actors.remote import encode_call, seal_arguments_for
        from scheduler.calls import call_options

        spec, refs = encode_call(*seal_arguments_for(self._domain, args, kwargs))
        spec.update(domain=self._domain, timeout_s=self._options.get("timeout_s"), class_name=self.__name__)
        opts = call_options(self._domain, self._options)
        opts.setdefault("max_restarts", 0)
        actor = ray.remote(_EnclaveShim).options(**opts).remote(spec, self.bundle, *refs)
        return EnclaveActorHandle(actor, domain=self._domain, class_name=self.__name__)


def enclave_actor(
    *,
    domain: str,
    tee: str | Sequence[str] | None = None,
    pools: str | Sequence[str] | None = None,
    regions: str | Sequence[str] | None = None,
    **options: Any,
) -> Callable[[type], EnclaveActorClass]:
    """Decorate a module-level class whose instances live inside an enclave executor.

    Args:
        domain: the domain whose policy must approve this class's bundle; results are sealed to it.
        tee, pools, regions: narrow the domain policy (as ``@rc.remote``).
        **options: ``timeout_s`` (per call), ``gpu_cc``, and Ray actor options (``num_cpus``,
            ``name``, ``lifetime``, ...); widening options are refused as for ``@rc.remote``.
    """
    if isinstance(domain, type):
        raise TypeError(
            "use @ray_confidential.enclave_actor(domain='name'), not @ray_confidential.enclave_actor"
        )
    narrowing = {k: v for k, v in (("tee", tee), ("pools", pools), ("regions", regions)) if v is not None}
    all_options = {**options, **narrowing}
    from scheduler.calls import check_static

    check_static(all_options)

    def decorate(cls: type) -> EnclaveActorClass:
        return EnclaveActorClass(cls, domain=domain, options=dict(all_options))

    return decorate


__all__ = ["EnclaveActorClass", "EnclaveActorHandle", "enclave_actor"]
