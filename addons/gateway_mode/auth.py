"""Member authentication: ``Authorization: Bearer sk-codex-gw-...`` or 401, nothing forwarded."""

from __future__ import annotations

import logging
import time

from mitmproxy import http

from addons.common import ALLOWED, fail_closed
from addons.gateway_mode.core import MEMBER, GatewayCore, gateway_error, refuse
from addons.gateway_mode.identity_auth import IdentityAuth
from addons.gateway_mode.lifetimes import expired
from addons.gateway_mode.members import bearer_member_key, key_hash
from addons.gateway_mode.oidc import identity_bearer
from addons.gateway_mode.teams import team_marker
from addons.routing import CLIENT_CREDENTIAL_FIELDS, drop_headers

logger = logging.getLogger(__name__)


class MemberAuth:
    """Checks the member key of every allowlisted request in ``requestheaders``.

    Cases: no ``Authorization``, more than one, another scheme or a malformed key → 401
    ``missing_member_key``; a well-formed key that is unknown or revoked → 401
    ``invalid_member_key``; a key past its expiry (judged now) → 401 ``expired_member_key``
    naming when it expired (Codex shows it: :mod:`addons.gateway_mode.codex_replies`).
    Either way the header is removed from the flow first, so the
    member key never reaches the upstream, a dump, a flow file, HAR or mitmweb; logs name
    the key id only. A bearer shaped as a JWT is an identity token instead, checked first
    (:class:`addons.gateway_mode.identity_auth.IdentityAuth`). Accepted flows get
    ``flow.metadata[MEMBER]``; the pool forwarder injects an upstream key only into flows
    with both that and the allowlist mark.
    """

    def __init__(self, core: GatewayCore) -> None:
        self.core = core
        self.identity_auth = IdentityAuth(core)

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if flow.metadata.get(ALLOWED) is not True:
            return
        headers = flow.request.headers
        values = headers.get_all("authorization")
        drop_headers(headers, CLIENT_CREDENTIAL_FIELDS)
        if len(values) == 1 and (identity_token := identity_bearer(values[0])) is not None:
            del values
            await self.identity_auth.check(flow, identity_token)
            return
        token = bearer_member_key(values[0]) if len(values) == 1 else None
        if token is None:
            self.core.metrics.refused.labels("missing_member_key").inc()
            refuse(
                flow,
                "member-auth",
                gateway_error(
                    401,
                    "missing_member_key",
                    "send your gateway member key: Authorization: Bearer sk-codex-gw-...",
                    {"www-authenticate": 'Bearer realm="codex-gateway"'},
                ),
            )
            return
        entry = await self.core.find_member(key_hash(token))
        del token
        if entry is None:
            self.core.metrics.refused.labels("invalid_member_key").inc()
            refuse(
                flow,
                "member-auth",
                gateway_error(
                    401,
                    "invalid_member_key",
                    "unknown or revoked member key",
                    {"www-authenticate": 'Bearer realm="codex-gateway", error="invalid_token"'},
                ),
            )
            return
        if expired(entry.get("expires_ms"), int(time.time() * 1000)):
            self.core.refuse_expired(flow, entry["key_id"])
            return
        flow.metadata[MEMBER] = {
            "member": entry["member"],
            "member_id": entry["member_id"],
            "key_id": entry["key_id"],
            **team_marker(entry),
        }
        self.core.touch(entry["key_id"])
