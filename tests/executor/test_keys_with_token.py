"""A fresh call's token and data keys come from one broker call (attest with unwrap), the uncached
keys of a call with a token from one UnwrapMany, and a refusal is asked again step by step so that
the error names the step (the executor core, in-process, over the real development broker)."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enclave_actors.daemon import Executor
from enclave_actors.keys import KBSKeyReleaser, LaunchData, NodeFacts
from ray_confidential.bundle import from_callable
from ray_confidential.domains import DomainPolicy
from ray_confidential.errors import KeyReleaseDenied
from ray_confidential.kbs.embedded import EmbeddedBroker
from ray_confidential.sealed.format import SealedHeader, open_with_dek
from ray_confidential.testing.simulated import DevRootOfTrust, SimulatedTEE
from tests.executor import conf_funcs
from tests.executor.conftest import make_service

TOTAL = from_callable(conf_funcs.total)


class Counting:
    """Counts the broker calls an executor makes through its releaser."""

    def __init__(self, releaser: KBSKeyReleaser) -> None:
        self.calls: list[str] = []
        self.rpcs: list[str] = []
        for name in ("grant", "grant_with_keys", "unwrap", "unwrap_many"):
            original = getattr(releaser, name)

            def counted(*args: Any, _name: str = name, _fn: Any = original, **kwargs: Any) -> Any:
                self.calls.append(_name)
                return _fn(*args, **kwargs)

            setattr(releaser, name, counted)
        client, real_call = releaser._client, releaser._client._call

        def rpc(method: str, request: Any) -> Any:
            self.rpcs.append(method)
            return real_call(method, request)

        client._call = rpc  # the broker RPCs the client makes


@pytest.fixture
def core(tmp_path: Path) -> Iterator[tuple[Executor, Counting, Any]]:
    service = make_service(tmp_path / "state")
    broker = EmbeddedBroker.start(tmp_path / "state")
    launch = LaunchData.from_file(broker.launch_path)
    facts = NodeFacts(tee="sev-snp", node_id="ab" * 28, cluster_id=launch.cluster_id, pool="p", region="r")
    tee = SimulatedTEE("sev-snp", root=DevRootOfTrust.for_process())
    releaser = KBSKeyReleaser(launch.connect, facts=facts, evidence=tee.evidence)
    counting = Counting(releaser)
    try:
        yield Executor(releaser, facts), counting, service
    finally:
        releaser.close()
        broker.stop()


def _sealed(service: Any, domain: str, value: Any) -> bytes:
    from ray_confidential.sealed.format import DomainPublicKey, seal

    d = service.descriptor(domain)
    return bytes(seal(value, DomainPublicKey(domain=domain, version=d.version, public_key=d.public_key)))


def test_a_fresh_call_gets_its_token_and_keys_in_one_broker_call(core: Any) -> None:
    executor, counting, service = core
    objects = [_sealed(service, "exec-a", np.arange(float(n))) for n in (3, 4)]
    headers = [SealedHeader.parse(o) for o in objects]
    _, deks = executor._keys(TOTAL.digest, ("exec-a",), headers)
    assert counting.calls == ["grant_with_keys"]
    assert [open_with_dek(o, k, allow_pickle=False).sum() for o, k in zip(objects, deks, strict=True)] == [
        3.0,
        6.0,
    ]
    assert executor.stats["grants"] == 1 and executor.stats["unwraps"] == 2
    # Token cached: a new object costs one unwrap; a known one nothing.
    third = _sealed(service, "exec-a", np.ones(2))
    _, more = executor._keys(TOTAL.digest, ("exec-a",), [headers[0], SealedHeader.parse(third)])
    assert counting.calls == ["grant_with_keys", "unwrap"] and more[0] == deks[0]


def test_a_refusal_is_asked_again_step_by_step(core: Any) -> None:
    executor, counting, service = core
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        service.create_domain("other-bundle", DomainPolicy(bundles=("11" * 32,)))
    header = SealedHeader.parse(_sealed(service, "other-bundle", np.ones(1)))
    with pytest.raises(KeyReleaseDenied, match="refused a token for this call"):
        executor._keys(TOTAL.digest, ("other-bundle",), [header])
    assert counting.calls == ["grant_with_keys", "grant"] and executor.stats["unwraps"] == 0


def test_uncached_keys_of_a_call_with_a_token_come_from_one_unwrap_many(core: Any) -> None:
    executor, counting, service = core
    first = SealedHeader.parse(_sealed(service, "exec-a", np.ones(1)))
    grant, _ = executor._keys(TOTAL.digest, ("exec-a",), [first])  # the token (and one key)
    objects = [_sealed(service, "exec-a", np.arange(float(n))) for n in (2, 3, 4)]
    headers = [SealedHeader.parse(o) for o in objects]
    counting.calls.clear()
    counting.rpcs.clear()
    executor.begin_report()
    again, deks = executor._keys(TOTAL.digest, ("exec-a",), [first, *headers, headers[0]])
    report = executor.end_report()
    assert again is grant and counting.calls == ["unwrap_many"] and counting.rpcs == ["UnwrapMany"]
    assert [
        open_with_dek(o, k, allow_pickle=False).sum() for o, k in zip(objects, deks[1:4], strict=True)
    ] == [
        1.0,
        3.0,
        6.0,
    ]
    assert deks[4] == deks[1] and report["unwrap"] == {"granted": 3} and executor.stats["unwraps"] == 4
    # All cached now: no broker call at all.
    executor._keys(TOTAL.digest, ("exec-a",), headers)
    assert counting.rpcs == ["UnwrapMany"]


def test_a_refused_batch_is_asked_again_object_by_object(core: Any) -> None:
    executor, counting, service = core
    executor._keys(TOTAL.digest, ("exec-a",), [SealedHeader.parse(_sealed(service, "exec-a", np.ones(1)))])
    mine = [SealedHeader.parse(_sealed(service, "exec-a", np.ones(2))) for _ in range(2)]
    foreign = SealedHeader.parse(_sealed(service, "exec-b", np.ones(3)))  # the token names exec-a only
    counting.calls.clear()
    executor.begin_report()
    with pytest.raises(KeyReleaseDenied, match=f"object {foreign.object_id.hex()}"):
        executor._keys(TOTAL.digest, ("exec-a",), [*mine, foreign])
    report = executor.end_report()
    assert counting.calls == ["unwrap_many", "unwrap", "unwrap", "unwrap"]
    assert report["unwrap"] == {"granted": 2, "denied": 1}


def test_concurrent_calls_under_one_token_share_a_key_fetch(core: Any) -> None:
    """Calls that need keys while the executor's fetch is in flight share the next one (one
    UnwrapMany for all of them), and each gets the key of its own object."""
    executor, counting, service = core
    executor._keys(TOTAL.digest, ("exec-a",), [SealedHeader.parse(_sealed(service, "exec-a", np.ones(1)))])
    gate, entered = threading.Event(), threading.Semaphore(0)
    counted_unwrap = executor.releaser.unwrap

    def held(*args: Any, **kwargs: Any) -> Any:  # lone fetches stay in flight until released
        entered.release()
        assert gate.wait(10)
        return counted_unwrap(*args, **kwargs)

    executor.releaser.unwrap = held  # type: ignore[method-assign]
    objects = [_sealed(service, "exec-a", np.full(2, float(i))) for i in range(6)]
    counting.calls.clear()
    counting.rpcs.clear()
    deks: dict[int, bytes] = {}

    def call(i: int) -> None:
        deks[i] = executor._keys(TOTAL.digest, ("exec-a",), [SealedHeader.parse(objects[i])])[1][0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    threads[0].start()
    assert entered.acquire(timeout=10)  # alone: at once
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 10
    while sum(len(b.items) for b in executor._together._open.values()) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(10)
    assert counting.rpcs == ["Unwrap", "UnwrapMany"] and executor._together.calls == 2
    assert [open_with_dek(objects[i], deks[i], allow_pickle=False).sum() for i in range(6)] == [
        0.0, 2.0, 4.0, 6.0, 8.0, 10.0
    ]  # fmt: skip


def test_a_refused_object_in_a_shared_fetch_fails_only_its_own_call(core: Any) -> None:
    executor, counting, service = core
    executor._keys(TOTAL.digest, ("exec-a",), [SealedHeader.parse(_sealed(service, "exec-a", np.ones(1)))])
    mine = SealedHeader.parse(_sealed(service, "exec-a", np.ones(2)))
    foreign = SealedHeader.parse(_sealed(service, "exec-b", np.ones(3)))  # the token names exec-a only
    grant = executor._cached_grant(TOTAL.digest, ("exec-a",))
    assert grant is not None
    counting.calls.clear()
    results = executor._fetch_deks(grant, [mine, foreign])  # one batch of two calls' objects
    assert counting.calls == ["unwrap_many", "unwrap", "unwrap"]
    assert isinstance(results[1], KeyReleaseDenied) and str(foreign.object_id.hex()) in str(results[1])
    assert isinstance(results[0], bytes) and executor._cached_dek(mine, executor.clock()) == results[0]


def test_concurrent_fresh_calls_attest_once(core: Any) -> None:
    """Calls that need a token while another call attests for it wait for that token instead of
    attesting again; then their keys come from a shared fetch."""
    executor, counting, service = core
    gate, entered = threading.Event(), threading.Event()
    counted = executor.releaser.grant_with_keys

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert gate.wait(10)
        return counted(*args, **kwargs)

    executor.releaser.grant_with_keys = held  # type: ignore[method-assign]
    objects = [_sealed(service, "exec-a", np.full(3, float(i))) for i in range(4)]
    deks: dict[int, bytes] = {}

    def call(i: int) -> None:
        deks[i] = executor._keys(TOTAL.digest, ("exec-a",), [SealedHeader.parse(objects[i])])[1][0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    threads[0].start()
    assert entered.wait(10)
    for t in threads[1:]:
        t.start()
    time.sleep(0.3)  # let them reach the token (a late one finds it cached: the assertions hold either way)
    gate.set()
    for t in threads:
        t.join(10)
    assert counting.calls.count("grant_with_keys") + counting.calls.count("grant") == 1
    assert [open_with_dek(objects[i], deks[i], allow_pickle=False).sum() for i in range(4)] == [
        0.0,
        3.0,
        6.0,
        9.0,
    ]
