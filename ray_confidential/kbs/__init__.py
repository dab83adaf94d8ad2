"""Key broker service (KBS): attestation-gated unwrap of data keys over gRPC (docs/kbs.md).

    ray-confidential kbs serve --dev --port 50051          # development broker on 127.0.0.1

    >>> from ray_confidential.kbs import KBSClient  # doctest: +SKIP

Names are imported on first access, so importing the package does not load gRPC.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "KBSClient": "ray_confidential.kbs.client",
    "Token": "ray_confidential.kbs.client",
    "Challenge": "ray_confidential.kbs.client",
    "AttestedKeyService": "ray_confidential.kbs.keyservice",
    "Broker": "ray_confidential.kbs.broker",
    "BrokerConfig": "ray_confidential.kbs.config",
    "ReleaseRecord": "ray_confidential.kbs.record",
    "KBSServer": "ray_confidential.kbs.server",
}

if TYPE_CHECKING:
    from ray_confidential.kbs.broker import Broker
    from ray_confidential.kbs.client import Challenge, KBSClient, Token
    from ray_confidential.kbs.config import BrokerConfig
    from ray_confidential.kbs.keyservice import AttestedKeyService
    from ray_confidential.kbs.record import ReleaseRecord
    from ray_confidential.kbs.server import KBSServer


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AttestedKeyService",
    "Broker",
    "BrokerConfig",
    "Challenge",
    "KBSClient",
    "KBSServer",
    "ReleaseRecord",
    "Token",
]
