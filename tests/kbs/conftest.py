"""Shared fixtures of the key broker tests."""

from __future__ import annotations

import pytest

from tests.kbs.broker_env import PKI


@pytest.fixture(scope="module")
def pki() -> PKI:
    """Test CA, server and owner certificates (one set per test module)."""
    return PKI.create()
