"""Models per member: the refusal of a model the member may not use, and ``GET /v1/models``.

The rule is :mod:`addons.gateway_mode.model_policy`'s; the member's patterns are its directory
entry's ``models`` (refreshed from the database like its quotas). Three small addons, placed
in the manifest where each must act:

- :class:`ModelsRoute` (before the allowlist) claims ``GET /v1/models`` (any query: Codex asks
  ``?client_version=0.171.0``) so the allowlist lets it on to member auth instead of 403.
- :class:`MemberCatalog` (after member auth) answers it: Codex's catalog format ``{"models":
  [...]}`` with the entries of the pinned Codex's catalog (:func:`addons.codex_models.
  full_catalog`) the member may use; nothing goes upstream.
- :class:`ModelGate` (in ``request``, once the body's model is known, before the quota check)
  refuses a member request for another model: 403 ``model_not_allowed`` naming the model and
  the member's patterns, which :class:`addons.gateway_mode.codex_replies.CodexReplies` turns
  into a 400 for Codex (its turn ends at once and it prints the message). The WebSocket route
  asks :func:`model_refusal` for each ``response.create``.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from mitmproxy import http

from addons.codex_models import full_catalog
from addons.common import ALLOWED, LOCAL_ROUTE, REFUSED, SERVER_NAME, WEBSOCKET, fail_closed
from addons.gateway_mode.core import MEMBER, GatewayCore, gateway_error, refuse, request_info
from addons.gateway_mode.model_policy import (
    allowed,
    allowed_entries,
    parse_patterns,
    refusal_message,
)
from addons.gateway_mode.teams import TEAM

logger = logging.getLogger(__name__)

MODELS_PATH = b"/v1/models"
#: The refusal's error code (a ``refusals`` row of kind ``model``).
CODE = "model_not_allowed"


@cache
def _stored_patterns(text: str | None) -> tuple[str, ...]:
    try:
        return parse_patterns(text)
    except ValueError:
        # Written past the admin commands' check (a hand edit): no model matches, said once.
        logger.error("a member's models setting is not a pattern list: allowing no model")
        return ("",)


def pattern_lists(entry: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """The pattern lists a directory ``entry``'s requests must pass, every non-empty one
    (:func:`addons.gateway_mode.model_policy.allowed`): the member's ``models`` and, for a team
    member, its team's (``team_models``, :data:`addons.gateway_mode.teams.TEAM_MODELS`)."""
    return [_stored_patterns(entry.get("models")), _stored_patterns(entry.get("team_models"))]


def _refused_by(entry: Mapping[str, Any], model: str | None) -> tuple[str | None, tuple[str, ...]]:
    """Which list refuses ``model``: ``(None, member's patterns)`` or ``(team name, team's
    patterns)``; ``(None, ())`` when both allow it."""
    member_patterns, team_patterns = pattern_lists(entry)
    if not allowed(model, member_patterns):
        return None, member_patterns
    if not allowed(model, team_patterns):
        return str(entry.get(TEAM) or "?"), team_patterns
    return None, ()


def allowed_patterns(entry: Mapping[str, Any], model: str | None) -> list[str]:
    """The patterns of the list that refuses ``model`` (the member's, else its team's), for the
    refusal's ``allowed`` field; ``[]`` when ``model`` is allowed."""
    return list(_refused_by(entry, model)[1])


def model_refusal(entry: Mapping[str, Any], model: str | None) -> str | None:
    """The refusal message when ``entry``'s member (or its team) may not use ``model``, else
    ``None``. A team's refusal names the team."""
    team, patterns = _refused_by(entry, model)
    if not patterns:
        return None
    return refusal_message(model, str(entry.get("member")), patterns, team=team)


def catalog_reply(lists: Sequence[Sequence[str]], client_version: str | None) -> http.Response:
    """``GET /v1/models``: ``{"models": [...]}``, the catalog entries ``lists`` allow, whole
    (Codex refuses an entry that lacks a field, and an entry it merges replaces its own).
    A Codex of another version than the catalog's (its ``client_version``) gets an empty list:
    this catalog's entries would replace its own entries for the same slugs."""
    version, entries = full_catalog()
    models = [] if client_version not in (None, version) else list(allowed_entries(entries, *lists))
    return http.Response.make(
        200,
        json.dumps({"models": models}, ensure_ascii=False).encode(),
        {"content-type": "application/json", "server": SERVER_NAME, "cache-control": "no-store"},
    )


def is_models_request(request: http.Request) -> bool:
    """``GET /v1/models`` in origin form, with or without a query."""
    path, _, _ = request.data.path.partition(b"?")
    return (
        request.data.method == b"GET"
        and path == MODELS_PATH
        and not (request.authority and not (request.is_http2 or request.is_http3))
    )


class ModelsRoute:
    """Claims ``GET /v1/models`` (:func:`is_models_request`) for :class:`MemberCatalog`:
    marks it :data:`addons.common.LOCAL_ROUTE`, which the allowlist lets on to member auth
    (placed before it; after the Chat Completions bridge, whose own ``GET /v1/models`` without
    a query, unauthenticated, answers first when ``--chat-bridge`` is on)."""

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if is_models_request(flow.request):
            flow.metadata[LOCAL_ROUTE] = "models"


class MemberCatalog:
    """Answers a claimed ``GET /v1/models`` of an authenticated member (after member auth,
    which answered 401 without a member key) with :func:`catalog_reply` for its patterns.
    Never forwarded: the allowlist's mark is removed as the reply is set."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.error or not flow.live or flow.metadata.get(LOCAL_ROUTE) != "models":
            return
        flow.metadata.pop(ALLOWED, None)
        if flow.response is not None:
            return  # refused (member auth)
        member = flow.metadata.get(MEMBER)
        entry = self.core.directory.by_key_id(member["key_id"]) if member else None
        if entry is None:
            flow.kill()  # fail closed: no member, yet nothing refused it
            return
        query = urllib.parse.parse_qs(flow.request.data.path.partition(b"?")[2].decode("latin-1"))
        version = query.get("client_version", [None])[0]
        flow.metadata[REFUSED] = "local-route"  # answered here; no usage row, no refusal
        flow.response = catalog_reply(pattern_lists(entry), version)


class ModelGate:
    """Refuses, in ``request`` (the body read, nothing sent upstream), a member request whose
    model its patterns do not allow: 403 ``model_not_allowed`` with ``model`` and ``allowed``
    (the patterns) beside the message; Codex gets it as 400 (:mod:`codex_replies`). A Codex
    WebSocket upgrade names no model (its ``response.create`` messages are checked one by one
    by the socket's addon); a Realtime upgrade names its model in the URL and is checked
    here."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or MEMBER not in flow.metadata:
            return
        model = request_info(flow)["model"]
        if model is None and WEBSOCKET in flow.metadata:
            return
        entry = self.core.directory.by_key_id(flow.metadata[MEMBER]["key_id"])
        if entry is None:
            return  # revoked meanwhile: the quota check answers 401
        message = model_refusal(entry, model)
        if message is None:
            return
        self.core.metrics.refused.labels(CODE).inc()
        refuse(
            flow,
            "model-not-allowed",
            gateway_error(
                403,
                CODE,
                message,
                model=model,
                allowed=allowed_patterns(entry, model),
            ),
        )
