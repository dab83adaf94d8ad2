"""Regenerate tests/vectors/sealed_v1.json (the published sealed-format v1 test vectors).

    python tests/vectors/make_sealed_vectors.py > tests/vectors/sealed_v1.json

HPKE wrapping is randomised, so a regenerated file differs in ``wrapped_dek`` (and so in
``sealed``); everything else is a function of the fixed inputs below.
"""

from __future__ import annotations

import json

from ray_confidential.crypto import hpke
from ray_confidential.sealed.format import DomainPublicKey, SealedHeader, seal

CASES = [
    ("x25519", "vector-domain", 1, "producer-1", 4096, {"plaintext_hex": "68656c6c6f"}),
    ("x25519", "vector-domain", 7, "", 4096, {"plaintext_hex": "ab" * 9000}),
    ("mlkem768-x25519", "pq-domain", 2, "node-42", 4096, {"plaintext_json": '{"a": [1, 2, 3]}'}),
]


def main() -> None:
    vectors = []
    for i, (suite, domain, version, producer, chunk, value) in enumerate(CASES):
        seed = bytes([i + 1]) * (32 if suite == "x25519" else 96)
        priv = hpke.PrivateKeyHandle(suite, seed)
        dek, object_id = bytes([0x10 + i]) * 32, bytes([0x20 + i]) * 16
        plaintext = (
            json.loads(value["plaintext_json"])
            if "plaintext_json" in value
            else bytes.fromhex(value["plaintext_hex"])
        )
        key = DomainPublicKey(domain=domain, version=version, public_key=priv.public_key())
        blob = bytes(
            seal(plaintext, key, producer_id=producer, chunk_size=chunk, _dek=dek, _object_id=object_id)
        )
        header = SealedHeader.parse(blob)
        vectors.append(
            {
                "suite": suite,
                "private_key": seed.hex(),
                "public_key": priv.public_key().raw.hex(),
                "domain": domain,
                "key_version": version,
                "producer_id": producer,
                "chunk_size": chunk,
                **value,
                "object_id": object_id.hex(),
                "dek": dek.hex(),
                "header_hash": header.header_hash.hex(),
                "sealed": blob.hex(),
            }
        )
    print(json.dumps({"format": "ray-confidential sealed v1", "vectors": vectors}, indent=1))


if __name__ == "__main__":
    main()
