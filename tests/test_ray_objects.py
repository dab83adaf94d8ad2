"""Sealed objects in a real Ray cluster: Ray holds ciphertext in plasma, spill files and transfers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray

import ray_confidential as rc
from ray_confidential.api import _SealedPayload
from ray_confidential.errors import KeyReleaseDenied
from ray_confidential.testing import scan
from tests.ray_helpers import marked_table, spill_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    spill_dir = tmp_path_factory.mktemp("spill")
    rc.init(address="local", **spill_config(spill_dir))
    rc.create_domain("hospital")
    yield spill_dir
    rc.shutdown()


def test_loopback_only(cluster: Path) -> None:
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}


def test_round_trips(cluster: Path) -> None:
    table = marked_table("rt")
    assert rc.get(rc.put(table, domain="hospital")).equals(table)
    arr = np.arange(10.0)
    np.testing.assert_array_equal(rc.get(rc.put(arr, domain="hospital")), arr)
    assert rc.get(rc.put({"k": [1, "v"]}, domain="hospital")) == {"k": [1, "v"]}


def test_plasma_holds_only_ciphertext(cluster: Path) -> None:
    marker = f"PLASMA-{uuid.uuid4().hex}"
    ref = rc.put(marked_table(marker), domain="hospital")
    assert not scan.plasma_contains(marker.encode())
    control = ray.put(marked_table(marker))  # a plain put of the same table: the scan must see it
    assert scan.plasma_contains(marker.encode())
    del control
    assert rc.get(ref).num_rows == 50_000


def test_spill_files_hold_only_ciphertext(cluster: Path) -> None:
    marker = f"SPILL-{uuid.uuid4().hex}"
    ref = rc.put(marked_table(marker), domain="hospital")
    header_prefix = rc.export(ref)[:48]
    fillers = [rc.put(os.urandom(20 << 20), domain="hospital") for _ in range(6)]
    ray.get([f.object_ref for f in fillers])
    assert scan.files_containing(cluster, header_prefix), "the sealed table was not spilled"
    assert scan.files_containing(cluster, marker.encode()) == []
    del fillers
    assert rc.get(ref).column("name")[0].as_py() == f"{marker}-0"  # restored from spill


@ray.remote
def _inspect(ref: rc.SealedRef, marker: bytes) -> tuple[str, bool]:
    """An ordinary (untrusted) task: it can fetch the sealed bytes, never the plaintext."""
    data = rc.export(ref)
    return hashlib.sha256(data).hexdigest(), marker in data


@ray.remote
def _forward(ref: rc.SealedRef) -> rc.SealedRef:
    return ref


def test_tasks_see_ciphertext_only_and_refs_nest(cluster: Path) -> None:
    marker = f"TASK-{uuid.uuid4().hex}"
    ref = rc.put(marked_table(marker), domain="hospital")
    digest, leaked = ray.get(_inspect.remote(ref, marker.encode()))
    assert not leaked
    assert digest == hashlib.sha256(rc.export(ref)).hexdigest()
    assert rc.get(_forward.remote(ref)).num_rows == 50_000  # rc.get accepts an ObjectRef to a SealedRef


def test_get_of_a_list_opens_each_in_order(cluster: Path) -> None:
    """``rc.get([...])`` as ``ray.get([...])``: one fetch, each opened, in order; nested refs too."""
    refs = [rc.put(np.arange(float(n)), domain="hospital") for n in range(1, 6)]
    values = rc.get([refs[0], _forward.remote(refs[1]), *refs[2:]])
    assert [v.tolist() for v in values] == [list(map(float, range(n))) for n in range(1, 6)]
    assert rc.get([]) == []
    with pytest.raises(TypeError, match="does not hold a sealed object"):
        rc.get([refs[0], ray.put(b"plain")])


def test_misuse_has_clear_errors(cluster: Path) -> None:
    with pytest.raises(ValueError, match="unknown domain 'nope'"):
        rc.put(b"x", domain="nope")
    with pytest.raises(TypeError, match="allow_pickle=True"):
        rc.put({1, 2}, domain="hospital")
    with pytest.raises(TypeError, match="does not hold a sealed object"):
        rc.get(ray.put(b"plain"))
    with pytest.raises(TypeError, match="expected a SealedRef"):
        rc.get("not a ref")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="already initialised"):
        rc.init()


def test_small_sealed_objects_are_stored_as_bytes_large_ones_out_of_band(cluster: Path) -> None:
    """Up to ``SMALL_SEALED_BYTES`` Ray holds plain ``bytes`` (no pickle on either side); above it, a
    ``_SealedPayload`` (one out-of-band buffer, no copy). Either way only ciphertext, and both open."""
    from ray_confidential.api import SMALL_SEALED_BYTES

    small, large = (
        rc.put(np.arange(8.0), domain="hospital"),
        rc.put(np.zeros(SMALL_SEALED_BYTES // 4), domain="hospital"),
    )
    assert isinstance(ray.get(small.object_ref), bytes) and small.size <= SMALL_SEALED_BYTES
    assert isinstance(ray.get(large.object_ref), _SealedPayload) and large.size > SMALL_SEALED_BYTES
    assert rc.get(small).tolist() == list(map(float, range(8))) and not rc.get(large).any()
    assert rc.export(small) == ray.get(small.object_ref)


def test_stored_value_is_one_out_of_band_buffer(cluster: Path) -> None:
    import pickle

    buffers: list[pickle.PickleBuffer] = []
    pickle.dumps(_SealedPayload(bytearray(b"c" * 100)), protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 1 and bytes(buffers[0].raw()) == b"c" * 100


def test_export_opens_off_cluster_with_the_cli(cluster: Path, tmp_path: Path) -> None:
    table = pa.table({"v": [1, 2, 3]})
    path = tmp_path / "result.sealed"
    path.write_bytes(rc.export(rc.put(table, domain="hospital")))
    out = tmp_path / "out.arrow"
    proc = subprocess.run(
        [sys.executable, "-m", "ray_confidential.cli", "open", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 rows" in proc.stdout
    with pa.OSFile(str(out)) as f:
        assert pa.ipc.open_file(f).read_all().equals(table)
    foreign = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_confidential.cli",
            "open",
            str(path),
            "--state-dir",
            str(tmp_path / "other"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert foreign.returncode == 1 and "KeyReleaseDenied" in foreign.stderr


def test_public_directory_driver_cannot_open(cluster: Path) -> None:
    from ray_confidential.api import _session_or_die
    from ray_confidential.keyservice import PublicDirectory
    from ray_confidential.sealed import open_sealed

    ref = rc.put(b"secret", domain="hospital")
    directory = PublicDirectory({"hospital": _session_or_die().key_service.descriptor("hospital")})
    with pytest.raises(KeyReleaseDenied):
        open_sealed(rc.export(ref), directory)
