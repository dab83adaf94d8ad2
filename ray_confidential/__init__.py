"""ray_confidential: confidential computing for Ray.

    import ray_confidential as rc
    rc.init()                                   # local Ray + development key service
    rc.create_domain("hospital")
    ref = rc.put(table, domain="hospital")      # Ray stores ciphertext only
    table_again = rc.get(ref)                   # the owner opens it

Heavy modules (Ray, Arrow) are imported lazily (PEP 562), so the CLI and the core start fast and the
core (crypto, sealed format, attestation, key services) never imports Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ray_confidential import errors

__version__ = "0.1.0"

_LAZY = {
    "init": "ray_confidential.api",
    "shutdown": "ray_confidential.api",
    "create_domain": "ray_confidential.api",
    "put": "ray_confidential.api",
    "get": "ray_confidential.api",
    "export": "ray_confidential.api",
    "SealedRef": "ray_confidential.api",
    "DomainPolicy": "ray_confidential.domains",
    "DomainDescriptor": "ray_confidential.domains",
    "remote": "enclave_actors.remote",
    "enclave_actor": "enclave_actors.actor",
    "context": "enclave_actors.context",
}

if TYPE_CHECKING:
    from ray_confidential.api import SealedRef, create_domain, export, get, init, put, shutdown
    from ray_confidential.domains import DomainDescriptor, DomainPolicy


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ray_confidential' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "DomainDescriptor",
    "DomainPolicy",
    "SealedRef",
    "create_domain",
    "enclave_actor",
    "errors",
    "export",
    "get",
    "init",
    "put",
    "shutdown",
]
