"""NVIDIA reference integrity manifests (RIMs): ISO/IEC 19770-2 SWID tags signed with XMLDSig.

A RIM lists, per measurement index, whether it is ``active`` and its acceptable values
(``Hash0``..``HashN-1`` for ``alternatives`` = N). RIM index ``i`` corresponds to SPDM measurement
block index ``i + 1`` (nvtrust ``compare_measurements``). There is a RIM per driver version and per
VBIOS version; ``colloquialVersion`` names the version it describes.

    >>> rim = parse_rim(open("Driver.swidtag", "rb").read())  # doctest: +SKIP
    >>> rim.version, len(rim.measurements)  # doctest: +SKIP
    ('545.00', 64)

Safety: the XML is parsed by expat with DTDs refused outright (no DOCTYPE, no entities, so no
external entity or expansion attacks), bounded in size; the same tree that the signature covers is
the one the measurements are read from (no signature-wrapping gap).

Signature (:func:`verify_rim_signature`): XMLDSig enveloped signature, ECDSA-SHA384, C14N 1.1,
``Reference URI=""``, certificate chain in ``KeyInfo`` to an allow-listed root (production: the
NVIDIA CoRIM signing Root CA). The canonicaliser here implements inclusive C14N 1.1 for documents
without comments, processing instructions, DTDs or ``xml:`` attributes, and refuses anything else;
that is what NVIDIA's RIMs contain.

Not checked here: RIM revocation (NVIDIA's OCSP for RIM certificates needs the network).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final
from xml.parsers import expat

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ray_confidential.attestation.trust import TrustConfig, fingerprint
from ray_confidential.attestation.x509chain import (
    check_signed_by,
    is_ca,
    not_valid_error,
    require_aware,
    touch,
    valid_at,
)
from ray_confidential.errors import AttestationError, EvidenceFormatError

MAX_RIM_SIZE: Final = 256 * 1024
MAX_DEPTH: Final = 16
MAX_ALTERNATIVES: Final = 16
NS_SWID: Final = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
NS_DSIG: Final = "http://www.w3.org/2000/09/xmldsig#"
NS_HASH_SHA384: Final = "http://www.w3.org/2001/04/xmlenc#sha384"
C14N11: Final = "http://www.w3.org/2006/12/xml-c14n11"
ENVELOPED: Final = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
ECDSA_SHA384: Final = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha384"
DIGEST_SHA384: Final = "http://www.w3.org/2001/04/xmldsig-more#sha384"


_RIM: Final = "nvidia RIM"


def _fail(msg: str) -> EvidenceFormatError:
    return EvidenceFormatError(f"nvidia RIM: {msg}")


@dataclass(slots=True)
class _Node:
    """An element as written: qualified name, attributes in document order, children (nodes or text)."""

    qname: str
    attrs: list[tuple[str, str]]
    children: list[_Node | str] = field(default_factory=list)
    parent: _Node | None = None

    def ns_decls(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in self.attrs:
            if name == "xmlns":
                out[""] = value
            elif name.startswith("xmlns:"):
                out[name[6:]] = value
        return out

    def in_scope(self) -> dict[str, str]:
        chain: list[_Node] = []
        node: _Node | None = self
        while node is not None:
            chain.append(node)
            node = node.parent
        scope: dict[str, str] = {}
        for n in reversed(chain):
            scope.update(n.ns_decls())
        return scope

    def resolve(self, qname: str, *, attribute: bool = False) -> tuple[str, str]:
        """(namespace URI, local name); unprefixed attributes have no namespace."""
        prefix, _, local = qname.rpartition(":")
        if qname == "xmlns" or prefix == "xmlns":
            return "http://www.w3.org/2000/xmlns/", local
        if not prefix and attribute:
            return "", local
        uri = self.in_scope().get(prefix, "")
        if prefix and not uri:
            raise _fail(f"undeclared namespace prefix {prefix!r}")
        return uri, local

    def elements(self) -> list[_Node]:
        return [c for c in self.children if isinstance(c, _Node)]

    def find(self, uri: str, local: str) -> list[_Node]:
        return [c for c in self.elements() if c.resolve(c.qname) == (uri, local)]

    def text(self) -> str:
        return "".join(c for c in self.children if isinstance(c, str))


def _parse_xml(data: bytes) -> _Node:
    """Parse with expat (no namespace processing, so prefixes survive for C14N); refuse DTDs."""
    if not isinstance(data, bytes | bytearray) or len(data) > MAX_RIM_SIZE:
        raise _fail(f"RIM must be bytes of at most {MAX_RIM_SIZE}")
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    stack: list[_Node] = []
    root: list[_Node] = []

    def refuse(*_: object) -> None:
        raise _fail("DTDs, entities, comments and processing instructions are not allowed")

    def start(name: str, attrs: list[str]) -> None:
        if len(stack) >= MAX_DEPTH:
            raise _fail("XML nested too deep")
        pairs = list(zip(attrs[::2], attrs[1::2], strict=True))
        if any(n.startswith("xml:") for n, _ in pairs):
            raise _fail("xml: attributes are not supported")
        node = _Node(name, pairs, parent=stack[-1] if stack else None)
        if stack:
            stack[-1].children.append(node)
        elif root:
            raise _fail("more than one document element")
        else:
            root.append(node)
        stack.append(node)

    def end(_: str) -> None:
        stack.pop()

    def chars(text: str) -> None:
        if stack:
            node = stack[-1]
            if node.children and isinstance(node.children[-1], str):
                node.children[-1] += text
            else:
                node.children.append(text)

    parser.ordered_attributes = True
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.CommentHandler = refuse
    parser.ProcessingInstructionHandler = refuse
    parser.ExternalEntityRefHandler = refuse  # type: ignore[assignment]
    try:
        parser.Parse(bytes(data), True)
    except expat.ExpatError as exc:
        raise _fail(f"malformed XML: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, EvidenceFormatError):
            raise
        raise _fail(f"malformed XML: {exc}") from exc
    if not root:
        raise _fail("no document element")
    return root[0]


# ---------------------------------------------------------------- C14N 1.1 (inclusive, restricted)


def _esc_text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#xD;")


def _esc_attr(s: str) -> str:
    return (
        s.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace('"', "&quot;")
        .replace("\t", "&#x9;")
        .replace("\n", "&#xA;")
        .replace("\r", "&#xD;")
    )


def _c14n(node: _Node, rendered: dict[str, str], skip: _Node | None, out: list[str]) -> None:
    """Canonical XML 1.1 (section 2.3), inclusive, of ``node``'s subtree; ``rendered`` holds the
    namespace declarations already in effect in the output; ``skip`` is the enveloped signature."""
    scope = node.in_scope()
    decls = {
        p: u
        for p, u in scope.items()
        if rendered.get(p) != u and not (p == "" and u == "" and "" not in rendered)
    }
    # Namespace nodes first, sorted by prefix (default first), then attributes by (URI, local name).
    parts = [f' xmlns="{_esc_attr(decls[""])}"'] if "" in decls else []
    parts += [f' xmlns:{p}="{_esc_attr(decls[p])}"' for p in sorted(decls) if p]
    attrs = [
        (node.resolve(n, attribute=True), n, v)
        for n, v in node.attrs
        if n != "xmlns" and not n.startswith("xmlns:")
    ]
    parts += [f' {n}="{_esc_attr(v)}"' for _, n, v in sorted(attrs, key=lambda a: a[0])]
    out.append(f"<{node.qname}{''.join(parts)}>")
    now_rendered = {**rendered, **decls}
    for child in node.children:
        if isinstance(child, str):
            out.append(_esc_text(child))
        elif child is not skip:
            _c14n(child, now_rendered, skip, out)
    out.append(f"</{node.qname}>")


def canonicalize(node: _Node, *, skip: _Node | None = None) -> bytes:
    """Inclusive C14N 1.1 of the subtree at ``node`` (its in-scope namespaces rendered on it)."""
    out: list[str] = []
    _c14n(node, {}, skip, out)
    return "".join(out).encode("utf-8")


# ---------------------------------------------------------------- RIM records


@dataclass(frozen=True, slots=True, kw_only=True)
class RIMMeasurement:
    """One ``Resource type="Measurement"``: RIM ``index`` (SPDM index - 1), ``active``, accepted values."""

    index: int
    active: bool
    values: tuple[bytes, ...]
    name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReferenceManifest:
    """A parsed RIM.

    Attributes:
        tag_id: SWID ``tagId``.
        product: ``Meta/@product`` (e.g. "GH100").
        version: ``Meta/@colloquialVersion``: driver version ("545.00") or VBIOS ("96.00.5E.00.01").
        measurements: ``Measurement`` resources by RIM index.
        raw: the XML exactly as given (to verify its signature later).
    """

    tag_id: str
    product: str
    version: str
    measurements: tuple[RIMMeasurement, ...]
    raw: bytes = field(repr=False)

    def matches_version(self, version: str | None) -> bool:
        return version is not None and self.version.lower() == version.lower()


def _meta_attr(meta: _Node, local: str) -> str:
    return dict(meta.attrs).get(local, "")


def _parse_tree(root: _Node, raw: bytes) -> ReferenceManifest:
    if root.resolve(root.qname) != (NS_SWID, "SoftwareIdentity"):
        raise _fail("document element is not a SWID SoftwareIdentity")
    tag_id = dict(root.attrs).get("tagId", "")
    metas = root.find(NS_SWID, "Meta")
    payloads = root.find(NS_SWID, "Payload")
    if len(metas) != 1 or len(payloads) != 1:
        raise _fail("need exactly one Meta and one Payload")
    version = _meta_attr(metas[0], "colloquialVersion")
    product = _meta_attr(metas[0], "product")
    if not version:
        raise _fail("Meta has no colloquialVersion")
    measurements: list[RIMMeasurement] = []
    seen: set[int] = set()
    for res in payloads[0].find(NS_SWID, "Resource"):
        attrs: dict[tuple[str, str], str] = {res.resolve(n, attribute=True): v for n, v in res.attrs}
        if attrs.get(("", "type")) != "Measurement":
            continue
        try:
            index = int(attrs[("", "index")])
            count = int(attrs[("", "alternatives")])
            active = {"true": True, "false": False}[attrs[("", "active")].lower()]
            values = tuple(bytes.fromhex(attrs[(NS_HASH_SHA384, f"Hash{k}")]) for k in range(count))
        except (KeyError, ValueError) as exc:
            raise _fail(f"malformed Measurement resource: {exc!r}") from exc
        if index in seen or not 0 <= index < 255 or not 1 <= count <= MAX_ALTERNATIVES:
            raise _fail(f"Measurement index {index} repeated or out of range, or bad alternatives")
        if any(len(v) != 48 for v in values):
            raise _fail(f"Measurement {index} values must be SHA-384 digests")
        seen.add(index)
        measurements.append(
            RIMMeasurement(index=index, active=active, values=values, name=attrs.get(("", "name"), ""))
        )
    if not measurements:
        raise _fail("RIM has no Measurement resources")
    return ReferenceManifest(
        tag_id=tag_id, product=product, version=version, measurements=tuple(measurements), raw=bytes(raw)
    )


def parse_rim(data: bytes) -> ReferenceManifest:
    """Parse a RIM SWID tag (the signature is not checked: see :func:`verify_rim_signature`).

    Raises:
        EvidenceFormatError: malformed or unsafe XML, or not a RIM.
    """
    return _parse_tree(_parse_xml(data), data)


_B64_WS = re.compile(r"\s+")


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(_B64_WS.sub("", text), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _fail("bad base64 in signature") from exc


def _one(node: _Node, uri: str, local: str) -> _Node:
    found = node.find(uri, local)
    if len(found) != 1:
        raise _fail(f"need exactly one {local}")
    return found[0]


def _algorithm(node: _Node) -> str:
    return dict(node.attrs).get("Algorithm", "")


def verify_rim_signature(data: bytes, *, trust: TrustConfig, now: datetime) -> ReferenceManifest:
    """Parse a RIM and verify its XMLDSig signature and certificate chain at ``now``.

    Returns:
        The parsed RIM (read from the same tree whose digest was checked).

    Raises:
        EvidenceFormatError: malformed XML, unsupported signature profile.
        AttestationError: digest or signature mismatch, chain not to an allow-listed root, expired.
    """
    require_aware(now)
    root = _parse_xml(data)
    sig = _one(root, NS_DSIG, "Signature")
    signed_info = _one(sig, NS_DSIG, "SignedInfo")
    if _algorithm(_one(signed_info, NS_DSIG, "CanonicalizationMethod")) != C14N11:
        raise _fail("unsupported canonicalization (need C14N 1.1)")
    if _algorithm(_one(signed_info, NS_DSIG, "SignatureMethod")) != ECDSA_SHA384:
        raise _fail("unsupported signature method (need ecdsa-sha384)")
    ref = _one(signed_info, NS_DSIG, "Reference")
    if dict(ref.attrs).get("URI") != "":
        raise _fail('the signature must cover the whole document (Reference URI="")')
    transforms = [_algorithm(t) for t in _one(ref, NS_DSIG, "Transforms").find(NS_DSIG, "Transform")]
    if transforms != [ENVELOPED, C14N11]:
        raise _fail("unsupported transforms (need enveloped-signature, C14N 1.1)")
    if _algorithm(_one(ref, NS_DSIG, "DigestMethod")) != DIGEST_SHA384:
        raise _fail("unsupported digest (need sha384)")
    digest = _b64(_one(ref, NS_DSIG, "DigestValue").text())
    if hashlib.sha384(canonicalize(root, skip=sig)).digest() != digest:
        raise AttestationError("nvidia RIM: document digest does not match its signature")
    # Certificates in KeyInfo, leaf first.
    x509_data = _one(_one(sig, NS_DSIG, "KeyInfo"), NS_DSIG, "X509Data")
    try:
        certs = [
            touch(x509.load_der_x509_certificate(_b64(c.text())))
            for c in x509_data.find(NS_DSIG, "X509Certificate")
        ]
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise _fail("bad certificate in KeyInfo") from exc
    if not 1 <= len(certs) <= 8:
        raise _fail("KeyInfo must hold 1..8 certificates")
    _verify_rim_chain(certs, trust=trust, now=now)
    raw_sig = _b64(_one(sig, NS_DSIG, "SignatureValue").text())
    key = certs[0].public_key()
    if len(raw_sig) != 96 or not isinstance(key, ec.EllipticCurvePublicKey):
        raise AttestationError("nvidia RIM: signature is not a 96-byte ECDSA P-384 signature")
    der = encode_dss_signature(int.from_bytes(raw_sig[:48], "big"), int.from_bytes(raw_sig[48:], "big"))
    try:
        key.verify(der, canonicalize(signed_info), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise AttestationError("nvidia RIM: signature does not verify") from exc
    return _parse_tree(root, data)


def _verify_rim_chain(certs: list[x509.Certificate], *, trust: TrustConfig, now: datetime) -> None:
    chain = list(certs)
    if chain[-1].issuer != chain[-1].subject:
        # KeyInfo may stop below the root; the root must then be a trusted test root (by subject).
        roots = [r for r in trust.test_roots if r.subject == chain[-1].issuer]
        if not roots:
            raise AttestationError("nvidia RIM: certificate chain does not end at a root")
        chain.append(roots[0])
    if not trust.is_allowed_root(chain[-1]):
        raise AttestationError(f"nvidia RIM: root {fingerprint(chain[-1])} is not allow-listed")
    for i, cert in enumerate(chain):
        what = f"certificate {cert.subject.rfc4514_string()}"
        if not valid_at(cert, now):
            raise not_valid_error(cert, now, what=what, label=_RIM)
        issuer = chain[i + 1] if i + 1 < len(chain) else cert
        check_signed_by(cert, issuer, what=what, label=_RIM)
        if i > 0 and not is_ca(cert, label=_RIM):
            raise AttestationError("nvidia RIM: chain certificate is not a CA")
