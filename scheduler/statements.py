"""The broker's side of the trust registry: routing tokens and revocations -> signed statements.

    issuer = StatementIssuer(signer, deliver=queue.put)   # signer: the broker's statement key
    broker.statement_listener = issuer                    # Broker calls it (kbs/broker.py)

When the broker issues a **routing-scope** token (an executor attested at start or on renewal), it
signs an ``admit`` whose ``exp`` is the token's ``exp`` (expiry follows the routing token). When an
admin revocation covers a routed node (``node`` by id, ``measurement`` or ``tcb`` of its last
routing token), it signs a ``revoke`` for each such node. ``deliver`` gets every statement; how they
reach the registry actor is the deployment's choice (docs/placement.md "Getting statements into the
registry"): the embedded development broker submits them itself; a production broker outside Ray
hands them back to the executor, which relays them (statements are signed: the courier is untrusted).

Pool and region come from the routing token, i.e. from what the executor declared; a node without
one is admitted as :data:`UNSET_LABEL` (no policy that names pools or regions selects it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Final

from scheduler.labels import LABEL_VALUE_RE, NODE_ID_RE, TEE_KINDS
from scheduler.registry import SignedStatement, StatementSigner

log = logging.getLogger(__name__)

UNSET_LABEL: Final = "unset"
"""Pool / region of an admitted node that declared none."""


def _label(value: str) -> str:
    return value if LABEL_VALUE_RE.fullmatch(value or "") else UNSET_LABEL


class StatementIssuer:
    """Turns the broker's routing decisions into registry statements (see the module docstring).

    Args:
        signer: the broker's statement key (never leaves this process).
        deliver: called with every signed statement (must not block for long).
    """

    def __init__(self, signer: StatementSigner, deliver: Callable[[SignedStatement], None]) -> None:
        self.signer = signer
        self._deliver = deliver
        self._routed: dict[str, tuple[str, str]] = {}  # node id -> (measurement, tcb) of its last token
        self._lock = threading.Lock()

    def routing_granted(self, claims: Any) -> None:
        """An admit for the node of a freshly issued routing token (``TokenClaims``)."""
        node_id, tee = str(claims.node_id), str(claims.tee)
        if not NODE_ID_RE.fullmatch(node_id) or tee not in TEE_KINDS:
            log.info("no registry statement for node %r (%s): not a Ray node id or TEE kind", node_id, tee)
            return
        claim_values: dict[str, str | int | bool] = {"env": str(claims.env), "tcb": str(claims.tcb)[:200]}
        st = self.signer.admit(
            node_id=node_id,
            tee=tee,
            pool=_label(str(claims.pool)),
            region=_label(str(claims.region)),
            measurement=str(claims.measurement),
            claims=claim_values,
            expires_at=int(claims.exp),
        )
        with self._lock:
            self._routed[node_id] = (str(claims.measurement).lower(), str(claims.tcb))
        self._deliver(st)

    def revoked(self, kind: str, value: str, reason: str) -> None:
        """A revoke for every routed node the revocation covers (``node``, ``measurement``, ``tcb``)."""
        with self._lock:
            if kind == "node":
                nodes = [value] if NODE_ID_RE.fullmatch(value) else []
            elif kind == "measurement":
                nodes = [n for n, (m, _) in self._routed.items() if m == value.lower()]
            elif kind == "tcb":
                nodes = [n for n, (_, t) in self._routed.items() if t == value]
            else:
                nodes = []  # bundle / token revocations do not change where code may be routed
            for n in nodes:
                self._routed.pop(n, None)
        for n in nodes:
            self._deliver(self.signer.revoke(node_id=n, reason=(reason or f"{kind} revoked")[:200]))


__all__ = ["UNSET_LABEL", "StatementIssuer"]
