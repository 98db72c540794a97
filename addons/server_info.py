"""``--server-info FILE``: write ``{"port":N,"pid":N}`` once the proxy listens."""

from __future__ import annotations

import json
import logging
import os
import tempfile

from mitmproxy import ctx, exceptions

logger = logging.getLogger(__name__)


def server_info_line(port: int, pid: int) -> str:
    """The reference proxy's server-info line: compact JSON, ``port`` then ``pid``, newline."""
    return json.dumps({"port": port, "pid": pid}, separators=(",", ":")) + "\n"


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so readers see either no file or the whole file.

    Writes a temporary file in the same directory, fsyncs it, then ``os.replace``s it.

    Raises:
        OSError: when the directory is not writable.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".server-info.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class ServerInfo:
    """Writes the server-info file in ``running``, when the real (maybe ephemeral) port is known.

    The port is the first TCP listen address of mitmproxy's proxy server; pid is this process
    (the launcher runs mitmproxy in-process, so it is the pid that serves). The directory must be
    writable: checked in ``configure`` so a bad path stops start-up.
    """

    def __init__(self) -> None:
        self.path = ""

    def load(self, loader) -> None:
        loader.add_option(
            "codex_server_info",
            str,
            "",
            'Write {"port":N,"pid":N} (one line) to this file once listening.',
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_server_info" in updated:
            path = ctx.options.codex_server_info
            if path:
                directory = os.path.dirname(os.path.abspath(path)) or "."
                if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
                    raise exceptions.OptionsError(
                        f"codex_server_info: directory {directory!r} is not writable"
                    )
            self.path = path

    def running(self) -> None:
        if not self.path:
            return
        # An error logged during start-up (bad option, no key) makes mitmproxy exit 1 right
        # after this hook: do not announce a proxy that is about to go away.
        checker = ctx.master.addons.get("errorcheck")
        if checker is not None and getattr(getattr(checker, "logger", None), "has_errored", None):
            logger.info("start-up failed; not writing %s", self.path)
            return
        addrs = ctx.master.addons.get("proxyserver").listen_addrs()
        if not addrs:
            logger.error("server-info: the proxy is not listening; not writing %s", self.path)
            return
        port = addrs[0][1]
        write_atomically(self.path, server_info_line(port, os.getpid()))
        logger.info("server info written to %s", self.path)
