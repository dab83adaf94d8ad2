"""AWS Nitro ``/dev/nsm``: the NSM ``Attestation`` request over the raw ioctl.

    document = collect_nsm(user_data=binding.report_data(), nonce=binding.nonce)   # doctest: +SKIP

Driver ABI (Linux ``include/uapi/linux/nsm.h``)::

    struct nsm_iovec { __u64 addr; __u64 len; };
    struct nsm_raw { struct nsm_iovec request; struct nsm_iovec response; };
    #define NSM_IOCTL_RAW _IOWR(0x0A, 0x0, struct nsm_raw)        // request <= 0x1000, response <= 0x3000

Messages are CBOR (aws-nitro-enclaves-nsm-api ``src/api``, serde's externally tagged enums):
request ``{"Attestation": {"user_data": bytes|null, "nonce": bytes|null, "public_key": bytes|null}}``,
response ``{"Attestation": {"document": bytes}}`` or ``{"Error": "<code>"}``. The driver writes the
response length back into ``response.len``.

What it does NOT do: verify the document, or use other NSM requests (PCR extension, random).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from pathlib import Path
from typing import Any, Final

from ray_confidential.attestation.collect import CollectionError
from ray_confidential.attestation.collect.sev_guest import Ioctl, _iowr
from ray_confidential.attestation.evidence import Evidence

NSM_PATH: Final = Path("/dev/nsm")
NSM_REQUEST_MAX_SIZE: Final = 0x1000
NSM_RESPONSE_MAX_SIZE: Final = 0x3000
MAX_USER_DATA: Final = 512
"""NSM limit on user_data and nonce; public_key is at most 1024 bytes."""


class NSMIovec(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class NSMRaw(ctypes.Structure):
    _fields_ = [("request", NSMIovec), ("response", NSMIovec)]


NSM_IOCTL_RAW: Final = _iowr(0x0A, 0x0, ctypes.sizeof(NSMRaw))
"""0xC0200A00."""


def collect_nsm(
    *,
    user_data: bytes | None,
    nonce: bytes | None,
    public_key: bytes | None = None,
    device: Path = NSM_PATH,
    ioctl: Ioctl = fcntl.ioctl,
) -> bytes:
    """An attestation document (COSE_Sign1) carrying ``user_data``, ``nonce`` and ``public_key``.

    Raises:
        ValueError: a field over the NSM's limit.
        CollectionError: the ioctl failed, or the NSM answered an error or malformed CBOR.
    """
    import cbor2

    for name, value, limit in (("user_data", user_data, MAX_USER_DATA), ("nonce", nonce, MAX_USER_DATA),
                               ("public_key", public_key, 1024)):  # fmt: skip
        if value is not None and len(value) > limit:
            raise ValueError(f"{name} must be at most {limit} bytes, got {len(value)}")
    request = cbor2.dumps({"Attestation": {"user_data": user_data, "nonce": nonce, "public_key": public_key}})
    if len(request) > NSM_REQUEST_MAX_SIZE:  # pragma: no cover - bounded by the limits above
        raise ValueError("NSM request too large")
    req_buf = ctypes.create_string_buffer(request, len(request))
    resp_buf = ctypes.create_string_buffer(NSM_RESPONSE_MAX_SIZE)
    raw = NSMRaw(
        request=NSMIovec(addr=ctypes.addressof(req_buf), len=len(request)),
        response=NSMIovec(addr=ctypes.addressof(resp_buf), len=NSM_RESPONSE_MAX_SIZE),
    )
    fd = os.open(device, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        ioctl(fd, NSM_IOCTL_RAW, raw, True)
    except OSError as exc:
        raise CollectionError(f"NSM ioctl failed: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    size = raw.response.len
    if not 0 < size <= NSM_RESPONSE_MAX_SIZE:
        raise CollectionError(f"NSM response length {size} out of range")
    try:
        response: Any = cbor2.loads(resp_buf.raw[:size])
    except (cbor2.CBORDecodeError, ValueError) as exc:
        raise CollectionError(f"NSM response is not CBOR: {exc}") from None
    if isinstance(response, dict) and "Error" in response:
        raise CollectionError(f"NSM refused the request: {response['Error']}")
    try:
        document = response["Attestation"]["document"]
    except (KeyError, TypeError):
        raise CollectionError("NSM response has no Attestation.document") from None
    if not isinstance(document, bytes) or not document:
        raise CollectionError("NSM Attestation.document is not a byte string")
    return document


def collect_nsm_evidence(report_data: bytes, nonce: bytes, **kw: Any) -> Evidence:
    """The ``nitro`` profile's evidence: ``user_data`` = ``report_data``, ``nonce`` = the challenge."""
    return Evidence(tee="nitro", evidence=collect_nsm(user_data=report_data, nonce=nonce, **kw))


__all__ = ["NSM_IOCTL_RAW", "collect_nsm", "collect_nsm_evidence"]
