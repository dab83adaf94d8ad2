"""`ray job submit` of examples/quickstart.py on a plain `ray start` cluster with token auth.

Afterwards nothing Ray keeps holds the plaintext marker or an owner secret: runtime_env and job
info, GCS internal KV, every session log, and the metrics endpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ray_confidential.testing import scan
from tests.ray_helpers import free_port

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
# The first synthetic patient name examples/quickstart.py seals (made at run time, not in its source).
MARKER = hashlib.sha256(b"quickstart-patient-0").hexdigest()[:24].encode()
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    temp_dir = Path(tempfile.mkdtemp(prefix="rcj-", dir="/tmp"))  # short: AF_UNIX path limit
    state = tmp_path_factory.mktemp("owner-state")
    # The job agent's HTTP port too: its default (52365) may still be held by the agent of a cluster an
    # earlier test shut down, and an agent that cannot bind serves no jobs ("No available agent").
    ports = {"port": free_port(), "dashboard": free_port(), "metrics": free_port(), "agent": free_port()}
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_CONFIDENTIAL_STATE_DIR": str(state),
        "QUICKSTART_EXPORT": str(state),
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(ports["port"]),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(ports["dashboard"]),
            "--metrics-export-port",
            str(ports["metrics"]),
            "--dashboard-agent-listen-port",
            str(ports["agent"]),
            "--temp-dir",
            str(temp_dir),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{ports['dashboard']}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # answering (401 under token auth): the dashboard is up
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start failed: {proc.stdout.read() if proc.stdout else ''}") from None
            time.sleep(1)
    try:
        yield {
            "url": url,
            "env": env,
            "temp_dir": temp_dir,
            "state": state,
            "ports": ports,
            "gcs": f"127.0.0.1:{ports['port']}",
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops what it started; never `ray stop`
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_quickstart_job_keeps_plaintext_and_owner_secrets_out_of_ray(head: dict[str, object]) -> None:
    env = dict(head["env"])  # type: ignore[arg-type]
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(str(head["url"]))  # token auth: RAY_AUTH_MODE=token (tests/conftest.py)
    job_id = "rc-quickstart"
    deadline = time.monotonic() + 90
    for attempt in range(1, 100):
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", str(head["url"]), "--working-dir", ".",
             "--submission-id", job_id, "--", sys.executable, "examples/quickstart.py"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        # Ray refuses submissions until the head node's job agent has registered (slow on a loaded
        # machine): the job was never created, so submitting again retries nothing of ours.
        if "No available agent" not in submit.stdout + submit.stderr or time.monotonic() > deadline:
            break
        job_id = f"rc-quickstart-{attempt + 1}"
        time.sleep(3)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, submit.stdout[-4000:] + submit.stderr[-4000:]
    assert "confidential task: mean glucose" in submit.stdout and "enclave actor:" in submit.stdout
    assert MARKER not in submit.stdout.encode()

    secrets = _owner_secrets(Path(str(head["state"])))
    assert secrets, "the job's development key service stored no domain key where expected"
    needles = [MARKER, *secrets]

    # runtime_env and job info, through the job API
    jobs = json.dumps(
        [job.model_dump() if hasattr(job, "model_dump") else vars(job) for job in client.list_jobs()],
        default=str,
    )
    assert "rc-quickstart" in jobs and "runtime_env" in jobs
    for needle in needles:
        assert needle not in jobs.encode()

    # GCS internal KV (function blobs, runtime_env packages, job metadata)
    kv = subprocess.run(
        [sys.executable, "-c", KV_DUMP, str(head["gcs"])], env=env, capture_output=True, timeout=120
    )
    assert kv.returncode == 0, kv.stderr[-2000:]
    assert len(kv.stdout) > 1000
    for needle in needles:
        assert needle not in kv.stdout

    # every session log and file Ray wrote under its temp dir (the scan sees the job's own output)
    assert scan.files_containing(Path(str(head["temp_dir"])), b"confidential task: mean glucose")
    for needle in needles:
        assert scan.files_containing(Path(str(head["temp_dir"])), needle) == [], needle

    # the metrics endpoint
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{head['ports']['metrics']}/metrics", timeout=10
    ).read()  # type: ignore[index]
    assert b"ray_" in metrics
    for needle in needles:
        assert needle not in metrics


def _owner_secrets(state: Path) -> list[bytes]:
    """The development domain private keys (hex and raw) the job's owner process stored."""
    found: list[bytes] = []
    for path in (state / "domains").glob("*.json"):
        for version in json.loads(path.read_text())["versions"]:
            found.append(version["private_key"].encode())
            found.append(bytes.fromhex(version["private_key"]))
    return found


KV_DUMP = r"""
import sys, ray
from ray.experimental import internal_kv
ray.init(address=sys.argv[1], include_dashboard=False, logging_level="ERROR")
out = bytearray()
for ns in (None, b"fun", b"job", b"session", b"cluster", b"runtime_env", b"dashboard", b"jobs"):
    for key in internal_kv._internal_kv_list(b"", namespace=ns):
        value = internal_kv._internal_kv_get(key, namespace=ns) or b""
        out += key + b"=" + value + b"\n"
sys.stdout.buffer.write(bytes(out))
ray.shutdown()
"""
