"""Import direction: the core (crypto, sealed format, attestation, key services) never imports Ray,
and the CLI starts without Ray or torch."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "ray_confidential",
    "ray_confidential.errors",
    "ray_confidential.crypto.hpke",
    "ray_confidential.crypto.stream",
    "ray_confidential.sealed",
    "ray_confidential.sealed.format",
    "ray_confidential.keyservice",
    "ray_confidential.domains",
    "ray_confidential.attestation",
    "ray_confidential.cli",
]


def test_core_never_imports_ray_or_torch() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "import ray_confidential.cli as c; c.build_parser()\n"
        + "bad = sorted(m for m in ('ray', 'torch') if m in sys.modules)\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "", f"core imported: {out.stdout.strip()}"


def test_public_names_resolve_lazily() -> None:
    import ray_confidential as rc

    for name in rc.__all__:
        assert getattr(rc, name) is not None
