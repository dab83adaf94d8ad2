"""Sealed format v1: round trips per content type, tamper matrix, seal-only callers."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ray_confidential.crypto import hpke, stream
from ray_confidential.domains import DomainPolicy
from ray_confidential.errors import DecryptionError, KeyReleaseDenied
from ray_confidential.keyservice import DevKeyService, PublicDirectory
from ray_confidential.sealed import open_sealed, seal
from ray_confidential.sealed.format import DomainPublicKey, SealedHeader, header_hash_of

SMALL_CHUNK = 4096


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> DevKeyService:
    svc = DevKeyService(tmp_path_factory.mktemp("keys"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        svc.create_domain("d")
        svc.create_domain("pickly", DomainPolicy.development(allow_pickle=True, warn=False))
    return svc


def _key(service: DevKeyService, domain: str = "d", version: int | None = None) -> DomainPublicKey:
    desc = service.descriptor(domain, version)
    return DomainPublicKey(domain=desc.name, version=desc.version, public_key=desc.public_key)


def _round_trip(service: DevKeyService, value: object, chunk_size: int = SMALL_CHUNK) -> object:
    return open_sealed(seal(value, _key(service), chunk_size=chunk_size), service)


# -- round trips -------------------------------------------------------------------------------
array_strategy = hnp.arrays(
    dtype=st.one_of(
        hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(), hnp.boolean_dtypes()
    ),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=40),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arr=array_strategy, fortran=st.booleans())
def test_numpy_round_trip(service: DevKeyService, arr: np.ndarray, fortran: bool) -> None:
    arr = np.asfortranarray(arr) if fortran else arr
    out = _round_trip(service, arr)
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ints=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=200),
    text=st.text(max_size=30),
)
def test_arrow_table_and_batch_round_trip(service: DevKeyService, ints: list[int], text: str) -> None:
    table = pa.table({"i": pa.array(ints, pa.int64()), "s": pa.array([text] * len(ints), pa.string())})
    assert _round_trip(service, table).equals(table)
    batch = pa.record_batch([pa.array(ints, pa.int64())], names=["i"])
    out = _round_trip(service, batch)
    assert isinstance(out, pa.RecordBatch) and out.equals(batch)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_json_round_trip(service: DevKeyService, value: object) -> None:
    assert _round_trip(service, value) == value


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3 * SMALL_CHUNK + 17))
def test_bytes_round_trip_across_chunk_boundaries(service: DevKeyService, data: bytes) -> None:
    assert _round_trip(service, data) == data


def test_empty_and_large_values(service: DevKeyService) -> None:
    assert _round_trip(service, b"") == b""
    assert _round_trip(service, np.zeros((0, 3))).shape == (0, 3)
    assert _round_trip(service, pa.table({"a": pa.array([], pa.int32())})).num_rows == 0
    big = np.random.default_rng(1).random(3 << 20)  # 24 MiB, several 4 MiB chunks, threaded path
    np.testing.assert_array_equal(_round_trip(service, big, chunk_size=4 << 20), big)


def test_torch_tensor_and_state_dict_round_trip(service: DevKeyService) -> None:
    torch = pytest.importorskip("torch", reason="the torch extra is not installed")
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert torch.equal(_round_trip(service, tensor), tensor)
    state = {"w": torch.randn(4, 4), "b": torch.zeros(4, dtype=torch.int64)}
    out = _round_trip(service, state)
    assert set(out) == {"w", "b"} and all(torch.equal(out[k], state[k]) for k in state)


# -- published test vectors ---------------------------------------------------------------------
VECTORS = Path(__file__).parent / "vectors" / "sealed_v1.json"


def test_published_vectors_reproduce() -> None:
    vectors = json.loads(VECTORS.read_text())["vectors"]
    assert len(vectors) >= 3
    for vec in vectors:
        priv = hpke.PrivateKeyHandle(vec["suite"], bytes.fromhex(vec["private_key"]))
        sealed = bytes.fromhex(vec["sealed"])
        header = SealedHeader.parse(sealed)
        assert header.header_hash.hex() == vec["header_hash"]
        dek = priv.unwrap(header.wrapped_dek, info=header.header_hash)
        assert dek.hex() == vec["dek"]
        # Everything but the (randomised) HPKE wrap is deterministic given DEK and object id.
        again = seal(
            json.loads(vec["plaintext_json"])
            if "plaintext_json" in vec
            else bytes.fromhex(vec["plaintext_hex"]),
            DomainPublicKey(domain=vec["domain"], version=vec["key_version"], public_key=priv.public_key()),
            producer_id=vec["producer_id"],
            chunk_size=vec["chunk_size"],
            _dek=dek,
            _object_id=header.object_id,
        )
        again_header = SealedHeader.parse(again)
        assert again_header.header_hash == header.header_hash
        assert bytes(again[again_header.body_offset :]) == sealed[header.body_offset :]


# -- tamper matrix: every case raises DecryptionError and returns nothing ------------------------
def _sealed(service: DevKeyService, data: bytes = b"", version: int | None = None) -> bytes:
    data = data or os.urandom(3 * SMALL_CHUNK + 100)
    return bytes(seal(data, _key(service, version=version), chunk_size=SMALL_CHUNK))


def _chunks(blob: bytes) -> tuple[bytes, list[bytes]]:
    header = SealedHeader.parse(blob)
    body = blob[header.body_offset :]
    size = header.chunk_size + stream.TAG_SIZE
    return blob[: header.body_offset], [body[i : i + size] for i in range(0, len(body), size)]


def _refused(service: DevKeyService, blob: bytes) -> None:
    with pytest.raises(DecryptionError):
        open_sealed(blob, service)


def test_every_header_bit_flip_refused(service: DevKeyService) -> None:
    blob = _sealed(service)
    header_len = SealedHeader.parse(blob).body_offset
    for bit in range(header_len * 8):
        mutated = bytearray(blob)
        mutated[bit // 8] ^= 1 << (bit % 8)
        try:
            open_sealed(bytes(mutated), service)
        except (DecryptionError, KeyReleaseDenied):
            continue  # a flipped domain name names a domain this service does not hold
        pytest.fail(f"header bit {bit} flip was accepted")


def test_chunk_bit_flips_refused(service: DevKeyService) -> None:
    blob = _sealed(service)
    start = SealedHeader.parse(blob).body_offset
    rng = np.random.default_rng(3)
    positions = set(rng.integers(start, len(blob), 300).tolist()) | {start, len(blob) - 1}
    for pos in sorted(positions):
        mutated = bytearray(blob)
        mutated[pos] ^= 1 << int(rng.integers(0, 8))
        _refused(service, bytes(mutated))


def test_truncation_at_every_chunk_boundary_refused(service: DevKeyService) -> None:
    blob = _sealed(service)
    head, chunks = _chunks(blob)
    for n in range(len(chunks)):
        _refused(service, head + b"".join(chunks[:n]))
    _refused(service, blob[:-1])
    _refused(service, blob + b"\x00")


def test_reorder_and_duplication_refused(service: DevKeyService) -> None:
    head, chunks = _chunks(_sealed(service))
    _refused(service, head + chunks[1] + chunks[0] + b"".join(chunks[2:]))
    _refused(service, head + chunks[0] + chunks[0] + b"".join(chunks[2:]))
    _refused(service, head + b"".join(chunks[:-1]) + chunks[-2] + chunks[-1])


def test_splices_from_another_object_refused(service: DevKeyService) -> None:
    data = os.urandom(3 * SMALL_CHUNK + 100)
    head_a, chunks_a = _chunks(_sealed(service, data))
    head_b, chunks_b = _chunks(_sealed(service, data))  # same plaintext, different DEK and object id
    _refused(service, head_a + chunks_b[0] + b"".join(chunks_a[1:]))
    _refused(service, head_b + b"".join(chunks_a))


def test_dek_wrapped_under_other_version_refused(service: DevKeyService) -> None:
    v1 = service.descriptor("d")
    service.rotate("d")
    try:
        lying = DomainPublicKey(domain="d", version=v1.version + 1, public_key=v1.public_key)
        _refused(service, bytes(seal(b"x" * 100, lying)))
    finally:
        service.retire("d", v1.version + 1)


def test_retired_version_refused(tmp_path: Path) -> None:
    svc = DevKeyService(tmp_path)
    svc.create_domain("r", DomainPolicy.development(warn=False))
    blob = bytes(seal(b"payload", _key(svc, "r")))
    assert open_sealed(blob, svc) == b"payload"
    svc.rotate("r")
    svc.retire("r", 1)
    _refused(svc, blob)
    assert open_sealed(bytes(seal(b"new", _key(svc, "r"))), svc) == b"new"


def test_key_commitment_checked_before_any_decryption(
    service: DevKeyService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An attacker holding only the public key crafts a header whose commitment does not match the
    # DEK, re-wrapping that DEK under the new header hash so the HPKE unwrap itself succeeds.
    desc = service.descriptor("d")
    dek = os.urandom(32)
    blob = bytes(seal(b"y" * 5000, _key(service), chunk_size=SMALL_CHUNK, _dek=dek))
    header = SealedHeader.parse(blob)
    raw = bytearray(header.header_bytes)
    auth_len = len(raw) - 5 - 2 - len(header.wrapped_dek)
    commit_at = 5 + auth_len - 32
    raw[commit_at] ^= 0xFF
    new_hash = header_hash_of(bytes(raw[5 : 5 + auth_len]))
    wrapped = hpke.wrap(desc.public_key, dek, info=new_hash)
    new_header = bytes(raw[5 : 5 + auth_len]) + struct.pack(">H", len(wrapped)) + wrapped
    forged = struct.pack(">BI", 1, len(new_header)) + new_header + blob[header.body_offset :]
    calls: list[int] = []
    monkeypatch.setattr(stream, "decrypt_into", lambda *a, **k: calls.append(1))
    _refused(service, forged)
    assert calls == [], "decryption ran before the key commitment was checked"


def test_version_byte_and_oversized_header_refused(service: DevKeyService) -> None:
    blob = _sealed(service)
    _refused(service, b"\x02" + blob[1:])
    _refused(service, blob[:1] + struct.pack(">I", 1 << 20) + blob[5:])
    _refused(service, b"")


# -- misuse and trust boundaries ----------------------------------------------------------------
def test_unsupported_type_and_pickle_without_opt_in(service: DevKeyService) -> None:
    with pytest.raises(TypeError, match="allow_pickle=True"):
        seal({1, 2}, _key(service))
    with pytest.raises(TypeError, match="dtype=object"):
        seal(np.array([object()]), _key(service))
    # The opted-in domain seals and opens pickle payloads.
    assert open_sealed(seal({1, 2}, _key(service, "pickly"), allow_pickle=True), service) == {1, 2}
    # A pickle payload forged into a domain that did not opt in is refused, never unpickled.
    forged = seal({1, 2}, _key(service, "d"), allow_pickle=True)
    _refused(service, bytes(forged))


def test_unknown_domain_has_clear_error(service: DevKeyService) -> None:
    with pytest.raises(ValueError, match=r"unknown domain 'nope'.*create_domain"):
        service.descriptor("nope")


SEAL_ONLY = r"""
import json, sys
from ray_confidential.keyservice import PublicDirectory
from ray_confidential.sealed import open_sealed, seal
from ray_confidential.sealed.format import DomainPublicKey
from ray_confidential.errors import KeyReleaseDenied
directory = PublicDirectory.from_file(sys.argv[1])
desc = directory.descriptor("d")
blob = seal(b"owner-only-" * 100, DomainPublicKey(domain="d", version=desc.version, public_key=desc.public_key))
open(sys.argv[2], "wb").write(blob)
try:
    open_sealed(blob, directory)
