"""`ray-confidential recipient new` and `open --recipient-key`: a partner's key, off-cluster."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ray_confidential.crypto import hpke
from ray_confidential.sealed.format import DomainPublicKey, seal

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ray_confidential.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def _sealed_to(public: str, value: object, path: Path) -> Path:
    """What an executor writes for ``recipient=public``: key version 0, sealed to that key."""
    suite, _, raw = public.partition(":")
    key = DomainPublicKey(domain="shared", version=0, public_key=hpke.PublicKey(suite, bytes.fromhex(raw)))
    path.write_bytes(bytes(seal(value, key)))
    return path


@pytest.mark.parametrize("suite", ["x25519", "mlkem768-x25519"])
def test_a_recipient_key_opens_what_was_sealed_to_it_and_nothing_else(tmp_path: Path, suite: str) -> None:
    keyfile, other = tmp_path / "partner.key", tmp_path / "other.key"
    made = _cli("recipient", "new", str(keyfile), "--suite", suite)
    assert made.returncode == 0, made.stderr
    public = made.stdout.strip()
    assert public.startswith(suite + ":") and stat.S_IMODE(os.stat(keyfile).st_mode) == 0o600
    assert json.loads(keyfile.read_text())["private_key"] not in made.stdout + made.stderr
    assert _cli("recipient", "new", str(keyfile)).returncode == 2  # never overwritten
    assert _cli("recipient", "new", str(other), "--suite", suite).returncode == 0

    sealed = _sealed_to(public, np.arange(4.0), tmp_path / "result.sealed")
    opened = _cli("open", str(sealed), "--recipient-key", str(keyfile), "--out", str(tmp_path / "x.npy"))
    assert opened.returncode == 0, opened.stderr
    assert "shape (4,)" in opened.stdout and np.load(tmp_path / "x.npy").tolist() == [0.0, 1.0, 2.0, 3.0]

    refused = _cli("open", str(sealed), "--recipient-key", str(other))
    assert refused.returncode == 1 and "DecryptionError" in refused.stderr
    tampered = bytearray(sealed.read_bytes())
    tampered[-3] ^= 1
    (tmp_path / "t.sealed").write_bytes(tampered)
    assert _cli("open", str(tmp_path / "t.sealed"), "--recipient-key", str(keyfile)).returncode == 1
    (tmp_path / "bad.key").write_text("{}")
    assert _cli("open", str(sealed), "--recipient-key", str(tmp_path / "bad.key")).returncode == 2
