"""Suite-wide settings: loopback-only Ray, token auth explicit, a private key-state directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Ray binds 127.0.0.1 for local clusters with this set (traffic stays on loopback).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Ray 2.60 turns token auth on for fresh local clusters; say so explicitly for every client.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
_STATE = Path(tempfile.mkdtemp(prefix="rc-test-state-"))
os.environ["RAY_CONFIDENTIAL_STATE_DIR"] = str(_STATE)
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("RAY_CONFIDENTIAL_DOMAINS", None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _state_dir() -> Iterator[Path]:
    yield _STATE
    shutil.rmtree(_STATE, ignore_errors=True)


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh development key-state directory for one test."""
    monkeypatch.setenv("RAY_CONFIDENTIAL_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


# Property tests: random in development, reproducible in CI (a CI failure replays exactly).
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")

# Ray 2.60 with RAY_AUTH_MODE=token needs a token file; `ray.init` creates one for a new local
# cluster but `ray.cluster_utils.Cluster` does not (its GCS aborts). On a fresh HOME, create it first.
from ray_confidential import _ray_compat  # noqa: E402

_ray_compat.ensure_auth_token()
