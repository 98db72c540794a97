"""Member authentication by an OIDC identity token (issue 31), called by
:class:`addons.gateway_mode.auth.MemberAuth` for a bearer shaped as a JWT.

The token is checked by :class:`addons.gateway_mode.oidc.OidcVerifier` (the core's); a
token that names a member makes the flow that member's (:data:`MEMBER`, with the identity's
id as ``key_id`` and ``identity``, ``issuer`` and ``subject``: the ledger, ``usage``,
recordings and ``/metrics`` name where the member came from). From there every member rule
applies as for a member key (quotas, concurrency, ledger; a removed identity leaves the
directory and its open sockets are closed as a revoked key's are).

A refused token gets **401** (``invalid_identity_token``, ``error.check`` naming the failed
check) and stays 401 for Codex (:data:`addons.gateway_mode.oidc.IDENTITY_REFUSAL`), so its
command-backed auth fetches a new token and retries; an issuer that cannot be reached gets
503 ``identity_issuer_unavailable`` (Codex retries 5xx). The token is never logged, echoed or
kept in the flow (the ``Authorization`` header is gone before the check).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mitmproxy import http

from addons.gateway_mode.core import MEMBER, GatewayCore, gateway_error, refuse
from addons.gateway_mode.identities import ID_PREFIX
from addons.gateway_mode.lifetimes import expired
from addons.gateway_mode.oidc import IDENTITY_REFUSAL, LEEWAY_S, IdentityRefused
from addons.gateway_mode.teams import team_marker

logger = logging.getLogger(__name__)


#: Why a socket opened with an identity token is closed at its next turn once the token has
#: expired (its ``exp`` past the leeway): the socket was authenticated when it opened.
EXPIRED_ON_SOCKET = (
    f"identity token refused: the token this socket was opened with has expired (leeway "
    f"{LEEWAY_S} s); open a new one with a fresh token"
)


def token_expired(member: dict[str, Any]) -> bool:
    """Whether a flow's :data:`MEMBER` marker came from an identity token that has expired
    since (``expires`` + :data:`addons.gateway_mode.oidc.LEEWAY_S` in the past); always false
    for a member key."""
    expires = member.get("expires")
    return isinstance(expires, int) and time.time() > expires + LEEWAY_S


def revoked_reason(key_id: str, revoked: str = "member key revoked") -> tuple[str, str]:
    """The code and text a socket is closed with once its credential left the directory:
    for an identity (``oi_...``) ``invalid_identity_token`` naming the removed identity (a 400
    on the socket, as a revoked key's: a new token would not help), else ``invalid_member_key``
    with ``revoked``."""
    if key_id.startswith(ID_PREFIX):
        return "invalid_identity_token", f"identity {key_id} removed (or its member gone)"
    return "invalid_member_key", revoked


class IdentityAuth:
    """Checks one identity token for a flow (module docstring). Stateless: the verifier and
    the directory are the core's."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    async def check(self, flow: http.HTTPFlow, token: str) -> None:
        """Mark ``flow`` as the member the token names, or refuse it (401/503)."""
        core = self.core
        try:
            verified = await core.oidc.verify(token, core.refresh_after_miss)
        except IdentityRefused as e:
            core.metrics.refused.labels(
                "invalid_identity_token" if e.status == 401 else "identity_issuer_unavailable"
            ).inc()
            core.metrics.identity_refused.labels(e.check).inc()
            logger.info("identity token refused: %s (%s)", e.check, e)
            if e.status == 401:
                response = gateway_error(
                    401,
                    "invalid_identity_token",
                    f"identity token refused: {e}",
                    {"www-authenticate": 'Bearer realm="codex-gateway", error="invalid_token"'},
                    check=e.check,
                )
            else:
                response = gateway_error(
                    503,
                    "identity_issuer_unavailable",
                    f"identity token not checked: {e}",
                    {"retry-after": "5"},
                    check=e.check,
                )
            refuse(flow, IDENTITY_REFUSAL, response)
            return
        finally:
            del token
        entry = verified.entry
        if expired(entry.get("expires_ms"), int(time.time() * 1000)):
            # The operator's lifetime for the identity (add-identity --expires), refused as an
            # expired member key is: a new token would not help.
            core.refuse_expired(flow, entry["key_id"])
            return
        flow.metadata[MEMBER] = {
            "member": entry["member"],
            "member_id": entry["member_id"],
            "key_id": entry["key_id"],
            "identity": entry["key_id"],
            "issuer": entry["issuer"],
            "subject": verified.subject,
            "expires": verified.expires,
            **team_marker(entry),
        }
        core.metrics.identity_accepted.labels(
            entry["member"], entry["key_id"], entry["issuer"][:200]
        ).inc()
