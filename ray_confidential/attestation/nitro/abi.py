"""AWS Nitro Enclaves attestation document: bytes <-> frozen records.

The NSM returns a COSE_Sign1 structure (RFC 8152 section 4.2; CBOR tag 18 optional) whose payload is
the CBOR attestation document of aws-nitro-enclaves-nsm-api ``docs/attestation_process.md``
section 2.2 ("AttestationDocument"), checked field by field as section 3.2.2 says.

    >>> from ray_confidential.testing.nitro_fake import NitroTestRoot, build_evidence
    >>> fake = build_evidence(NitroTestRoot.generate(), report_data=b"hello")
    >>> doc = parse_document(fake.evidence)
    >>> doc.document.user_data, doc.document.digest
    (b'hello', 'SHA384')
    >>> NitroDocument.from_bytes(doc.to_bytes()) == doc
    True

Parsing is strict: before ``cbor2`` decodes anything, a scanner checks that the bytes are one
well-formed CBOR item with definite lengths, minimal-length heads, no tags (except the optional
outer tag 18), no floats or simple values other than ``null``, no duplicate map keys, bounded depth
and nothing after the item. Unknown payload fields, wrong types and out-of-range sizes are refused.

Not checked here: signatures, certificates, PCR values (``verify`` and ``validate`` do that).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import cbor2

from ray_confidential.errors import EvidenceFormatError

# attestation_process.md section 3.1: `18(/* COSE_Sign1 */ ...)`; RFC 8152 section 4.2.
COSE_SIGN1_TAG: Final = 18
# RFC 8152 section 8.1 / IANA COSE Algorithms: ES384 = -35; header label 1 = alg (section 3.1).
COSE_HEADER_ALG: Final = 1
COSE_ALG_ES384: Final = -35
# RFC 8152 section 4.4: Sig_structure context for COSE_Sign1.
SIG_STRUCTURE_CONTEXT: Final = "Signature1"

# attestation_process.md section 3.1: payload `bstr .size (1..16384)`, signature `bstr .size (32/48/64)`
# per coordinate -> an ES384 signature is r || s, 2 x 48 bytes (RFC 8152 section 8.1).
MAX_PAYLOAD_SIZE: Final = 16384
SIGNATURE_SIZE: Final = 96
MAX_PROTECTED_SIZE: Final = 64
# Whole COSE_Sign1: payload + headers + signature + CBOR heads, rounded up.
MAX_DOCUMENT_SIZE: Final = MAX_PAYLOAD_SIZE + 1024
# Base64 text of a maximal document, with room for line breaks.
MAX_BASE64_SIZE: Final = 2 * MAX_DOCUMENT_SIZE

# attestation_process.md section 3.2.2.2 (content checks).
DIGEST_SHA384: Final = "SHA384"
PCR_SIZE: Final = 48  # SHA-384 registers ("digest" is always SHA384)
MAX_PCRS: Final = 32
MAX_MODULE_ID_SIZE: Final = 256
MAX_CERT_SIZE: Final = 1024  # `cert = bytes .size (1..1024)`
MAX_CABUNDLE_LEN: Final = 16  # the spec bounds only each entry; real bundles hold 4
MAX_PUBLIC_KEY_SIZE: Final = 1024
MAX_USER_DATA_SIZE: Final = 512
MAX_NONCE_SIZE: Final = 512
# NSM field order (aws-nitro-enclaves-nsm-api `AttestationDoc`); also the order to_bytes emits.
MANDATORY_FIELDS: Final = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
OPTIONAL_FIELDS: Final = ("public_key", "user_data", "nonce")

_MAX_DEPTH: Final = 4  # COSE array -> payload map -> pcrs map / cabundle array -> leaf values


def _fail(msg: str) -> EvidenceFormatError:
    return EvidenceFormatError(f"nitro: {msg}")


def _head(data: bytes, pos: int) -> tuple[int, int, int]:
    """Decode one CBOR head (RFC 8949 section 3): (major type, argument, next position)."""
    if pos >= len(data):
        raise _fail("truncated CBOR")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if info < 24:
        return major, info, pos
    if info > 27:
        # 28..30 reserved; 31 = indefinite length or "break": never used by the NSM.
        raise _fail("indefinite-length or reserved CBOR encoding")
    size = 1 << (info - 24)
    if pos + size > len(data):
        raise _fail("truncated CBOR")
    arg = int.from_bytes(data[pos : pos + size], "big")
    # Preferred (shortest) serialisation, RFC 8949 section 4.2.1: one byte string, one reading.
    if (info == 24 and arg < 24) or (info > 24 and arg < (1 << (8 * (size // 2)))):
        raise _fail("non-minimal CBOR integer encoding")
    return major, arg, pos + size


def _scan(data: bytes, pos: int, depth: int) -> int:
    """Check one well-formed, restricted CBOR item starting at ``pos``; return where it ends."""
    if depth > _MAX_DEPTH:
        raise _fail("CBOR nesting too deep")
    major, arg, pos = _head(data, pos)
    if major in (0, 1):
        return pos
    if major in (2, 3):
        if arg > len(data) - pos:
            raise _fail("truncated CBOR string")
        return pos + arg
    if major == 4:
        if arg > len(data) - pos:  # every element takes at least one byte
            raise _fail("truncated CBOR array")
        for _ in range(arg):
            pos = _scan(data, pos, depth + 1)
        return pos
    if major == 5:
        if 2 * arg > len(data) - pos:
            raise _fail("truncated CBOR map")
        keys: set[bytes] = set()
        for _ in range(arg):
            start = pos
            pos = _scan(data, pos, depth + 1)
            key = data[start:pos]
            if key in keys:
                raise _fail("duplicate CBOR map key")
            keys.add(key)
            pos = _scan(data, pos, depth + 1)
        return pos
    if major == 7 and arg == 22 and data[pos - 1] == 0xF6:
        return pos  # null, used by the NSM for absent optional fields
    # Tags (6) and every other simple value or float (7) are refused.
    raise _fail(f"unexpected CBOR item (major type {major})")


def _decode(data: bytes) -> Any:
    """Scan then decode exactly one CBOR item that fills ``data``."""
    end = _scan(data, 0, 0)
    if end != len(data):
        raise _fail("trailing bytes after CBOR item")
    try:
        return cbor2.loads(data)
    except (cbor2.CBORError, ValueError, OverflowError, RecursionError) as exc:
        raise _fail(f"CBOR decode failed: {exc}") from exc


def _bstr(value: Any, name: str, lo: int, hi: int) -> bytes:
    if not isinstance(value, bytes):
        raise _fail(f"{name} must be a byte string")
    if not lo <= len(value) <= hi:
        raise _fail(f"{name} has {len(value)} bytes, want {lo}..{hi}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class AttestationDocument:
    """The signed payload (attestation_process.md section 2.2).

    Attributes:
        module_id: issuing Nitro hypervisor module id (non-empty text).
        digest: PCR digest algorithm, always "SHA384".
        timestamp: creation time, milliseconds since the UNIX epoch (UTC), > 0.
        pcrs: locked PCRs, index (0..31) -> 48-byte value; 1..32 entries.
        certificate: DER of the leaf (signing) certificate, 1..1024 bytes.
        cabundle: DER certificates, root first then intermediates (section 3.2.3), each 1..1024 bytes.
        public_key: optional enclave public key, 1..1024 bytes (None when absent or null).
        user_data: optional signed user data, 0..512 bytes.
        nonce: optional consumer nonce, 0..512 bytes.
    """

    module_id: str
    digest: str
    timestamp: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None = None
    user_data: bytes | None = None
    nonce: bytes | None = None

    @classmethod
    def from_bytes(cls, data: bytes) -> AttestationDocument:
        """Parse and check the CBOR payload (section 3.2.2).

        Raises:
            EvidenceFormatError: malformed CBOR, unknown or missing field, wrong type or size.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("AttestationDocument.from_bytes takes bytes")
        data = bytes(data)
        if not 1 <= len(data) <= MAX_PAYLOAD_SIZE:
            raise _fail(f"payload has {len(data)} bytes, want 1..{MAX_PAYLOAD_SIZE}")
        obj = _decode(data)
        if not isinstance(obj, dict):
            raise _fail("payload must be a CBOR map")
        unknown = [k for k in obj if k not in MANDATORY_FIELDS + OPTIONAL_FIELDS]
        if unknown:
            raise _fail(f"unknown payload field(s) {sorted(map(repr, unknown))}")
        for name in MANDATORY_FIELDS:
            if obj.get(name) is None:  # section 3.2.2.1: mandatory and never null
                raise _fail(f"missing mandatory field {name!r}")

        module_id = obj["module_id"]
        if not isinstance(module_id, str) or not 1 <= len(module_id) <= MAX_MODULE_ID_SIZE:
            raise _fail("module_id must be non-empty text")
        if obj["digest"] != DIGEST_SHA384:
            raise _fail(f"digest must be {DIGEST_SHA384!r}")
        timestamp = obj["timestamp"]
        if type(timestamp) is not int or not 0 < timestamp < (1 << 64):
            raise _fail("timestamp must be a positive 64-bit integer")
        raw_pcrs = obj["pcrs"]
        if not isinstance(raw_pcrs, dict) or not 1 <= len(raw_pcrs) <= MAX_PCRS:
            raise _fail(f"pcrs must be a map of 1..{MAX_PCRS} entries")
        pcrs: dict[int, bytes] = {}
        for index, value in raw_pcrs.items():
            if type(index) is not int or not 0 <= index < MAX_PCRS:
                raise _fail("PCR index must be an integer in 0..31")
            pcrs[index] = _bstr(value, f"PCR{index}", PCR_SIZE, PCR_SIZE)
        certificate = _bstr(obj["certificate"], "certificate", 1, MAX_CERT_SIZE)
        bundle = obj["cabundle"]
        if not isinstance(bundle, list) or not 1 <= len(bundle) <= MAX_CABUNDLE_LEN:
            raise _fail(f"cabundle must be an array of 1..{MAX_CABUNDLE_LEN} certificates")
        cabundle = tuple(_bstr(c, "cabundle entry", 1, MAX_CERT_SIZE) for c in bundle)

        def optional(name: str, lo: int, hi: int) -> bytes | None:
            value = obj.get(name)
            return None if value is None else _bstr(value, name, lo, hi)

        return cls(
            module_id=module_id,
            digest=DIGEST_SHA384,
            timestamp=timestamp,
            pcrs=dict(sorted(pcrs.items())),
            certificate=certificate,
            cabundle=cabundle,
            public_key=optional("public_key", 1, MAX_PUBLIC_KEY_SIZE),
            user_data=optional("user_data", 0, MAX_USER_DATA_SIZE),
            nonce=optional("nonce", 0, MAX_NONCE_SIZE),
        )

    def to_bytes(self) -> bytes:
        """CBOR in the NSM's field order; absent optional fields are encoded as null, as the NSM does."""
        return cbor2.dumps(
            {
                "module_id": self.module_id,
                "digest": self.digest,
                "timestamp": self.timestamp,
                "pcrs": dict(self.pcrs),
                "certificate": self.certificate,
                "cabundle": list(self.cabundle),
                "public_key": self.public_key,
                "user_data": self.user_data,
                "nonce": self.nonce,
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NitroDocument:
    """A signed attestation document: COSE_Sign1 (RFC 8152 section 4.2) around the payload.

    Attributes:
        protected: serialised protected header, exactly ``{1: -35}`` (alg ES384).
        payload: the signed payload bytes, exactly as received (the signature covers these).
        signature: ES384 signature, r || s (96 bytes).
        document: ``payload`` parsed.
        tagged: whether the structure carried CBOR tag 18.
    """

    protected: bytes
    payload: bytes
    signature: bytes
    document: AttestationDocument
    tagged: bool = False

    @classmethod
    def from_bytes(cls, data: bytes) -> NitroDocument:
        """Parse raw COSE_Sign1 bytes (use :func:`parse_document` for base64 input).

        Raises:
            EvidenceFormatError: anything but a well-formed ES384 COSE_Sign1 with a valid payload.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("NitroDocument.from_bytes takes bytes")
        data = bytes(data)
        if len(data) > MAX_DOCUMENT_SIZE:
            raise _fail(f"document has {len(data)} bytes, more than {MAX_DOCUMENT_SIZE}")
        tagged = data[:1] == bytes([0xC0 | COSE_SIGN1_TAG])
        body = data[1:] if tagged else data
        obj = _decode(body)
        if not isinstance(obj, list) or len(obj) != 4:
            raise _fail("COSE_Sign1 must be an array of 4 items")
        protected, unprotected, payload, signature = obj
        protected = _bstr(protected, "protected header", 1, MAX_PROTECTED_SIZE)
        if _decode(protected) != {COSE_HEADER_ALG: COSE_ALG_ES384}:
            raise _fail("protected header must be exactly {1: -35} (alg ES384)")
        if unprotected != {}:
            # The NSM sends an empty map; it is not signed, so anything in it is refused.
            raise _fail("unprotected header must be empty")
        payload = _bstr(payload, "payload", 1, MAX_PAYLOAD_SIZE)
        signature = _bstr(signature, "signature", SIGNATURE_SIZE, SIGNATURE_SIZE)
        return cls(
            protected=protected,
            payload=payload,
            signature=signature,
            document=AttestationDocument.from_bytes(payload),
            tagged=tagged,
        )

    def to_bytes(self) -> bytes:
        """Serialise the COSE_Sign1 structure (tag 18 when :attr:`tagged`)."""
        body = cbor2.dumps([self.protected, {}, self.payload, self.signature])
        return (bytes([0xC0 | COSE_SIGN1_TAG]) + body) if self.tagged else body

    def signed_bytes(self) -> bytes:
        """The ToBeSigned bytes: Sig_structure ["Signature1", protected, external_aad=b"", payload]
        (RFC 8152 section 4.4)."""
        return cbor2.dumps([SIG_STRUCTURE_CONTEXT, self.protected, b"", self.payload])


def decode_evidence(evidence: bytes) -> bytes:
    """Return raw COSE bytes from raw or base64 (standard or URL-safe, whitespace allowed) input.

    Raw COSE_Sign1 starts with 0x84 (array of 4) or 0xD2 (tag 18); neither is a base64 character,
    so the two forms cannot be confused.

    Raises:
        EvidenceFormatError: empty, oversized, or neither raw CBOR nor valid base64.
    """
    if not isinstance(evidence, bytes | bytearray | memoryview):
        raise TypeError("Nitro evidence must be bytes (raw COSE_Sign1 or its base64 text)")
    evidence = bytes(evidence)
    if not evidence:
        raise _fail("empty evidence")
    if evidence[0] in (0x84, 0xC0 | COSE_SIGN1_TAG):
        return evidence
    if len(evidence) > MAX_BASE64_SIZE:
        raise _fail(f"base64 evidence has {len(evidence)} bytes, more than {MAX_BASE64_SIZE}")
    text = b"".join(evidence.split())
    if b"-" in text or b"_" in text:
        text = text.replace(b"-", b"+").replace(b"_", b"/")
    text += b"=" * (-len(text) % 4) if not text.endswith(b"=") else b""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _fail("evidence is neither a COSE_Sign1 nor base64") from exc
    if not raw or raw[0] not in (0x84, 0xC0 | COSE_SIGN1_TAG):
        raise _fail("decoded evidence is not a COSE_Sign1")
    return raw


def parse_document(evidence: bytes) -> NitroDocument:
    """Parse a Nitro attestation document given raw or as base64 text.

    Raises:
        EvidenceFormatError: the bytes are not a well-formed document.
    """
    return NitroDocument.from_bytes(decode_evidence(evidence))
