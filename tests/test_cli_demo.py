"""The CLI as a user runs it: `ray-confidential demo` and `domain` on a fresh HOME."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ray_confidential.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.ray
def test_demo_runs_on_a_fresh_home(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_CONFIDENTIAL_STATE_DIR", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path / "home")
    env.pop("XDG_STATE_HOME", None)
    proc = _cli("demo", "--rows", "50000", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for n in range(1, 8):
        assert f"[{n}/7]" in proc.stdout
    assert "demo: OK" in proc.stdout
    exported = tmp_path / "home" / ".local" / "state" / "ray-confidential" / "demo" / "patients.sealed"
    assert exported.is_file() and b"PATIENT-PLAINTEXT" not in exported.read_bytes()
    opened = _cli("open", str(exported), env=env)
    assert opened.returncode == 0 and "50,000 rows" in opened.stdout


def test_domain_export_and_bad_input(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_CONFIDENTIAL_STATE_DIR": str(tmp_path)}
    from ray_confidential.keyservice import DevKeyService

    with pytest.warns(UserWarning):
        DevKeyService(tmp_path).create_domain("pub")
    proc = _cli("domain", "export", "pub", env=env)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["domains"][0]["name"] == "pub"
    assert _cli("domain", "export", "missing", env=env).returncode == 2
    assert "pub" in _cli("domain", "list", env=env).stdout
    assert _cli("open", str(tmp_path / "nope"), env=env).returncode == 2


@pytest.mark.ray
def test_example_runs(tmp_path: Path) -> None:
    # A private Ray temp dir: no other cluster on this host is discoverable, so rc.init() starts one.
    ray_tmp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    env = {**os.environ, "RAY_CONFIDENTIAL_STATE_DIR": str(tmp_path), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(
            [sys.executable, "examples/seal_table.py"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "owner opens: [{'patient': 'alice'" in proc.stdout
