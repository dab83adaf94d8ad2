"""Placement for decorated calls: static option checks at decoration, Ray options at ``.remote()``.

    check_static(options)                         # @rc.remote / @rc.enclave_actor / .options()
    ray_opts = call_options("hospital", options)  # .remote(): stock Ray options with the selector

:func:`check_static` needs no cluster (decorators may run at import time, before ``rc.init``): it
refuses options that could widen placement and checks the syntax of the narrowing options.
:func:`call_options` runs at each ``.remote()``: it reads the domain's policy, narrows it by the call's
``tee`` / ``pools`` / ``regions`` / ``gpu_cc`` and ``label_selector``, and asks the session's
:class:`~scheduler.placement.Placer` (over the trust registry, verified with the pinned statement
key) for a ``label_selector``; it waits at most ``rc.init(placement_wait_s=...)`` for a qualifying
node, then raises :class:`~ray_confidential.errors.NoAttestedNodeError`.

Where the pinned statement key comes from: the embedded development broker's, put in the session by
``rc.init(dev=True)``; otherwise ``$RAY_CONFIDENTIAL_STATEMENT_KEY`` (PEM file) and
``$RAY_CONFIDENTIAL_CLUSTER_ID`` (the registry id), from the driver's own configuration, never from Ray.
Without either, a confidential call fails closed with an error that says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final

from ray_confidential.domains import DomainPolicy
from ray_confidential.errors import NoAttestedNodeError
from scheduler.labels import TEE_KINDS, check_label_value
from scheduler.placement import Placer, _names, check_refused_options

PLACEMENT_OPTIONS: Final = ("tee", "pools", "regions", "gpu_cc")
"""Narrowing options of ``@rc.remote`` / ``@rc.enclave_actor`` (not passed to Ray)."""
SHIM_OPTIONS: Final = ("timeout_s", "recipient", "recipients")
"""Options the shim and executor use (not passed to Ray)."""
STATEMENT_KEY_ENV: Final = "RAY_CONFIDENTIAL_STATEMENT_KEY"
CLUSTER_ID_ENV: Final = "RAY_CONFIDENTIAL_CLUSTER_ID"


def check_static(options: Mapping[str, Any]) -> None:
    """Checks that need no cluster and no policy (decoration and ``.options()``).

    Raises:
        ValueError / TypeError: a refused Ray option (``fallback_strategy``, a scheduling strategy,
            placement groups), a malformed ``label_selector``, or a malformed narrowing option.
    """
    tee = _names(options.get("tee"), "tee")
    for t in tee or ():
        if t != "*" and t not in TEE_KINDS:
            raise ValueError(f"tee {t!r} is not one of {list(TEE_KINDS)} (or '*')")
    for what in ("pools", "regions"):
        for v in _names(options.get(what), what) or ():
            if v != "*":
                check_label_value(v, what=what[:-1])
    gpu_cc = options.get("gpu_cc")
    if gpu_cc is not None and not isinstance(gpu_cc, bool):
        raise TypeError(f"gpu_cc must be True, False or None, got {gpu_cc!r}")
    recipient(options)
    check_refused_options(ray_options(options))


def recipient(options: Mapping[str, Any]) -> str | None:
    """The one output recipient (``recipient=`` or a one-element ``recipients=``), or None."""
    single, many = options.get("recipient"), options.get("recipients")
    if many is not None:
        items = (many,) if isinstance(many, str) else tuple(many)
        if len(items) != 1 or single is not None:
            raise ValueError(
                "a confidential call seals its result to one recipient: pass recipients=['suite:hex']"
            )
        single = items[0]
    if single is not None and not isinstance(single, str):
        raise TypeError("recipient must be a policy-listed 'suite:hex' public key string")
    return single


def ray_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The caller's Ray options: everything but the placement and shim options."""
    return {k: v for k, v in options.items() if k not in PLACEMENT_OPTIONS and k not in SHIM_OPTIONS}


def _verifier(session: Any) -> Any:
    if session.registry_verifier is not None:
        return session.registry_verifier
    path, cluster = os.environ.get(STATEMENT_KEY_ENV), os.environ.get(CLUSTER_ID_ENV)
    if not path or not cluster:
        raise NoAttestedNodeError(
            "no trust-registry statement key is pinned in this driver, so no node can be verified as "
            f"attested: set {STATEMENT_KEY_ENV}=<broker statement public key PEM> and {CLUSTER_ID_ENV}="
            "<cluster id>, or use rc.init(dev=True) for development"
        )
    from scheduler.registry import RegistryVerifier

    with open(path, "rb") as f:
        session.registry_verifier = RegistryVerifier.from_pem(f.read(), registry_id=cluster)
    return session.registry_verifier


def session_placer(session: Any) -> Placer:
    """The session's placer (built once): the registry client over the pinned key, the session's wait."""
    if session.placer is None:
        from scheduler.registry_actor import RegistryClient

        routing_nodes = getattr(session.services, "routing_nodes", ()) if session.services else ()
        follow = getattr(session.key_service, "feed_source", None)  # a configured broker outside Ray
        client = RegistryClient(_verifier(session), session.registry, follow=follow)
        session.placer = client.placer(wait_s=session.placement_wait_s, labels=not routing_nodes)
    placer: Placer = session.placer
    return placer


def domain_policy(session: Any, domain: str) -> DomainPolicy:
    """The domain's policy where this driver can read it (development key service); otherwise the
    any-node policy (the broker enforces the real one at key release; narrowing options still apply)."""
    policy_of = getattr(session.key_service, "policy", None)
    if policy_of is None:
        return DomainPolicy()
    policy: DomainPolicy = policy_of(domain)  # ValueError naming the fix for an unknown domain
    return policy


def call_options(domain: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Stock Ray options for one confidential call or actor creation (see the module docstring).

    Raises:
        RuntimeError: ``rc.init`` was not called.
        ValueError / TypeError: an option widens the domain policy (the message names both).
        NoAttestedNodeError: no qualifying attested node within the session's placement wait.
    """
    from ray_confidential.api import _session_or_die

    session = _session_or_die()
    policy = domain_policy(session, domain)
    caller = ray_options(options)
    placed = session_placer(session).options(
        policy,
        tee=options.get("tee"),
        pools=options.get("pools"),
        regions=options.get("regions"),
        gpu_cc=options.get("gpu_cc"),
        ray_options=caller,
    )
    return {**{k: v for k, v in caller.items() if k != "label_selector"}, **placed}


__all__ = [
    "PLACEMENT_OPTIONS",
    "SHIM_OPTIONS",
    "call_options",
    "check_static",
    "domain_policy",
    "ray_options",
    "recipient",
    "session_placer",
]
