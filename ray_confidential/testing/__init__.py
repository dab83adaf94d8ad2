"""Test helpers shipped with the package: simulated TEEs, fake evidence, scans, TEE nodes.

``add_tee_node`` is imported on first access (it needs Ray).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"add_tee_node": "ray_confidential.testing.tee_node"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ray_confidential.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
