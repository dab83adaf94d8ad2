"""HPKE domain keys: both suites, key handles that never leak."""

from __future__ import annotations

import copy
import pickle

import pytest

from ray_confidential.crypto import hpke
from ray_confidential.errors import DecryptionError


@pytest.mark.parametrize("suite", sorted(hpke.SUITES))
def test_wrap_unwrap_round_trip(suite: str) -> None:
    priv = hpke.generate_private_key(suite)
    wrapped = hpke.wrap(priv.public_key(), b"d" * 32, info=b"hh")
    assert priv.unwrap(wrapped, info=b"hh") == b"d" * 32


@pytest.mark.parametrize("suite", sorted(hpke.SUITES))
def test_wrong_info_or_key_is_opaque_decryption_error(suite: str) -> None:
    priv, other = hpke.generate_private_key(suite), hpke.generate_private_key(suite)
    wrapped = hpke.wrap(priv.public_key(), b"d" * 32, info=b"hh")
    with pytest.raises(DecryptionError, match="could not be opened"):
        priv.unwrap(wrapped, info=b"other header")
    with pytest.raises(DecryptionError):
        other.unwrap(wrapped, info=b"hh")


@pytest.mark.parametrize("suite", sorted(hpke.SUITES))
def test_private_key_reloads_to_same_public_key(suite: str) -> None:
    priv = hpke.generate_private_key(suite)
    again = hpke.PrivateKeyHandle(suite, priv.export_private_bytes())
    assert again.public_key() == priv.public_key()


def test_key_handle_refuses_pickle_copy_and_prints_redacted() -> None:
    priv = hpke.generate_private_key()
    raw_hex = priv.export_private_bytes().hex()
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(priv)
    with pytest.raises(TypeError):
        copy.deepcopy(priv)
    assert raw_hex not in repr(priv) and raw_hex not in str(priv)
    assert "redacted" in repr(priv)


def test_destroy_zeroes_held_copy() -> None:
    priv = hpke.generate_private_key()
    priv.destroy()
    assert priv.export_private_bytes() == bytes(32)


def test_public_key_length_checked() -> None:
    with pytest.raises(ValueError, match="must be 32 bytes"):
        hpke.PublicKey("x25519", b"short")
    with pytest.raises(ValueError, match="unknown HPKE suite"):
        hpke.generate_private_key("rsa")
