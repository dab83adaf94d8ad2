"""Broker crash safety (issue 4 acceptance): kill -9 during a burst, restart on the same store and log.

A broker built from a production ``kbs.yaml`` (TLS, mutual-TLS owners, encrypted file store, real audit
log with group commit; tests/kbs/crash_broker.py) runs as a subprocess. An owner creates and rotates
domains and fetches audit checkpoints (``GetAuditCheckpoint``) while simulated executors attest and
unwrap objects sealed to the acknowledged key versions. The broker is killed with SIGKILL at a random
moment, restarted on the same store and log, and the burst goes on; three kills in all. Then:

- every acknowledged domain and key version is present with the same public key, and a fresh
  executor can open data sealed to it;
- every release an executor received has its grant record in the audit log on disk;
- the log verifies against the last checkpoint the owner fetched (no acknowledged record lost, no
  history rewritten), after each kill and at the end;
- nothing is half-written: the broker restarts on the store, and at the end every entry authenticates
  and no temporary file or journal is left.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from ray_confidential.crypto import hpke
from ray_confidential.kbs.audit import load_public_key, parse_checkpoint, parse_record, verify_log
from ray_confidential.kbs.client import KBSClient
from ray_confidential.kbs.config import BrokerConfig, public_pem
from ray_confidential.kbs.store import EncryptedFileStore, MasterKey
from ray_confidential.sealed.format import DomainPublicKey, SealedHeader, open_with_dek, seal
from ray_confidential.testing.simulated import DevRootOfTrust
from tests.kbs.broker_env import PKI, Executor, pinned_policy, write_production_config

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KIND = "sev-snp"
OWNER = "owner-a"
KILLS = 3


@dataclass
class Broker:
    proc: subprocess.Popen[str]
    port: int
    owner_port: int


@dataclass
class Acks:
    """What the clients were told, and so what must survive."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    keys: dict[tuple[str, int], hpke.PublicKey] = field(default_factory=dict)  # (domain, version)
    releases: list[tuple[str, str]] = field(default_factory=list)  # (token id, header hash hex)
    checkpoint: bytes | None = None
    domains_created: int = 0


def _start(config: Path, launch: Path, log: Path) -> Broker:
    with open(log, "a") as err:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "crash_broker.py"), str(config), str(launch)],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY "), f"broker did not start: {line!r}; see {log}"
    _, port, owner_port = line.split()
    return Broker(proc, int(port), int(owner_port))


@contextmanager
def _clients(b: Broker, pki: PKI, release_pem: bytes) -> Iterator[tuple[KBSClient, KBSClient]]:
    cert, key = pki.owners[OWNER]
    owner = KBSClient(f"127.0.0.1:{b.owner_port}", release_public_key=release_pem, ca_cert=pki.ca_pem,
                      client_cert=cert, client_key=key, timeout=3.0, retries=0)  # fmt: skip
    executor = KBSClient(f"127.0.0.1:{b.port}", release_public_key=release_pem, ca_cert=pki.ca_pem, timeout=3.0,
                         retries=0)  # fmt: skip
    try:
        yield owner, executor
    finally:
        owner.close()
        executor.close()


def _owner_burst(owner: KBSClient, acks: Acks, audit_pub: ec.EllipticCurvePublicKey, rng: random.Random,
                 stop: threading.Event, tag: str) -> None:  # fmt: skip
    """Create and rotate domains, fetch checkpoints; record each acknowledgement. Ends at the kill."""
    i = 0
    try:
        while not stop.is_set():
            i += 1
            with acks.lock:
                known = sorted({name for name, _ in acks.keys})
            if known and rng.random() < 0.4:
                d = owner.rotate(rng.choice(known))
            else:
                d = owner.create_domain(f"d-{tag}-{i}", pinned_policy(KIND))
            with acks.lock:
                acks.keys[(d.name, d.version)] = d.public_key
                acks.domains_created += 1
            if i % 4 == 0:
                cp = owner.audit_checkpoint()
                parse_checkpoint(cp, audit_pub)  # signed by the broker's audit key
                with acks.lock:
                    acks.checkpoint = cp
    except Exception:  # the broker was killed under this call: it was never acknowledged
        return


def _executor_burst(client: KBSClient, acks: Acks, rng: random.Random, stop: threading.Event) -> None:
    """Attest and unwrap objects sealed to acknowledged key versions; record each release received."""
    ex = Executor.create(KIND)
    try:
        while not stop.is_set():
            with acks.lock:
                choices = sorted(acks.keys)
            if not choices:
                time.sleep(0.01)
                continue
            name, version = rng.choice(choices)
            payload = os.urandom(24)
            blob = bytes(
                seal(
                    payload,
                    DomainPublicKey(domain=name, version=version, public_key=acks.keys[(name, version)]),
                )
            )
            token = ex.attest(client, domains=(name,))
            dek = client.unwrap(token, blob, ex.key)
            assert open_with_dek(blob, dek, allow_pickle=False) == payload
            with acks.lock:
                acks.releases.append((token.jti, SealedHeader.parse(blob).header_hash.hex()))
    except AssertionError:
        raise
    except Exception:
        return


