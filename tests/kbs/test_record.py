"""The release record parser (``ReleaseRecord.decode``): what every executor runs on every Unwrap
response. Round trips, and anything that is not exactly one encoded record is refused with
KeyReleaseDenied (never another exception)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ray_confidential.errors import KeyReleaseDenied
from ray_confidential.kbs.record import CONTEXT, MAX_NAME, MAX_TOKEN_ID, ReleaseRecord

RECORD = ReleaseRecord(domain="hospital", key_version=7, token_id="jti-1", key_hash=b"k" * 32,
                       header_hash=b"h" * 32, request_nonce=b"n" * 32, iat=1_700_000_000)  # fmt: skip
ENCODED = RECORD.encode()

records = st.builds(
    ReleaseRecord,
    domain=st.text(min_size=1, max_size=40).filter(lambda s: 1 <= len(s.encode()) <= MAX_NAME),
    key_version=st.integers(0, 2**32 - 1),
    token_id=st.text(min_size=1, max_size=40).filter(lambda s: 1 <= len(s.encode()) <= MAX_TOKEN_ID),
    key_hash=st.binary(min_size=32, max_size=32),
    header_hash=st.binary(min_size=32, max_size=32),
    request_nonce=st.binary(min_size=32, max_size=32),
    iat=st.integers(0, 2**63 - 1),
)


@given(records)
def test_round_trip(record: ReleaseRecord) -> None:
    assert ReleaseRecord.decode(record.encode()) == record


def test_every_truncation_refused() -> None:
    for cut in range(len(ENCODED)):
        with pytest.raises(KeyReleaseDenied):
            ReleaseRecord.decode(ENCODED[:cut])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (ENCODED + b"\x00", "trailing bytes"),
        (b"\x02" + ENCODED[1:], "wrong version or context"),
        (ENCODED[:5] + b"X" + ENCODED[6:], "wrong version or context"),
        # domain length over MAX_NAME
        (
            ENCODED[: 5 + len(CONTEXT)] + struct.pack(">I", MAX_NAME + 1) + ENCODED[9 + len(CONTEXT) :],
            "over its maximum length",
        ),
    ],
    ids=["trailing_byte", "wrong_version", "wrong_context", "domain_over_maximum"],
)
def test_malformed_refused(data: bytes, match: str) -> None:
    with pytest.raises(KeyReleaseDenied, match=match):
        ReleaseRecord.decode(data)


@given(st.binary(max_size=400))
def test_arbitrary_bytes_refused_or_parsed(data: bytes) -> None:
    try:
        ReleaseRecord.decode(data)
    except KeyReleaseDenied:
        pass


@given(st.lists(st.tuples(st.integers(0, len(ENCODED) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutations_refused_or_round_trip(edits: list[tuple[int, int]]) -> None:
    data = bytearray(ENCODED)
    for at, value in edits:
        data[at] = value
    try:
        parsed = ReleaseRecord.decode(bytes(data))
    except KeyReleaseDenied:
        return
    assert parsed.encode() == bytes(data)  # whatever parses is exactly one canonical record
