"""An aiohttp server on 127.0.0.1 in a background thread with its own event loop.

Used by the replay upstream (``addons/replay.py``) and by the tests' and demo's Responses
stand-in (``addons/standin.py``): both must serve HTTP next to code that is not async
(mitmproxy's own loop, pytest), without hand-written HTTP.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web


class ThreadedServer:
    """``start()`` serves ``app`` and returns the port; ``stop()`` cancels in-flight handlers
    and closes every connection. ``backlog`` is large (4096, capped by the kernel's somaxconn):
    a burst of 1 000 connections must not overflow the accept queue (the kernel then resets
    some of them)."""

    def __init__(
        self,
        app: web.Application,
        name: str,
        *,
        port: int = 0,
        ssl_context: Any = None,
        auto_decompress: bool = True,
        backlog: int = 4096,
    ) -> None:
        self.app = app
        self.name = name
        self.port = port
        self.ssl_context = ssl_context
        self.auto_decompress = auto_decompress
        self.backlog = backlog
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30) -> int:
        """Start serving; returns the port. Raises RuntimeError if it does not come up."""
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            runner = web.AppRunner(self.app, access_log=None, auto_decompress=self.auto_decompress)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(
                runner, "127.0.0.1", self.port, ssl_context=self.ssl_context, backlog=self.backlog
            )
            loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
            ready.set()
            loop.run_forever()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"{self.name} did not start")
        return self.port

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None
