"""Listening with ``SO_REUSEPORT``: the kernel spreads connections over the workers.

mitmproxy's ``AsyncioServerInstance.listen`` calls ``asyncio.start_server(handler, host, port)``
with no ``reuse_port`` and no ``sock=`` (MITMPROXY.md), so N processes cannot share a port
through options alone. In worker processes only, :func:`patch_listen` wraps that one method:
for a TCP mode on a fixed port it binds a socket with ``SO_REUSEPORT`` itself and hands it to
``asyncio.start_server(sock=...)``; everything else goes to mitmproxy's own code. The patch is
checked against the mitmproxy minor this project pins (``tests/test_workers.py``).

Why ``SO_REUSEPORT`` rather than one listening socket inherited by every worker: with a shared
socket every worker's event loop wakes for each new connection and one of them wins the
``accept`` (a thundering herd, and uneven: a busy worker's loop accepts in bursts); with
``SO_REUSEPORT`` the kernel hashes each connection to one worker's own accept queue. The cost:
connections still queued in a worker that dies are reset (the client retries; Codex does).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

#: The mitmproxy minor whose ``AsyncioServerInstance.listen`` this wraps.
PATCHED_MINOR = "12.3"


def reuseport_socket(host: str, port: int, listen: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEADDR`` and ``SO_REUSEPORT``
    (``port`` 0: the kernel picks one; read it with ``getsockname``). ``listen``: also listen.

    Raises:
        OSError: when the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says
    # TCP, and accepted sockets inherit it. With proto 0 every small write (an SSE event, a
    # reply head) waited for the peer's delayed ACK: 40 ms per request at one connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host or "0.0.0.0", port))
        if listen:
            sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def patch_listen() -> None:
    """Make mitmproxy's TCP listeners in this process use ``SO_REUSEPORT`` (idempotent).

    Raises:
        RuntimeError: on a mitmproxy whose minor differs from :data:`PATCHED_MINOR`.
    """
    from mitmproxy import version
    from mitmproxy.proxy import mode_servers

    if not version.VERSION.startswith(PATCHED_MINOR + "."):
        raise RuntimeError(
            f"--workers wraps mitmproxy {PATCHED_MINOR}'s listener, not {version.VERSION}'s"
        )
    cls: Any = mode_servers.AsyncioServerInstance
    if getattr(cls.listen, "_codex_reuseport", False):
        return
    original = cls.listen

    async def listen(self: Any, host: str, port: int) -> list[Any]:
        if self.mode.transport_protocol != "tcp" or not port:
            return await original(self, host, port)
        sock = reuseport_socket(host, port, listen=True)
        return [await asyncio.start_server(self.handle_stream, sock=sock, backlog=1024)]

    listen._codex_reuseport = True  # type: ignore[attr-defined]
    cls.listen = listen