except KeyReleaseDenied:
    print("DENIED")
"""


def test_untrusted_process_with_public_key_seals_but_cannot_open(
    service: DevKeyService, tmp_path: Path
) -> None:
    descriptors = tmp_path / "descriptors.json"
    descriptors.write_text(json.dumps({"domains": [service.descriptor("d").to_dict()]}))
    out = tmp_path / "sealed.bin"
    env = {**os.environ, "RAY_CONFIDENTIAL_STATE_DIR": str(tmp_path / "empty-state")}
    proc = subprocess.run(
        [sys.executable, "-c", SEAL_ONLY, str(descriptors), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "DENIED"
    assert b"owner-only-" not in out.read_bytes()
    assert open_sealed(out.read_bytes(), service) == b"owner-only-" * 100
    with pytest.raises(KeyReleaseDenied):
        open_sealed(out.read_bytes(), PublicDirectory({"d": service.descriptor("d")}))


def test_format_doc_vector_matches_code() -> None:
    """docs/sealed-format.md publishes the first vector's derived values; keep the doc honest."""
    import re

    from ray_confidential.sealed.format import _key_schedule

    doc = (Path(__file__).resolve().parents[1] / "docs" / "sealed-format.md").read_text()
    vec = json.loads(VECTORS.read_text())["vectors"][0]
    header = SealedHeader.parse(bytes.fromhex(vec["sealed"]))
    commitment, payload_key, prefix = _key_schedule(bytes.fromhex(vec["dek"]), header.object_id)
    for name, value in [
        ("key_commitment", commitment),
        ("payload_key", payload_key),
        ("nonce_prefix", prefix),
        ("header_hash", header.header_hash),
    ]:
        match = re.search(rf"\| {name} \| `([0-9a-f]+)` \|", doc)
        assert match and match.group(1) == value.hex(), name


