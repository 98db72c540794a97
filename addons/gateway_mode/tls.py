"""Listening beyond loopback: TLS (mitmproxy's ``certs``) or an explicit insecure opt-in."""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions, http

from addons.common import fail_closed
from addons.gateway_mode.core import gateway_error, refuse
from addons.guard import is_loopback

logger = logging.getLogger(__name__)


def listen_policy(host: str, certs: list[str], insecure: bool) -> str:
    """``"loopback"``, ``"tls"`` or ``"insecure"`` for a listen host.

    Raises:
        ValueError: a non-loopback host with neither ``certs`` nor ``insecure``.
    """
    if is_loopback(host):
        return "loopback"
    if certs:
        return "tls"
    if insecure:
        return "insecure"
    raise ValueError(
        f"listen_host {host or '(all interfaces)'!r} is not loopback: member keys would cross "
        "the network in clear text. Give the operator's certificate (mitmproxy's certs option, "
        "e.g. --set certs='*=/path/cert.pem') or pass --insecure-listen"
    )


class ListenTls:
    """Refuses to start on a non-loopback address without TLS or ``--insecure-listen``
    (a warning then), and with TLS answers 403 to any plain-HTTP request before it is read
    further (its member key is refused, not used)."""

    def __init__(self) -> None:
        self.policy = "loopback"

    def load(self, loader) -> None:
        loader.add_option(
            "codex_gateway_insecure_listen",
            bool,
            False,
            "Allow a non-loopback listen_host without TLS (member keys in clear text).",
        )

    def configure(self, updated: set[str]) -> None:
        if {"listen_host", "certs", "codex_gateway_insecure_listen"} & updated:
            try:
                self.policy = listen_policy(
                    ctx.options.listen_host,
                    list(ctx.options.certs),
                    ctx.options.codex_gateway_insecure_listen,
                )
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
            if self.policy == "insecure":
                logger.warning(
                    "listening on %r without TLS: member keys cross the network in clear text",
                    ctx.options.listen_host or "*",
                )

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.policy != "tls":
            return
        if not flow.client_conn.tls_established:
            flow.request.headers.pop("authorization", None)
            refuse(
                flow,
                "tls-required",
                gateway_error(403, "tls_required", "this gateway only accepts HTTPS"),
            )
