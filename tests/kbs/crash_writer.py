"""Subprocess for the crash-safety tests: writes in a burst and acknowledges on stdout.

    python crash_writer.py store DIR MASTER_HEX SEED    # puts and put_many on EncryptedFileStore
    python crash_writer.py audit LOG KEY_PEM SEED       # appends (group commit) and checkpoints

Store protocol: ``B <batch> <key> <hex>...`` is printed before a put_many starts, ``A <key> <hex>`` after
each acknowledged key. Audit protocol: ``A <seq> <hash>`` after each acknowledged append and
``C <base64 checkpoint>`` after a checkpoint. The parent kills this process with SIGKILL.
"""

from __future__ import annotations

import base64
import random
import sys
import threading

from cryptography.hazmat.primitives.serialization import load_pem_private_key


def store(directory: str, master_hex: str, seed: int) -> None:
    from ray_confidential.kbs.store import EncryptedFileStore, MasterKey

    rng = random.Random(seed)
    s = EncryptedFileStore(directory, MasterKey(bytes.fromhex(master_hex)))
    print("READY", flush=True)
    i = 0
    while True:
        if rng.random() < 0.5:
            key, value = f"k/{seed}/{i}", rng.randbytes(rng.randint(0, 3000))
            s.put(key, value)
            print(f"A {key} {value.hex()}", flush=True)
            i += 1
        else:
            batch = {
                f"k/{seed}/{i + j}": rng.randbytes(rng.randint(0, 3000)) for j in range(rng.randint(2, 6))
            }
            i += len(batch)
            print("B " + " ".join(f"{k} {v.hex()}" for k, v in batch.items()), flush=True)
            s.put_many(batch)
            for k, v in batch.items():
                print(f"A {k} {v.hex()}", flush=True)


def audit(path: str, key_pem: str, seed: int) -> None:
    from ray_confidential.kbs.audit import AuditLog

    with open(key_pem, "rb") as f:
        key = load_pem_private_key(f.read(), None)
    log = AuditLog(path, key, group_commit=True)  # type: ignore[arg-type]
    print("READY", flush=True)
    out = threading.Lock()

    def worker(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        while True:
            rec = log.append("release.granted", domain=f"d{n}", nonce=rng.randbytes(16))
            with out:
                print(f"A {rec.seq} {rec.hash}", flush=True)
            if rng.random() < 0.05:
                cp = log.checkpoint()
                with out:
                    print("C " + base64.b64encode(cp).decode(), flush=True)

    for n in range(4):
        threading.Thread(target=worker, args=(n,), daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    {"store": store, "audit": audit}[sys.argv[1]](sys.argv[2], sys.argv[3], int(sys.argv[4]))
