"""SIGINT and SIGTERM stop the proxy with one line, not a traceback.

mitmproxy stops on SIGINT/SIGTERM by ending its event loop (``asyncio.run``), which cancels
every connection still open. On Python 3.12 the stream server's own callback then calls
``exception()`` on the cancelled connection task, and the interpreter printed ``Exception in
callback StreamReaderProtocol.connection_made.<locals>.callback`` with a ``CancelledError``
traceback whenever a stream was in flight (checked on 3.12.1: the strict proxy, the gateway,
``--workers`` and mitmweb alike; Python 3.13's ``asyncio/streams.py`` skips cancelled tasks).

:class:`CleanStop`:

- ``running``: takes over mitmproxy's SIGINT/SIGTERM handlers (``loop.add_signal_handler``,
  as mitmproxy installs them) to log one line, ``SIGINT received: stopping``
  (``codex_stop_message``; the ``--workers`` supervisor and ``./run.sh web`` turn it off in
  the processes they start and say it once themselves), then ask mitmproxy to shut down as
  its own handler does;
- ``done``: closes every client connection still open with the proxy server's own
  ``close_connection`` (the seam the gateway closes a revoked member's socket with) and waits
  for their handlers to finish (at most :data:`CLOSE_WAIT_S`), so nothing is left for
  ``asyncio.run`` to cancel. An exchange in flight ends as a client disconnect (its flow log
  line says so); goes after the addons whose ``done`` records what is still open (the dumps,
  the gateway's ledger), as their rows name the shutdown.

Exit codes are mitmproxy's: 0 after a stop by signal, as after ``GET /shutdown``.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from mitmproxy import ctx

logger = logging.getLogger(__name__)

#: Seconds ``done`` waits for the open connections to close before leaving them to the loop.
CLOSE_WAIT_S = 5.0
#: The signals that stop the proxy (mitmproxy's own).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CleanStop:
    """One line on SIGINT/SIGTERM, open connections closed at shutdown (module docstring)."""

    def __init__(self) -> None:
        self.signalled: str | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "codex_stop_message",
            bool,
            True,
            "Log one line when SIGINT or SIGTERM stops the proxy (the --workers supervisor "
            "and ./run.sh web turn it off in the processes they start and say it once).",
        )

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            try:
                loop.add_signal_handler(sig, self.stop, sig)
            except (NotImplementedError, RuntimeError):  # Windows' loop: mitmproxy's stay
                return

    def stop(self, sig: signal.Signals) -> None:
        """A stop signal arrived: the line (first time only), then mitmproxy's shutdown (or,
        for SIGINT under mitmproxy's console, its exit prompt, as its own handler does)."""
        prompt = getattr(ctx.master, "prompt_for_exit", None)
        if sig == signal.SIGINT and prompt is not None:
            prompt()
            return
        if self.signalled is None:
            self.signalled = sig.name
            if ctx.options.codex_stop_message:
                logger.info("%s received: stopping", sig.name)
        ctx.master.shutdown()

    async def done(self) -> None:
        server = ctx.master.addons.get("proxyserver")
        if server is None or not server.connections:
            return
        handlers = list(server.connections.values())
        logger.debug("closing %d open connection(s)", len(handlers))
        for handler in handlers:
            try:
                handler.close_connection(handler.client)
            except (KeyError, AssertionError):
                pass  # its client transport is already gone
        deadline = asyncio.get_running_loop().time() + CLOSE_WAIT_S
        while server.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