def test_npy_decoder_refuses_what_a_hostile_sealer_could_send() -> None:
    """Anyone holding the public key can seal, so the .npy decoder must refuse pickled (object)
    arrays, lying sizes and malformed headers, every time (its header cache included)."""
    import io

    from ray_confidential.sealed.content import ContentType, decode

    def npy(arr: np.ndarray, *, allow_pickle: bool = False) -> bytes:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=allow_pickle)
        return buf.getvalue()

    good = npy(np.arange(6.0).reshape(2, 3))
    assert decode(ContentType.NUMPY, good, allow_pickle=False).tolist() == [[0, 1, 2], [3, 4, 5]]
    hostile = npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for _ in range(2):  # the second time through the header cache
        with pytest.raises(ValueError, match="object dtype"):
            decode(ContentType.NUMPY, hostile, allow_pickle=False)
    for bad, match in [
        (good[:-8], "size does not match"),
        (good + b"\0" * 8, "size does not match"),
        (b"\x93NUMPX" + good[6:], "not a .npy"),
        (good[:6] + b"\x09" + good[7:], "unsupported .npy version"),
        (good[:8] + struct.pack("<H", 0xFFFF) + good[10:], "too long or truncated"),
        (good[:8] + struct.pack("<H", 4) + good[10:], "malformed .npy header"),  # cut inside its dict
    ]:
        with pytest.raises(ValueError, match=match):
            decode(ContentType.NUMPY, bad, allow_pickle=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decoders_raise_only_value_error_on_mutated_plaintext(data: st.DataObject) -> None:
    """Mutated payloads of every safe content type fail with ValueError only (the documented error),
    never another exception type a caller would not expect."""
    from ray_confidential.sealed.content import ContentType, decode, encode

    value = data.draw(st.sampled_from([np.arange(5.0), {"a": [1, 2]}, pa.table({"x": [1, 2, 3]})]))
    encoded = encode(value, allow_pickle=False)
    payload = bytearray(b"".join(bytes(s) for s in encoded.segments))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "extend"]))
        if op == "flip" and payload:
            payload[data.draw(st.integers(0, len(payload) - 1))] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            payload = payload[: data.draw(st.integers(0, len(payload)))]
        else:
            payload += data.draw(st.binary(min_size=1, max_size=16))
    kind = data.draw(st.sampled_from([encoded.content_type, *ContentType]))
    if kind is ContentType.PICKLE:
        kind = encoded.content_type
    try:
        decode(kind, bytes(payload), allow_pickle=False)
    except ValueError:
        pass


def test_parsed_headers_are_remembered_by_their_exact_bytes(service: DevKeyService) -> None:
    """The parse cache serves only the very header bytes it parsed: one flipped byte anywhere in the
    header (here in the wrapped key, which parsing does not authenticate) is parsed afresh."""
    blob = _sealed(service)
    first = SealedHeader.parse(blob)
    assert SealedHeader.parse(bytes(blob)) is first
    at = first.body_offset - 1  # the wrapped DEK ends the header
    mutated = bytearray(blob)
    mutated[at] ^= 0x01
    other = SealedHeader.parse(bytes(mutated))
    assert other is not first and other.wrapped_dek != first.wrapped_dek
    assert other.header_bytes == bytes(mutated[: first.body_offset])
    _refused(service, bytes(mutated))
