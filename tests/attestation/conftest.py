"""Shared fixtures for attestation tests: the genuine vectors folder beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors"


@pytest.fixture(scope="session")
def vectors() -> Path:
    """``../shared/vectors`` next to the project root; fails under CI when missing, else skips."""
    if not VECTORS.is_dir():
        msg = (
            f"genuine attestation vectors not found at {VECTORS} (expected ../shared/vectors beside the repo)"
        )
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return VECTORS
