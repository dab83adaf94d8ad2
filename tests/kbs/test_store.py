"""Key store: one contract suite over every backend, plus encryption-at-rest, master-key and crash tests."""

from __future__ import annotations

import copy
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ray_confidential.errors import ConfidentialError
from ray_confidential.kbs.store import (
    EncryptedFileStore,
    KeyStore,
    KeyStoreError,
    MasterKey,
    MemoryStore,
    StoreIntegrityError,
    VaultStore,
    generate_master_key_file,
)
from tests.kbs.fake_vault import FakeVault

MASTER = MasterKey(bytes(range(32)))
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture
def vault() -> Iterator[FakeVault]:
    fake = FakeVault()
    yield fake
    fake.close()


@pytest.fixture(params=["memory", "file", "vault", "vault+master"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    fake = None
    s: KeyStore
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "file":
        s = EncryptedFileStore(tmp_path / "store", MASTER)
    else:
        fake = FakeVault()
        s = VaultStore(fake.url, fake.token, master_key=MASTER if request.param == "vault+master" else None)
    yield s
    s.close()
    if fake is not None:
        fake.close()


# --------------------------------------------------------------------------------------------------
# Contract: every backend


def test_contract_protocol(store: KeyStore) -> None:
    assert isinstance(store, KeyStore)


def test_contract_get_missing_is_none(store: KeyStore) -> None:
    assert store.get("domains/none/v1") is None


def test_contract_put_get_overwrite(store: KeyStore) -> None:
    store.put("domains/hospital/v1", b"one")
    assert store.get("domains/hospital/v1") == b"one"
    store.put("domains/hospital/v1", b"two")
    assert store.get("domains/hospital/v1") == b"two"
    store.put("empty", b"")
    assert store.get("empty") == b""
    big = os.urandom(300_000)
    store.put("big", bytearray(big))  # type: ignore[arg-type]
    assert store.get("big") == big


def test_contract_put_many_and_keys(store: KeyStore) -> None:
    store.put_many({"domains/a/v1": b"1", "domains/a/v2": b"2", "domains/b/v1": b"3", "tokens/x": b"4"})
    assert store.keys() == ["domains/a/v1", "domains/a/v2", "domains/b/v1", "tokens/x"]
    assert store.keys("domains/") == ["domains/a/v1", "domains/a/v2", "domains/b/v1"]
    assert store.keys("domains/a") == ["domains/a/v1", "domains/a/v2"]
    assert store.keys("domains/a/v2") == ["domains/a/v2"]
    assert store.keys("nothing/") == []
    store.put_many({})
    assert store.get("domains/b/v1") == b"3"


def test_contract_delete(store: KeyStore) -> None:
    store.put("domains/a/v1", b"1")
    store.delete("domains/a/v1")
    store.delete("domains/a/v1")  # idempotent
    assert store.get("domains/a/v1") is None
    assert store.keys() == []


def test_contract_key_charset(store: KeyStore) -> None:
    odd = "domains/we!rd:na~me+=%?#@/v1"
    store.put(odd, b"x")
    assert store.get(odd) == b"x"
    assert store.keys("domains/") == [odd]


@pytest.mark.parametrize(
    "bad",
    ["", "/abs", "trail/", "a//b", "a/../b", "./a", "sp ace", "tab\t", "ünï", "x" * 161, "nul\x00"],
)
def test_contract_rejects_bad_keys(store: KeyStore, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid store key"):
        store.put(bad, b"v")
    with pytest.raises(ValueError):
        store.get(bad)


def test_contract_rejects_bad_values_and_batches_atomically(store: KeyStore) -> None:
    with pytest.raises(TypeError, match="bytes"):
        store.put("k", "text")  # type: ignore[arg-type]
    # one bad item: nothing of the batch is written
    with pytest.raises(ValueError):
        store.put_many({"good/1": b"1", "bad key": b"2"})
    with pytest.raises(TypeError):
        store.put_many({"good/1": b"1", "good/2": 2})  # type: ignore[dict-item]
    assert store.keys() == []


def test_contract_closed_store_refuses(store: KeyStore) -> None:
    store.close()
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.get("k")
    with pytest.raises(ValueError, match="closed"):
        store.put("k", b"v")


def test_contract_concurrent_writers(store: KeyStore) -> None:
    def work(n: int) -> None:
        for i in range(10):
            store.put(f"t{n}/{i}", bytes([n, i]))
        store.put_many({f"m{n}/{i}": bytes([i]) for i in range(3)})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.keys()) == 4 * 13
    assert store.get("t3/9") == bytes([3, 9])


# --------------------------------------------------------------------------------------------------
# Master key


def test_master_key_refuses_pickle_copy_and_redacts() -> None:
    key = MasterKey(b"\x42" * 32)
    for attempt in (lambda: pickle.dumps(key), lambda: copy.copy(key), lambda: copy.deepcopy(key)):
        with pytest.raises(TypeError, match="MasterKey cannot be"):
            attempt()
    assert "42" * 4 not in repr(key) and "redacted" in repr(key) and str(key) == repr(key)
    with pytest.raises(ValueError, match="32 bytes"):
        MasterKey(b"short")


def test_master_key_file_generation_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    generated = generate_master_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert MasterKey.from_file(path).key_id == generated.key_id
    with pytest.raises(FileExistsError):
        generate_master_key_file(path)  # never overwrites an existing key
    for mode in (0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(KeyStoreError, match="chmod 600"):
            MasterKey.from_file(path)
    path.chmod(0o600)
    raw = tmp_path / "raw.key"
    raw.write_bytes(b"\x01" * 32)
    raw.chmod(0o400)
    assert MasterKey.from_file(raw).key_id == MasterKey(b"\x01" * 32).key_id
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    junk.chmod(0o600)
    with pytest.raises(KeyStoreError, match="holds no 32-byte key"):
        MasterKey.from_file(junk)
    with pytest.raises(KeyStoreError, match="cannot read"):
        MasterKey.from_file(tmp_path / "missing.key")


def test_master_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    key = os.urandom(32)
    want = MasterKey(key).key_id
    monkeypatch.setenv("RC_MK_HEX", key.hex().upper())
    monkeypatch.setenv("RC_MK_B64", base64.b64encode(key).decode())
    monkeypatch.setenv("RC_MK_B64URL", base64.urlsafe_b64encode(key).decode().rstrip("="))
    monkeypatch.setenv("RC_MK_BAD", "00" * 31)
    for var in ("RC_MK_HEX", "RC_MK_B64", "RC_MK_B64URL"):
        assert MasterKey.from_env(var).key_id == want
    with pytest.raises(KeyStoreError, match="no 32-byte key"):
        MasterKey.from_env("RC_MK_BAD")
    with pytest.raises(KeyStoreError, match="not set"):
        MasterKey.from_env("RC_MK_UNSET")


def kms_plugin(*, wrapped: str, fail: bool = False) -> bytes:
    """A stand-in KMS plugin: 'unwraps' by un-hexing (a real one calls the operator's KMS)."""
    if fail:
        raise RuntimeError("kms unreachable")
    return bytes.fromhex(wrapped)


def test_master_key_from_kms_plugin() -> None:
    key = os.urandom(32)
    got = MasterKey.from_kms("tests.kbs.test_store:kms_plugin", wrapped=key.hex())
    assert got.key_id == MasterKey(key).key_id
    with pytest.raises(ValueError, match="module:callable"):
        MasterKey.from_kms("no-colon")
    with pytest.raises(KeyStoreError, match="cannot load"):
        MasterKey.from_kms("tests.kbs.test_store:missing")
    with pytest.raises(KeyStoreError, match="failed"):
        MasterKey.from_kms("tests.kbs.test_store:kms_plugin", wrapped="", fail=True)
    with pytest.raises(KeyStoreError, match="32-byte"):
        MasterKey.from_kms("tests.kbs.test_store:kms_plugin", wrapped="00")


# --------------------------------------------------------------------------------------------------
# EncryptedFileStore: at rest, integrity, recovery


def test_file_store_never_writes_plaintext(tmp_path: Path) -> None:
    secret = b"PLAINTEXT-DOMAIN-PRIVATE-KEY-" * 4
    with EncryptedFileStore(tmp_path / "s", MASTER) as s:
        s.put("domains/hospital/v1", secret)
        s.put_many({"domains/bank/v1": secret, "domains/bank/v2": secret})
    for path in (tmp_path / "s").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret[:16] not in data and b"hospital" not in data
    assert (tmp_path / "s").stat().st_mode & 0o077 == 0


def test_file_store_wrong_master_key_fails_at_open(tmp_path: Path) -> None:
    EncryptedFileStore(tmp_path / "s", MASTER).close()
    with pytest.raises(KeyStoreError, match="does not open key store"):
        EncryptedFileStore(tmp_path / "s", MasterKey(b"\x00" * 32))


def test_file_store_swapped_entries_detected(tmp_path: Path) -> None:
    """An attacker with disk access renames one entry's file over another: authentication fails."""
    with EncryptedFileStore(tmp_path / "s", MASTER) as s:
        s.put("domains/a/v1", b"key of a")
        s.put("domains/b/v1", b"key of b")
        pa, pb = s._path("domains/a/v1"), s._path("domains/b/v1")
        os.replace(pa, pb)
        with pytest.raises(StoreIntegrityError, match="domains/b/v1"):
            s.get("domains/b/v1")


def test_file_store_flipped_bit_detected(tmp_path: Path) -> None:
    with EncryptedFileStore(tmp_path / "s", MASTER) as s:
        s.put("domains/a/v1", b"key of a")
        path = s._path("domains/a/v1")
        data = bytearray(path.read_bytes())
        data[-5] ^= 1
        path.write_bytes(bytes(data))
        with pytest.raises(StoreIntegrityError):
            s.get("domains/a/v1")


def test_file_store_entry_from_another_store_detected(tmp_path: Path) -> None:
    """Same master key, different store: entries do not transplant (per-store derived key)."""
    with (
        EncryptedFileStore(tmp_path / "one", MASTER) as one,
        EncryptedFileStore(tmp_path / "two", MASTER) as two,
    ):
        one.put("domains/a/v1", b"from one")
        two.put("domains/a/v1", b"from two")
        os.replace(one._path("domains/a/v1"), two._path("domains/a/v1"))
        with pytest.raises(StoreIntegrityError):
            two.get("domains/a/v1")


def test_file_store_single_opener(tmp_path: Path) -> None:
    with EncryptedFileStore(tmp_path / "s", MASTER):
        with pytest.raises(KeyStoreError, match="in use"):
            EncryptedFileStore(tmp_path / "s", MASTER)
    EncryptedFileStore(tmp_path / "s", MASTER).close()


def test_file_store_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "data.txt").write_text("hello")
    with pytest.raises(KeyStoreError, match="holds no key store"):
        EncryptedFileStore(tmp_path / "notastore", MASTER)
    with pytest.raises(TypeError, match="MasterKey"):
        EncryptedFileStore(tmp_path / "x", b"\x00" * 32)  # type: ignore[arg-type]


def test_file_store_recovery_cleans_temp_and_replays_journal(tmp_path: Path) -> None:
    """Simulate a crash right after the journal became durable: the whole batch appears on reopen."""
    d = tmp_path / "s"
    with EncryptedFileStore(d, MASTER) as s:
        s.put("before", b"0")
        batch = {"batch/1": b"1", "batch/2": b"2", "before": b"new"}
        applied: list[str] = []
        real = s._apply

        def crash_after_first(items: dict[str, bytes]) -> None:
            first = next(iter(items))
            real({first: items[first]})
            applied.append(first)
            raise KeyboardInterrupt  # the process "dies" in the middle of applying the batch

        s._apply = crash_after_first
        with pytest.raises(KeyboardInterrupt):
            s.put_many(batch)
        assert (d / "JOURNAL").exists() and applied == ["batch/1"]
    (d / "entries" / ".tmp-deadbeef").write_bytes(b"half a write")
    (d / ".tmp-cafe").write_bytes(b"half a journal")
    with EncryptedFileStore(d, MASTER) as s:
        assert {k: s.get(k) for k in s.keys()} == {"batch/1": b"1", "batch/2": b"2", "before": b"new"}
    assert not (d / "JOURNAL").exists()
    assert not [p for p in d.rglob(".tmp-*")]


def test_file_store_interrupted_overwrite_keeps_old_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies half-way through writing a new value: the old value stays whole (temp + rename)."""
    d = tmp_path / "s"
    s = EncryptedFileStore(d, MASTER)
    s.put("domains/a/v1", b"old" * 1000)
    real_write = os.write

    def half_then_die(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "write", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        s.put("domains/a/v1", b"new" * 1000)
    monkeypatch.undo()
    assert s.get("domains/a/v1") == b"old" * 1000
    s.close()
    with EncryptedFileStore(d, MASTER) as s:
        assert s.get("domains/a/v1") == b"old" * 1000
    assert not list(d.rglob(".tmp-*"))


def test_file_store_forged_journal_refused(tmp_path: Path) -> None:
    d = tmp_path / "s"
    EncryptedFileStore(d, MASTER).close()
    (d / "JOURNAL").write_bytes(b"\x01" + os.urandom(60))
    with pytest.raises(StoreIntegrityError, match="journal"):
        EncryptedFileStore(d, MASTER)


def read_acks_then_kill(proc: subprocess.Popen[bytes], run_for: float) -> list[str]:
    """Collect the child's complete stdout lines, SIGKILL it after ``run_for`` seconds of writing."""
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"READY"
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read1(65536), b"")))  # type: ignore[union-attr]
    reader.start()
    time.sleep(run_for)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join()
    return b"".join(chunks).decode().split("\n")[:-1]  # the last piece may be a torn line


