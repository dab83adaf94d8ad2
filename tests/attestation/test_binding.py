"""Binding encoding: published vectors, injectivity, checked maxima."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_confidential.attestation.binding import CONTEXT, Binding
from ray_confidential.errors import EvidenceFormatError

DOC = Path(__file__).resolve().parents[2] / "docs" / "attestation-binding.md"


def _doc_vectors() -> list[dict[str, str]]:
    blocks = re.findall(r"### Vector \d+.*?```text\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    out = []
    for block in blocks:
        fields = {}
        for line in block.strip().splitlines():
            key, value = line.split(None, 1)
            fields[key] = value.split("  (")[0].strip()
        out.append(fields)
    return out


def _binding(**overrides: object) -> Binding:
    fields: dict[str, object] = {
        "nonce": bytes(32),
        "executor_public_key": b"\x01" * 32,
        "hpke_suite": "X25519-HKDF-SHA256-AES-256-GCM",
        "cluster_id": "cluster-a",
        "bundle_digest": b"\x02" * 32,
    }
    fields.update(overrides)
    return Binding(**fields)  # type: ignore[arg-type]


def test_published_vectors_reproduce() -> None:
    vectors = _doc_vectors()
    assert len(vectors) >= 2
    for v in vectors:
        b = Binding(
            nonce=bytes.fromhex(v["nonce"]),
            executor_public_key=bytes.fromhex(v["executor_public_key"]),
            hpke_suite=v["hpke_suite"],
            cluster_id=bytes.fromhex(v["cluster_id"]).decode("utf-8"),
            bundle_digest=bytes.fromhex(v["bundle_digest"]),
        )
        assert b.encode().hex() == v["encoding"]
        assert b.report_data().hex() == v["report_data"]
        assert b.gpu_nonce().hex() == v["gpu_nonce"]
        assert Binding.decode(b.encode()) == b


def test_encoding_starts_with_version_and_context() -> None:
    enc = _binding().encode()
    assert enc[0] == 1
    assert enc[1:5] == len(CONTEXT).to_bytes(4, "big")
    assert enc[5 : 5 + len(CONTEXT)] == CONTEXT


@pytest.mark.parametrize(
    "field, value",
    [
        ("nonce", b"\x01" * 32),
        ("executor_public_key", b"\x03" * 32),
        ("hpke_suite", "P256-HKDF-SHA256-AES-128-GCM"),
        ("cluster_id", "cluster-b"),
        ("bundle_digest", b"\x04" * 32),
    ],
)
def test_each_field_changes_report_data_and_gpu_nonce(field: str, value: object) -> None:
    a, b = _binding(), _binding(**{field: value})
    assert a.report_data() != b.report_data()
    assert a.gpu_nonce() != b.gpu_nonce()


def test_field_boundaries_do_not_collide() -> None:
    # Moving bytes between adjacent fields must change the encoding (length prefixes).
    a = _binding(hpke_suite="AB", cluster_id="C")
    b = _binding(hpke_suite="A", cluster_id="BC")
    assert a.encode() != b.encode()


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"nonce": bytes(31)}, "nonce must be 32"),
        ({"nonce": bytes(33)}, "nonce must be 32"),
        ({"executor_public_key": b""}, "executor_public_key"),
        ({"executor_public_key": bytes(4097)}, "executor_public_key"),
        ({"hpke_suite": ""}, "hpke_suite"),
        ({"hpke_suite": "x" * 129}, "hpke_suite"),
        ({"hpke_suite": "caf\u00e9"}, "hpke_suite"),
        ({"cluster_id": ""}, "cluster_id"),
        ({"cluster_id": "\u00e9" * 129}, "cluster_id"),
        ({"bundle_digest": bytes(20)}, "bundle_digest"),
    ],
)
def test_out_of_range_fields_refused(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _binding(**overrides)


def test_wrong_types_refused() -> None:
    with pytest.raises(TypeError, match="nonce must be bytes"):
        _binding(nonce="00" * 32)
    with pytest.raises(TypeError, match="cluster_id must be str"):
        _binding(cluster_id=b"cluster")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda e: b"\x02" + e[1:], "version"),
        (lambda e: e[:-1], "truncated"),
        (lambda e: e + b"\x00", "trailing"),
        (lambda e: e[:1] + (10**6).to_bytes(4, "big") + e[5:], "over its maximum"),
        (lambda e: e[:5] + b"X" + e[6:], "context"),
        (lambda e: b"", "version"),
    ],
)
def test_decode_refuses_malformed(mutate: object, match: str) -> None:
    enc = _binding().encode()
    with pytest.raises(EvidenceFormatError, match=match):
        Binding.decode(mutate(enc))  # type: ignore[operator]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decode_random_bytes_raises_only_format_error(data: bytes) -> None:
    try:
        b = Binding.decode(data)
    except EvidenceFormatError:
        return
    assert b.encode() == data


@settings(max_examples=100, deadline=None)
@given(
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=1, max_size=200),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
    st.text(min_size=1, max_size=60).filter(lambda s: len(s.encode("utf-8", "surrogatepass")) <= 256),
    st.sampled_from([32, 48, 64]),
)
def test_round_trip(nonce: bytes, key: bytes, suite: str, cluster: str, digest_size: int) -> None:
    try:
        cluster.encode("utf-8")
    except UnicodeEncodeError:
        return
    b = Binding(
        nonce=nonce,
        executor_public_key=key,
        hpke_suite=suite,
        cluster_id=cluster,
        bundle_digest=bytes(digest_size),
    )
    assert Binding.decode(b.encode()) == b
