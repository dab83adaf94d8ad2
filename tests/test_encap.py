"""HPKE sealing with the KEM step made ahead of time: RFC 9180 A.1 known answers, interoperability
with cryptography's HPKE both ways of the wrap, single use, and refusals."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ray_confidential.crypto import encap, hpke
from ray_confidential.errors import DecryptionError
from ray_confidential.keyservice import DevKeyService
from ray_confidential.sealed import open_sealed
from ray_confidential.sealed.format import DomainPublicKey, SealedHeader, seal

# RFC 9180 appendix A.1.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, mode_base. The KEM
# output depends only on the KEM; the key schedule is checked with the vector's AES-128 lengths.
A11 = {
    "skEm": "52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736",
    "pkRm": "3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d",
    "enc": "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
    "shared_secret": "fe0e18c9f024ce43799ae393c7e8fe8fce9d218875e8227b0187c04e7d2ea1fc",
    "info": "4f6465206f6e2061204772656369616e2055726e",
    "key": "4531685d41d65f03dc48f6b8302c05b0",
    "base_nonce": "56d890e5accaaf011cff4b7d",
    "pt": "4265617574792069732074727574682c20747275746820626561757479",
    "aad": "436f756e742d30",
    "ct": "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a",
}


def test_rfc9180_a11_kem_and_key_schedule() -> None:
    ephemeral = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(A11["skEm"]))
    enc = ephemeral.public_key().public_bytes_raw()
    recipient = bytes.fromhex(A11["pkRm"])
    assert enc.hex() == A11["enc"]
    dh = ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(recipient))
    shared = encap.kem_shared_secret(dh, enc, recipient)
    assert shared.hex() == A11["shared_secret"]
    suite_id = b"HPKE" + struct.pack(">HHH", 0x0020, 0x0001, 0x0001)
    key, nonce = encap.key_schedule(shared, bytes.fromhex(A11["info"]), suite_id=suite_id, nk=16)
    assert (key.hex(), nonce.hex()) == (A11["key"], A11["base_nonce"])
    ct = AESGCM(key).encrypt(nonce, bytes.fromhex(A11["pt"]), bytes.fromhex(A11["aad"]))
    assert ct.hex() == A11["ct"]


def test_ahead_of_time_seal_opens_with_cryptography_hpke() -> None:
    """Same form as ``hpke.wrap``; cryptography's HPKE opens it (the executor's owners use it)."""
    priv = hpke.generate_private_key("x25519")
    for n in range(64):
        info, dek = os.urandom(n), os.urandom(32)
        sealed = encap.encapsulate(priv.public_key()).seal(dek, info=info)
        assert len(sealed) == len(hpke.wrap(priv.public_key(), dek, info=info))
        assert priv.unwrap(sealed, info=info) == dek
        with pytest.raises(DecryptionError):
            priv.unwrap(sealed, info=info + b"x")


def test_an_encapsulation_seals_once_and_stays_in_its_process() -> None:
    ready = encap.encapsulate(hpke.generate_private_key("x25519").public_key())
    assert "ready" in repr(ready)
    ready.seal(b"k" * 32, info=b"h")
    assert "used" in repr(ready)
    with pytest.raises(RuntimeError, match="exactly once"):
        ready.seal(b"k" * 32, info=b"h")  # a second seal would reuse the AEAD key and nonce
    with pytest.raises(TypeError, match="never leaves"):
        pickle.dumps(encap.encapsulate(hpke.generate_private_key("x25519").public_key()))


def test_refusals() -> None:
    hybrid = hpke.generate_private_key("mlkem768-x25519").public_key()
    with pytest.raises(ValueError, match="x25519 suite only"):
        encap.encapsulate(hybrid)
    with pytest.raises(ValueError):  # a low-order point: the exchange would give all zeros
        encap.encapsulate(hpke.PublicKey("x25519", bytes(32)))


def test_sealed_object_with_a_ready_encapsulation_opens_as_any(tmp_path: Path) -> None:
    service = DevKeyService(tmp_path)
    with pytest.warns(UserWarning):
        service.create_domain("d")
    desc = service.descriptor("d")
    key = DomainPublicKey(domain="d", version=desc.version, public_key=desc.public_key)
    sealed = bytes(seal(np.arange(5.0), key, encapsulation=encap.encapsulate(key.public_key)))
    assert open_sealed(sealed, service).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert SealedHeader.parse(sealed).suite == "x25519"
    other = encap.encapsulate(hpke.generate_private_key("x25519").public_key())
    with pytest.raises(ValueError, match="another public key"):
        seal(1, key, encapsulation=other)