def test_crash_safety_sigkill_during_burst(tmp_path: Path) -> None:
    """Acceptance: kill -9 at a random moment; every acknowledged key is present with its exact value,
    every announced batch is all there or not at all, and every entry decrypts."""
    rng = random.Random(1234)
    d = tmp_path / "store"
    acked: dict[str, bytes] = {}
    batches: list[dict[str, bytes]] = []
    for seed in range(5):
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "crash_writer.py"), "store", str(d), bytes(range(32)).hex(), str(seed)],
            stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        for line in read_acks_then_kill(proc, rng.uniform(0.15, 0.6)):
            tag, *rest = line.split(" ")
            if tag == "A":
                acked[rest[0]] = bytes.fromhex(rest[1])
            elif tag == "B":
                batches.append({rest[i]: bytes.fromhex(rest[i + 1]) for i in range(0, len(rest), 2)})
        with EncryptedFileStore(d, MASTER) as s:
            stored = {k: s.get(k) for k in s.keys()}  # every entry authenticates: nothing half-written
            for key, value in acked.items():
                assert stored.get(key) == value, f"acknowledged key {key} lost or wrong after kill -9"
            for batch in batches:
                present = [k for k in batch if k in stored]
                assert present == [] or present == list(batch), f"half a batch survived: {present}"
                if present:
                    assert all(stored[k] == v for k, v in batch.items())
            assert not list(d.rglob(".tmp-*")) and not (d / "JOURNAL").exists()
    assert len(acked) > 20, "the writer acknowledged too little to test anything"


