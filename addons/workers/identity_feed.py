"""One workload identity for N workers (``--github-oidc --workers N``).

The supervisor holds the GitHub request token and does the start-up exchange once (in the
launcher, before any worker exists). :class:`IdentityFeed` then renews on a thread of the
supervisor (:func:`addons.workload_identity.renew_forever`: one exchange per renewal, not N)
and writes each new access token to every worker over the pipe the worker got at spawn, which
stays open for this (the strict proxy's key pipe is closed after one line). A worker is a
*follower* (:func:`follow`): it reads the first token before mitmproxy starts, then a daemon
thread installs each later one. A replacement worker gets the current token at spawn. The
line is ``<ms since issue> <lifetime s> <token>\\n``
(:meth:`~addons.workload_identity.WorkloadIdentity.share_line`); it only ever travels through
these pipes, never argv, the environment or a file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from addons.keyholder import zero as _zero
from addons.workload_identity import (
    IDENTITY,
    MSG_UNREADABLE,
    WorkloadIdentity,
    WorkloadIdentityError,
    renew_forever,
)

logger = logging.getLogger(__name__)

#: Longest line a follower accepts (bytes): a token of OpenAI's is far shorter.
MAX_LINE_BYTES = 32 * 1024


class IdentityFeed:
    """Supervisor side: renews :data:`~addons.workload_identity.IDENTITY` on a thread and
    writes every token to each attached worker pipe. ``repr`` holds no secret."""

    def __init__(self, identity: WorkloadIdentity = IDENTITY) -> None:
        self.identity = identity
        self._pipes: dict[int, int] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<IdentityFeed {len(self._pipes)} workers>"

    def attach(self, index: int, fd: int) -> None:
        """Keep ``fd`` (a pipe's write end, owned from now on) as worker ``index``'s feed,
        closing that worker's previous one, and write the current token to it."""
        with self._lock:
            old = self._pipes.pop(index, None)
            if old is not None:
                os.close(old)
            line = self.identity.share_line()
            try:
                if self._write(fd, line):
                    self._pipes[index] = fd
                else:
                    os.close(fd)
            finally:
                _zero(line)

    def publish(self) -> None:
        """Write the current token to every worker; drop the pipes of workers gone."""
        with self._lock:
            line = self.identity.share_line()
            try:
                for index, fd in list(self._pipes.items()):
                    if not self._write(fd, line):
                        os.close(fd)
                        del self._pipes[index]
            finally:
                _zero(line)

    @staticmethod
    def _write(fd: int, line: bytearray) -> bool:
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(fd, view) :]
            return True
        except OSError:  # the worker died (EPIPE); it will be replaced and attached again
            return False
        finally:
            view.release()

    def start(self) -> None:
        """Start renewing on a daemon thread with its own event loop."""

        async def main() -> None:
            self._task = asyncio.current_task()
            await renew_forever(self.identity, self.publish)

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(main())
            except asyncio.CancelledError:
                pass
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="identity-renewal", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and close every pipe (the workers keep their token until expiry)."""
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            for fd in self._pipes.values():
                os.close(fd)
            self._pipes.clear()


class _LineReader:
    """Lines from a pipe into ``bytearray``s that are zeroed once used (no immutable copies)."""

    def __init__(self, fd: int) -> None:
        self._file = os.fdopen(fd, "rb", buffering=0)
        self._buf = bytearray()
        self._chunk = bytearray(4096)

    def next_line(self) -> bytearray | None:
        """The next line with its ``\\n``, or ``None`` at end of input.

        Raises:
            WorkloadIdentityError: a line longer than :data:`MAX_LINE_BYTES`.
        """
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE_BYTES:
                _zero(self._buf)
                raise WorkloadIdentityError(MSG_UNREADABLE)
            n = self._file.readinto(self._chunk)
            if not n:
                _zero(self._buf)
                self._file.close()
                return None
            self._buf += self._chunk[:n]
            _zero(self._chunk)
        end = self._buf.index(b"\n") + 1
        line = bytearray(self._buf[:end])
        rest = bytearray(self._buf[end:])
        _zero(self._buf)
        self._buf = rest
        return line


def follow(fd: int, identity: WorkloadIdentity = IDENTITY) -> None:
    """Worker side: make ``identity`` a follower, install the first token from ``fd``
    (blocking until the supervisor writes it), then install later ones on a daemon thread.

    Raises:
        WorkloadIdentityError: no token arrived, or a malformed line.
    """
    identity.follow()
    reader = _LineReader(fd)
    line = reader.next_line()
    if line is None:
        raise WorkloadIdentityError(MSG_UNREADABLE)
    identity.install_shared(line)

    def rest() -> None:
        while True:
            try:
                line = reader.next_line()
                if line is None:
                    logger.warning("workload identity feed closed by the supervisor")
                    return
                identity.install_shared(line)
            except WorkloadIdentityError as e:
                logger.error("workload identity feed: %s", e)
                return

    threading.Thread(target=rest, name="identity-feed", daemon=True).start()