def _check_audit(audit_path: Path, audit_pub: ec.EllipticCurvePublicKey, acks: Acks) -> None:
    """The log verifies against the owner's last checkpoint; every release received is recorded."""
    verify_log(audit_path, audit_pub, checkpoint=acks.checkpoint)
    granted = set()
    for line in audit_path.read_bytes().split(b"\n"):
        if not line:
            continue
        try:
            rec = parse_record(line)
        except ValueError:  # a torn final line: an append the kill cut, never acknowledged
            continue
        if rec.event == "unwrap" and rec.fields.get("decision") == "grant":
            granted.add((rec.fields["token_id"], rec.fields["header_hash"]))
    missing = [r for r in acks.releases if r not in granted]
    assert not missing, f"{len(missing)} releases received by executors have no audit record: {missing[:3]}"


def _check_keys(owner: KBSClient, executor: KBSClient, acks: Acks) -> None:
    """Every acknowledged (domain, version) is back with the same key and opens data sealed to it."""
    names = sorted({name for name, _ in acks.keys})
    for name, version in sorted(acks.keys):
        assert owner.descriptor(name, version).public_key == acks.keys[(name, version)], (name, version)
    ex = Executor.create(KIND)
    for start in range(0, len(names), 16):  # a token names at most 16 domains
        chunk = names[start : start + 16]
        token = ex.attest(executor, domains=tuple(chunk))
        for (name, version), pub in sorted(acks.keys.items()):
            if name in chunk:
                blob = bytes(seal(b"survives", DomainPublicKey(domain=name, version=version, public_key=pub)))
                assert (
                    open_with_dek(blob, executor.unwrap(token, blob, ex.key), allow_pickle=False)
                    == b"survives"
                )


def test_kill_9_during_burst_loses_nothing_acknowledged(tmp_path: Path) -> None:
    pki = PKI.create(owners=(OWNER,))
    config_path = write_production_config(tmp_path, pki, rate_limit={"disabled": True}, domains=[])
    config = BrokerConfig.from_yaml(config_path)
    release_pem, audit_pub = public_pem(config.release_key), config.audit_key.public_key()
    launch = tmp_path / "launch.hex"
    launch.write_text(DevRootOfTrust.for_process().to_launch_data([KIND]).hex())
    broker_log = tmp_path / "broker.log"
    rng = random.Random(4)
    acks = Acks()
    broker = _start(config_path, launch, broker_log)
    try:
        for kill in range(KILLS):
            stop = threading.Event()
            with _clients(broker, pki, release_pem) as (owner, executor):
                if kill:
                    _check_keys(owner, executor, acks)  # everything acknowledged before the last kill
                threads = [threading.Thread(target=_owner_burst, args=(owner, acks, audit_pub, random.Random(rng.random()), stop, str(kill)))]  # fmt: skip
                threads += [
                    threading.Thread(target=_executor_burst, args=(executor, acks, random.Random(rng.random()), stop))
                    for _ in range(3)
                ]  # fmt: skip
                for t in threads:
                    t.start()
                time.sleep(rng.uniform(0.8, 1.5))
                broker.proc.send_signal(signal.SIGKILL)  # mid-burst, without warning
                broker.proc.wait(10)
                stop.set()
                for t in threads:
                    t.join(10)
            _check_audit(config.audit_path, audit_pub, acks)
            broker = _start(config_path, launch, broker_log)  # same store, same log
        with _clients(broker, pki, release_pem) as (owner, executor):
            _check_keys(owner, executor, acks)
            final_cp = owner.audit_checkpoint()
    finally:
        if broker.proc.poll() is None:
            broker.proc.send_signal(signal.SIGTERM)
            try:
                broker.proc.wait(10)
            except subprocess.TimeoutExpired:
                broker.proc.kill()
                broker.proc.wait()
    assert broker.proc.returncode == 0, broker_log.read_text()[-2000:]
    # The burst did something worth checking.
    assert acks.domains_created >= 2 * KILLS and len(acks.releases) >= 2 * KILLS, (
        acks.domains_created,
        len(acks.releases),
    )
    assert acks.checkpoint is not None
    print(f"crash test: {acks.domains_created} key versions acknowledged, {len(acks.releases)} releases")
    # The log verifies against the owner's checkpoints (the last of the burst and the final one).
    _check_audit(config.audit_path, audit_pub, acks)
    assert verify_log(config.audit_path, audit_pub, checkpoint=final_cp).torn_tail is False
    assert (
        load_public_key((config.audit_path.parent / (config.audit_path.name + ".pub")).read_bytes())
        is not None
    )
    # Nothing half-written: every entry authenticates, no temporary file or journal is left.
    store_dir = Path(config.store["path"])
    with EncryptedFileStore(store_dir, MasterKey.from_file(config.store["master_key"]["path"])) as store:
        for key in store.keys():
            assert store.get(key) is not None
    leftovers = [p.name for p in (store_dir / "entries").iterdir() if p.name.startswith(".tmp")]
    assert not leftovers and not (store_dir / "JOURNAL").exists()