# --------------------------------------------------------------------------------------------------
# Vault specifics


def test_vault_refuses_plain_http_off_loopback() -> None:
    with pytest.raises(ValueError, match="https"):
        VaultStore("http://vault.example.com:8200", "t")
    with pytest.raises(ValueError, match="prefix"):
        VaultStore("http://127.0.0.1:1", "t", prefix="/abs")


def test_vault_wrong_token_is_a_store_error(vault: FakeVault) -> None:
    with pytest.raises(KeyStoreError, match="Forbidden") as info:
        VaultStore(vault.url, "s.wrong-token")
    assert "s.wrong-token" not in str(info.value)
    assert isinstance(info.value, ConfidentialError)


def test_vault_repr_hides_token(vault: FakeVault) -> None:
    s = VaultStore(vault.url, vault.token)
    assert vault.token not in repr(s)
    s.close()


def test_vault_layout_and_delete_removes_all_versions(vault: FakeVault) -> None:
    s = VaultStore(vault.url, vault.token, prefix="rc/")
    s.put("domains/a/v1", b"1")
    s.put("domains/a/v1", b"2")
    assert len(vault.versions["rc/entries/domains/a/v1"]) == 2
    s.delete("domains/a/v1")
    assert "rc/entries/domains/a/v1" not in vault.versions  # no old version left behind
    s.close()


