"""Forwarding: route allowlisted flows to the upstream URL (:mod:`addons.routing`) with the
injected key."""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions, http

from addons import keyholder, workload_identity
from addons.common import ALLOWED, KEY_INJECTED, REFUSED, fail_closed, json_response
from addons.hardening import HardeningError, harden_process
from addons.routing import Upstream, UpstreamRoute, route_to_upstream
from addons.secret_memory import REDACTED

logger = logging.getLogger(__name__)


class UpstreamForwarder:
    """Routes allowlisted flows upstream and injects ``Authorization: Bearer <key>`` (or, in
    the keyless mode, the current workload identity access token: :mod:`.workload_identity`;
    while none is valid the flow is answered 503 here and nothing goes upstream).

    In ``requestheaders`` (before a streamed request head could leave, see MITMPROXY.md), for
    flows carrying the allowlist mark only: drop every client ``Authorization`` and
    ``Proxy-Authorization`` and the hop-by-hop headers, set the URL to ``codex_upstream_url``
    (its own query kept), set Host to the upstream's ``host[:port]``, and add exactly one
    ``Authorization`` with the key. Unmarked flows without a response are answered 403 here too
    (fail closed: nothing unmarked is ever forwarded). Once the request has gone
    (``responseheaders``/``error``/``done``) the injected value is replaced by ``[REDACTED]``
    in the flow object, so flow files, HAR, ``flow_detail`` output and mitmweb after that point
    never hold it. The body is never touched, so it goes upstream byte-identical (zstd too).
    """

    def __init__(self) -> None:
        self.route = UpstreamRoute()
        #: Child addons: the owner of ``codex_upstream_url``.
        self.addons = [self.route]
        self._injected: dict[str, http.HTTPFlow] = {}

    @property
    def upstream(self) -> Upstream:
        """Where allowlisted flows go (``codex_upstream_url``, parsed)."""
        return self.route.upstream

    def load(self, loader) -> None:
        loader.add_option(
            "codex_key_file",
            str,
            "",
            "Read the API key from this file ('-' for stdin) when the launcher has not already "
            "loaded one; for plain `mitmdump -s addons/proxy.py`. Same rules as the reference.",
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_key_file" in updated:
            path = ctx.options.codex_key_file
            if path and not keyholder.API_KEY.is_set:
                try:
                    harden_process()
                    keyholder.load_from_path(path)
                except (keyholder.ApiKeyError, OSError, HardeningError) as e:
                    raise exceptions.OptionsError(f"codex_key_file: {e}") from None

    def running(self) -> None:
        # An error logged during start-up makes mitmdump exit 1. Until then any allowlisted
        # flow fails closed (500): header_value() raises without a key.
        if not keyholder.API_KEY.is_set and not workload_identity.IDENTITY.active:
            logger.error(
                "no API key loaded: start through the launcher (key on stdin) or set "
                "codex_key_file (a path, or - for stdin)"
            )

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if flow.metadata.get(ALLOWED) is not True:
            flow.metadata[REFUSED] = "not-marked"
            flow.response = json_response(
                403,
                "forbidden",
                "request was not allowlisted; this proxy only forwards POST /v1/responses",
            )
            return
        identity = workload_identity.IDENTITY
        if identity.active:
            try:
                credential = identity.header_value()
            except workload_identity.IdentityUnavailable:
                flow.metadata[REFUSED] = "workload-identity-unavailable"
                flow.request.stream = False  # a local reply and a streamed request cannot coexist
                flow.response = json_response(
                    503,
                    "workload_identity_unavailable",
                    workload_identity.MSG_UNAVAILABLE,
                    **{"retry-after": "1"},
                )
                return
        else:
            credential = keyholder.API_KEY.header_value()
        request = flow.request
        route_to_upstream(request, self.upstream.url, self.upstream.host_header)
        self._injected[flow.id] = flow
        try:
            request.headers["authorization"] = credential
            flow.metadata[KEY_INJECTED] = True
        except BaseException:
            # Fail closed without leaving the key in the flow object (fail_closed answers 500).
            self._injected.pop(flow.id, None)
            request.headers.pop("authorization", None)
            flow.metadata.pop(KEY_INJECTED, None)
            raise

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.request.stream:
            return
        headers = flow.request.headers
        if flow.metadata.get(KEY_INJECTED) and (
            "transfer-encoding" in headers
            or (flow.request.raw_content and "content-length" not in headers)
        ):
            # The whole body is here: send it with a Content-Length instead of re-chunking.
            # Also when the client sent neither header (HTTP/2 needs none): mitmproxy would send
            # the HTTP/1 head unframed and the upstream would read the body as a request of the
            # client's making (tests/test_exposure.py).
            headers.pop("transfer-encoding", None)
            headers["content-length"] = str(len(flow.request.raw_content or b""))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._scrub(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._scrub(flow)
        if flow.metadata.get(KEY_INJECTED) and flow.error is not None:
            got = (
                f"after {flow.response.status_code} headers" if flow.response else "before a reply"
            )
            logger.warning("upstream exchange failed %s: %s", got, flow.error.msg)

    def response(self, flow: http.HTTPFlow) -> None:
        self._scrub(flow)

    def done(self) -> None:
        for flow in list(self._injected.values()):
            self._scrub(flow)

    def _scrub(self, flow: http.HTTPFlow) -> None:
        if self._injected.pop(flow.id, None) is None:
            return
        headers = flow.request.headers
        value = headers.get("authorization")
        if value is not None and (
            keyholder.API_KEY.matches(value) or workload_identity.IDENTITY.matches(value)
        ):
            headers["authorization"] = REDACTED
