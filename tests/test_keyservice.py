"""Development key service: domain lifecycle, persistence, audit."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from ray_confidential.domains import DomainDescriptor, DomainPolicy
from ray_confidential.errors import DecryptionError, KeyReleaseDenied
from ray_confidential.keyservice import DevKeyService, default_state_dir
from ray_confidential.sealed import open_sealed, seal
from ray_confidential.sealed.format import DomainPublicKey


def _dev() -> DomainPolicy:
    return DomainPolicy.development(warn=False)


def test_development_policy_warns_loudly() -> None:
    with pytest.warns(UserWarning, match="ANY code bundle"):
        DomainPolicy.development()


def test_create_is_idempotent_for_same_policy_and_refuses_a_different_one(tmp_path: Path) -> None:
    svc = DevKeyService(tmp_path)
    first = svc.create_domain("a", _dev())
    assert svc.create_domain("a", _dev()) == first
    with pytest.raises(ValueError, match=r"different policy.*update_policy"):
        svc.create_domain("a", DomainPolicy.development(allow_pickle=True, warn=False))


def test_policy_update_is_separate_and_audited(tmp_path: Path) -> None:
    svc = DevKeyService(tmp_path)
    svc.create_domain("a", _dev())
    new = DomainPolicy.development(allow_pickle=True, warn=False)
    svc.update_policy("a", new)
    assert svc.policy("a") == new
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["create_domain", "update_policy"]
    assert events[1]["policy_hash"] == new.policy_hash()


def test_keys_persist_across_instances_with_private_permissions(tmp_path: Path) -> None:
    svc = DevKeyService(tmp_path)
    desc = svc.create_domain("p", _dev())
    blob = seal(b"later", DomainPublicKey(domain="p", version=desc.version, public_key=desc.public_key))
    assert open_sealed(blob, DevKeyService(tmp_path)) == b"later"
    files = list((tmp_path / "domains").glob("*.json"))
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700


def test_rotation_keeps_old_versions_openable_until_retired(tmp_path: Path) -> None:
    svc = DevKeyService(tmp_path)
    v1 = svc.create_domain("r", _dev())
    old = seal(b"v1", DomainPublicKey(domain="r", version=1, public_key=v1.public_key))
    v2 = svc.rotate("r")
    assert v2.version == 2 and v2.public_key != v1.public_key
    assert open_sealed(old, svc) == b"v1"
    svc.retire("r", 1)
    with pytest.raises(DecryptionError):
        open_sealed(old, svc)


def test_unknown_domain_is_denied(tmp_path: Path) -> None:
    owner, stranger = DevKeyService(tmp_path / "o"), DevKeyService(tmp_path / "s")
    desc = owner.create_domain("x", _dev())
    blob = seal(b"z", DomainPublicKey(domain="x", version=1, public_key=desc.public_key))
    with pytest.raises(KeyReleaseDenied, match="not held"):
        open_sealed(blob, stranger)


def test_service_refuses_pickling(tmp_path: Path) -> None:
    import pickle

    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(DevKeyService(tmp_path))


def test_descriptor_round_trip_and_policy_from_dict_rejects_typos(tmp_path: Path) -> None:
    desc = DevKeyService(tmp_path).create_domain("d", _dev())
    assert DomainDescriptor.from_dict(desc.to_dict()) == desc
    with pytest.raises(ValueError, match="unknown domain policy keys"):
        DomainPolicy.from_dict({"allow_pickles": True})
    with pytest.raises(ValueError, match="is empty"):
        DomainPolicy.from_dict({"bundles": []})


def test_seal_arguments_reaches_the_descriptor_and_keeps_earlier_policy_hashes(tmp_path: Path) -> None:
    """A later policy field: omitted from the canonical JSON when off, so every policy written
    before it keeps its hash; when on, it changes the hash and appears in the public descriptor."""
    plain, strict = _dev(), DomainPolicy(dev=True, seal_arguments=True)
    assert "seal_arguments" not in plain.to_dict() and plain.policy_hash() != strict.policy_hash()
    assert DomainPolicy.from_dict(strict.to_dict()) == strict
    with pytest.raises(ValueError, match="seal_arguments must be true or false"):
        DomainPolicy.from_dict({"seal_arguments": "yes"})
    svc = DevKeyService(tmp_path)
    assert not svc.create_domain("open", plain).seal_arguments
    desc = svc.create_domain("strict", strict)
    assert desc.seal_arguments and DomainDescriptor.from_dict(desc.to_dict()) == desc


def test_invalid_domain_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid domain"):
        DevKeyService(tmp_path).create_domain("../etc", _dev())


def test_default_state_dir_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAY_CONFIDENTIAL_STATE_DIR", str(tmp_path))
    assert default_state_dir() == tmp_path
    monkeypatch.delenv("RAY_CONFIDENTIAL_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "ray-confidential"


def test_sealed_task_error_pickles_without_leaking_detail() -> None:
    import pickle

    from ray_confidential.errors import SealedTaskError

    err = pickle.loads(pickle.dumps(SealedTaskError(b"sealed-bytes")))
    assert err.sealed_detail == b"sealed-bytes"
    assert "sealed-bytes" not in str(err) and "sealed-bytes" not in repr(err)


# -- caches: a granted unwrap and a descriptor are reused only while the domain file is unchanged --
def _sealed(svc: DevKeyService, name: str, payload: bytes = b"cached") -> bytes:
    desc = svc.descriptor(name)
    return bytes(
        seal(payload, DomainPublicKey(domain=name, version=desc.version, public_key=desc.public_key))
    )


def test_repeated_open_reuses_the_granted_unwrap(tmp_path: Path) -> None:
    svc = DevKeyService(tmp_path)
    svc.create_domain("c", _dev())
    blob = _sealed(svc, "c")
    assert open_sealed(blob, svc) == b"cached"
    assert open_sealed(blob, svc) == b"cached"
    assert svc.unwrap_count == 1


def test_cached_unwrap_still_checks_hash_and_wrapped_key(tmp_path: Path) -> None:
    from ray_confidential.sealed.format import SealedHeader

    svc = DevKeyService(tmp_path)
    svc.create_domain("c", _dev())
    header = SealedHeader.parse(_sealed(svc, "c"))
    dek = svc.unwrap(header.wrapped_dek, header.header_hash, header.header_bytes)
    assert svc.unwrap(header.wrapped_dek, header.header_hash, header.header_bytes) == dek
    with pytest.raises(DecryptionError):
        svc.unwrap(header.wrapped_dek, bytes(32), header.header_bytes)
    with pytest.raises(DecryptionError):
        svc.unwrap(header.wrapped_dek[:-1] + b"\x00", header.header_hash, header.header_bytes)


@pytest.mark.parametrize("where", ["same instance", "other instance"])
def test_retirement_invalidates_cached_unwraps(tmp_path: Path, where: str) -> None:
    svc = DevKeyService(tmp_path)
    svc.create_domain("c", _dev())
    blob = _sealed(svc, "c")
    assert open_sealed(blob, svc) == b"cached"  # granted and cached
    other = svc if where == "same instance" else DevKeyService(tmp_path)  # e.g. the CLI
    other.rotate("c")
    other.retire("c", 1)
    with pytest.raises(DecryptionError):
        open_sealed(blob, svc)


def test_descriptor_cache_follows_rotation_in_another_instance(tmp_path: Path) -> None:
    svc = DevKeyService(tmp_path)
    v1 = svc.create_domain("c", _dev())
    assert svc.descriptor("c") is svc.descriptor("c")  # cached, not recomputed
    v2 = DevKeyService(tmp_path).rotate("c")
    assert svc.descriptor("c") == v2 and v2.version == v1.version + 1
    assert svc.descriptor("c", 1) == v1
