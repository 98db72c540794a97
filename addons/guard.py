"""Start-up guard: refuse mitmproxy options that would leak the key or expose the proxy."""

from __future__ import annotations

import ipaddress
import logging

from mitmproxy import ctx, exceptions

logger = logging.getLogger(__name__)

#: Boolean mitmproxy options refused when true, with the reason given at start-up.
REFUSED_OPTIONS = {
    "proxy_debug": "it logs raw request bytes, which carry the API key",
    # mitmproxy 12.3's tlsconfig: "Sign certificates with a compromised eMudhra intermediate CA
    # key". The key is public, so anyone can impersonate what such certificates vouch for.
    "emudhra": "it signs certificates with a publicly known, compromised CA key",
    "emudhra_old": "it signs certificates with a publicly known, compromised CA key",
}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP literal or ``localhost``) is a loopback address; ``""`` (every
    interface, mitmproxy's default) is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class OptionGuard:
    """Refuses, at start-up and on any later option change, settings that break the promise.

    Cases: ``proxy_debug`` (mitmproxy then logs raw request bytes, the injected key included);
    ``emudhra`` / ``emudhra_old`` (mitmproxy 12.3: certificates signed with a CA key that is
    public, see :data:`REFUSED_OPTIONS`); a non-loopback ``listen_host`` unless
    ``codex_allow_remote`` is set (then a warning).
    Raising ``OptionsError`` in ``configure`` rolls the update back and, at start-up, makes
    mitmdump exit 1. Also: a ``--set`` naming an option nobody declared, which mitmproxy keeps
    aside forever without a word, is an error at start-up (a typo must not silently drop, say,
    ``codex_dump_dir``).
    """

    def running(self) -> None:
        unknown = sorted(ctx.options.deferred)
        if unknown:
            logger.error("unknown option(s) in --set: %s", ", ".join(unknown))

    def load(self, loader) -> None:
        loader.add_option(
            "codex_allow_remote",
            bool,
            False,
            "Allow listening on a non-loopback address "
            "(anyone who can reach it can spend the key).",
        )

    def configure(self, updated: set[str]) -> None:
        for name, reason in REFUSED_OPTIONS.items():
            if name in updated and getattr(ctx.options, name, False):
                raise exceptions.OptionsError(f"{name} is refused: {reason}")
        if {"listen_host", "codex_allow_remote"} & updated:
            host = ctx.options.listen_host
            if not is_loopback(host):
                if not ctx.options.codex_allow_remote:
                    raise exceptions.OptionsError(
                        f"listen_host {host or '(all interfaces)'!r} is not loopback; "
                        "set codex_allow_remote=true to allow it"
                    )
                logger.warning("listening on non-loopback address %r", host or "*")