def test_vault_master_key_binds_values_to_names(vault: FakeVault) -> None:
    s = VaultStore(vault.url, vault.token, master_key=MASTER)
    s.put("domains/a/v1", b"key of a")
    s.put("domains/b/v1", b"key of b")
    stored = vault.versions["ray-confidential/entries/domains/a/v1"][-1]["data"]["value"]
    assert "key of a" not in stored
    vault.versions["ray-confidential/entries/domains/b/v1"].append({"data": {"value": stored}})
    with pytest.raises(StoreIntegrityError):
        s.get("domains/b/v1")
    s.close()


def test_vault_batch_interrupted_is_replayed_on_open(vault: FakeVault) -> None:
    """Vault dies after the journal and one entry were written: the next opener completes the batch."""
    s = VaultStore(vault.url, vault.token)
    vault.fail_writes_after = vault.writes + 2  # journal + first entry succeed
    with pytest.raises(KeyStoreError, match="InternalServerError"):
        s.put_many({"b/1": b"1", "b/2": b"2", "b/3": b"3"})
    assert "ray-confidential/journal" in vault.versions
    vault.fail_writes_after = None
    s2 = VaultStore(vault.url, vault.token)
    assert {k: s2.get(k) for k in s2.keys()} == {"b/1": b"1", "b/2": b"2", "b/3": b"3"}
    assert "ray-confidential/journal" not in vault.versions


def test_vault_batch_not_journalled_leaves_nothing(vault: FakeVault) -> None:
    s = VaultStore(vault.url, vault.token)
    vault.fail_writes_after = vault.writes  # the journal write itself fails
    with pytest.raises(KeyStoreError):
        s.put_many({"b/1": b"1", "b/2": b"2"})
    vault.fail_writes_after = None
    assert VaultStore(vault.url, vault.token).keys() == []


def test_vault_second_concurrent_batch_refused_by_cas(vault: FakeVault) -> None:
    s = VaultStore(vault.url, vault.token)
    vault.versions["ray-confidential/journal"] = [{"data": {"items": {}}}]  # another writer's batch in flight
    with pytest.raises(KeyStoreError, match="another writer"):
        s.put_many({"b/1": b"1", "b/2": b"2"})
