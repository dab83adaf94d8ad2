"""The CLI as a user runs it: `ray-confidential demo` and `domain` on a fresh HOME."""

from __future__ import annotations

import json
import os
import re
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
@pytest.mark.parametrize("auth_mode", ["token", "disabled"])
def test_demo_tells_the_story_on_a_fresh_home(tmp_path: Path, auth_mode: str) -> None:
    """`ray-confidential demo` as a new user runs it: fresh HOME (no Ray token, no key state), the
    caller's RAY_AUTH_MODE; every story line, the liar's denial, and the owner's off-cluster open."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_CONFIDENTIAL_STATE_DIR", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path / "home")
    env["RAY_AUTH_MODE"] = auth_mode
    env.pop("XDG_STATE_HOME", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the demo binds loopback by itself
    proc = _cli("demo", "--rows", "50000", env=env, timeout=180)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    for n in range(1, 13):
        assert f"[{n}/12]" in out, n
    assert "FAILED" not in out and "demo: OK, every check held" in out
    assert re.search(r"head node at 127\.0\.0\.1:\d+", out), "the cluster must bind loopback"
    liar = re.search(r"node ([0-9a-f]{12})  \(LIES", out)
    assert liar, out
    # Where each ran: the attested nodes of the pools asked for, never the liar.
    assert re.search(
        r"glucose_summary ran inside the executor on node [0-9a-f]{12} \(sev-snp, pool=eu-hospital\)", out
    )
    assert re.search(r"CohortCounter on node [0-9a-f]{12} \(tdx, pool=us-research\)", out)
    assert "Enclave[tdx pool=us-research attested-until=" in out
    assert "ok: the liar ran neither" in out
    ran_on = re.findall(r"(?:executor on node|CohortCounter on node) ([0-9a-f]{12})", out)
    assert len(ran_on) == 2 and liar.group(1) not in ran_on
    # The liar's key request: refused, and the broker's audit log says so for that node.
    assert "ok: refused: KeyReleaseDenied" in out
    assert re.search(rf"broker audit: #\d+ \S+ attest deny .*node_id={liar.group(1)}", out)
    assert "ok: no token and no data key was ever granted to the liar" in out
    assert "ok: refused: AttestationError" in out  # the ordinary task at the attestation device
    assert "ok: the sealed table: marker not found" in out and "ok: marker not found in any spill file" in out
    assert re.search(r"unwrap grant node_id=[0-9a-f]{12}", out) and "ok: the audit log verifies" in out
    assert "checkpoint at seq" in out
    assert re.search(r"Ray dashboard: http://127\.0\.0\.1:\d+", out)
    # The owner opens the exported bytes off-cluster, after the demo (and its cluster) ended.
    demo_dir = tmp_path / "home" / ".local" / "state" / "ray-confidential" / "demo"
    exported = demo_dir / "patients.sealed"
    assert exported.is_file() and b"PATIENT-PLAINTEXT" not in exported.read_bytes()
    opened = _cli("open", str(exported), env=env)
    assert opened.returncode == 0 and "50,000 rows" in opened.stdout, opened.stdout + opened.stderr
    result = _cli("open", str(demo_dir / "glucose-summary.sealed"), env=env)
    assert result.returncode == 0 and "mean_glucose" in result.stdout, result.stdout + result.stderr
    # The copied audit log verifies after the broker is gone; a flipped byte does not.
    log = demo_dir / "audit.log"
    pinned = ["--public-key", str(demo_dir / "audit.pub")]
    assert _cli("audit", "verify", str(log), *pinned, env=env).returncode == 0
    data = bytearray(log.read_bytes())
    data[len(data) // 2] ^= 1
    log.write_bytes(bytes(data))
    assert _cli("audit", "verify", str(log), *pinned, env=env).returncode == 1


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
