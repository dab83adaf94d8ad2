"""Ray node-label keys and the label syntax ray_confidential relies on (design.md section 7).

    >>> TEE_LABEL, POOL_LABEL, REGION_LABEL
    ('ray-confidential.io/tee', 'ray-confidential.io/pool', 'ray-confidential.io/region')
    >>> check_label_value("eu-west-1", what="region")
    'eu-west-1'

Labels are routing hints a node declares about itself at ``ray start``: they prove nothing. Placement
intersects them with the trust registry's node ids (``ray.io/node-id``, set by Ray itself), and the
key broker enforces. ``tests/scheduler/test_ray_labels_contract.py`` fails if Ray changes the syntax.
"""

from __future__ import annotations

import re
from typing import Final

TEE_LABEL: Final = "ray-confidential.io/tee"
"""TEE kind of the node's executor: ``sev-snp``, ``tdx``, ``sgx`` or ``nitro``."""
POOL_LABEL: Final = "ray-confidential.io/pool"
"""Name of the node pool (pools YAML) the node was started from."""
REGION_LABEL: Final = "ray-confidential.io/region"
"""Region of the node pool."""
RESERVED_LABEL_PREFIXES: Final = ("ray.io/", "ray-confidential.io/")
"""Label key prefixes a pool's own ``labels`` may not use (Ray's, and ours which render sets)."""

NODE_ID_LABEL: Final = "ray.io/node-id"
"""Ray's built-in label holding the node id (hex); Ray sets it, a node cannot choose another."""
NODE_ID_HEX_LEN: Final = 56
"""Ray node ids are 28 bytes, 56 hex characters."""

LABEL_VALUE_RE: Final = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?")
"""Kubernetes label value syntax, as Ray 2.60 ``ray._private.label_utils.LABEL_REGEX`` checks it."""
NODE_ID_RE: Final = re.compile(r"[0-9a-f]{56}")

TEE_KINDS: Final = ("sev-snp", "tdx", "sgx", "nitro")
"""TEE kinds a node executor can have (the ``tee`` label values)."""


def check_label_value(value: str, *, what: str) -> str:
    """Return ``value`` if it is a valid Ray/Kubernetes label value, else raise ``ValueError``."""
    if not isinstance(value, str) or not LABEL_VALUE_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not a valid label value: 1-63 characters, letters, digits, '-', '_' "
            f"or '.', starting and ending with a letter or digit (e.g. 'eu-west-1')"
        )
    return value


def check_node_id(node_id: str) -> str:
    """Return ``node_id`` if it is a Ray node id (56 lower-case hex characters), else raise."""
    if not isinstance(node_id, str) or not NODE_ID_RE.fullmatch(node_id):
        raise ValueError(f"node id {node_id!r} is not a Ray node id (56 lower-case hex characters)")
    return node_id
