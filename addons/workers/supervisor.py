"""The supervisor of ``--workers N``: one port, N mitmproxy worker processes.

It runs in the launcher's process after the launcher has hardened itself and read the secret
(the strict proxy's key, or the gateway's upstream keys) from stdin — once. For each worker it
makes a pipe, starts ``python -m addons.workers.worker`` with the read end (``pass_fds``),
writes the secret into the write end and closes it: the secret never reaches argv, the
environment or a file. It reserves the port with a bound ``SO_REUSEPORT`` socket (so an
ephemeral port is the same for every worker), waits until every worker has written its own
server-info file, then writes ``{"port": N, "pid": <supervisor pid>}`` to ``--server-info``.

While running: a worker that exits 0 was told ``GET /shutdown`` (mitmdump's clean exit): the
others are stopped and the supervisor exits 0; SIGTERM/SIGINT do the same (one line on stderr,
the workers' own stop line turned off); a worker that dies otherwise is logged and replaced
(at most :data:`MAX_RESTARTS` in :data:`RESTART_WINDOW_S`, then the supervisor gives up with
exit 1). Each worker writes its own residue class of dump sequence numbers (worker i of N:
i+1, i+1+N, ...; a replacement resumes after its predecessor's), so dumps stay paired and
unique; a recording is merged into one at exit (:mod:`.merge`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from addons.secret_memory import zero
from addons.server_info import server_info_line, write_atomically
from addons.workers.reuseport import reuseport_socket
from addons.workers.worker import loader_spec

logger = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 30.0
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


def override_sets(args: list[str], values: dict[str, str]) -> list[str]:
    """mitmdump ``args`` with every ``--set NAME=...`` of ``values`` replaced by its value."""
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--set" and i + 1 < len(args) and args[i + 1].split("=", 1)[0] in values:
            i += 2
            continue
        out.append(args[i])
        i += 1
    for name, value in values.items():
        out += ["--set", f"{name}={value}"]
    return out


def set_value(args: list[str], name: str) -> str | None:
    """The last ``--set NAME=value`` of mitmdump ``args``, or ``None``."""
    found = None
    for i, arg in enumerate(args[:-1]):
        if arg == "--set" and args[i + 1].startswith(name + "="):
            found = args[i + 1].split("=", 1)[1]
    return found


@dataclass
class Plan:
    """What to run: ``count`` workers, the mitmdump ``args`` a single process would get, and
    ``secret`` (the bytes the worker reads as if from stdin; zeroed by :func:`run` when it
    returns)."""

    count: int
    args: list[str]
    secret: bytearray
    #: What each worker calls with its pipe's fd to load ``secret`` (a module-level function
    #: of the mode that owns the secret; named in the worker's argv, see :func:`loader_spec`).
    load: Callable[[int], None]
    #: Per-worker option changes beyond the ones :func:`run` makes (e.g. the gateway's spool).
    per_worker: Callable[[int], dict[str, str]] = field(default=lambda _i: {})
    #: The keyless mode's :class:`~addons.workers.identity_feed.IdentityFeed`: each worker's
    #: pipe stays open and carries every renewed access token.
    feed: Any = None


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    info: str


class Supervisor:
    """Runs a :class:`Plan` (see the module docstring); :meth:`run` returns the exit code."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.host = set_value(plan.args, "listen_host") or "127.0.0.1"
        self.port = int(set_value(plan.args, "listen_port") or 0)
        self.server_info = set_value(plan.args, "codex_server_info")
        self.record_dir = set_value(plan.args, "codex_record_dir")
        self.tmp = tempfile.mkdtemp(prefix="codex-workers-")
        self.workers: list[_Worker] = []
        self.restarts: list[float] = []
        self.stopping = False
        #: The stop signal's name (SIGINT, SIGTERM) once one arrived.
        self.signalled: str | None = None
        self.exit_code = 0

    def worker_args(self, index: int) -> list[str]:
        """mitmdump args of worker ``index``: the shared port, its own server-info file, its
        dump residue class, its own recording files."""
        n = self.plan.count
        values = {
            "listen_port": str(self.port),
            "codex_server_info": os.path.join(self.tmp, f"worker-{index}.json"),
            "codex_dump_seq_start": str(index + 1),
            "codex_dump_seq_step": str(n),
            # The supervisor says "SIGINT received: stopping" once, not each worker.
            "codex_stop_message": "false",
        }
        if self.record_dir:
            values["save_stream_file"] = os.path.join(self.record_dir, f"flows-{index}.mitm")
            values["hardump"] = os.path.join(self.record_dir, f"session-{index}.har")
            values["codex_record_part"] = str(index)
        values.update(self.plan.per_worker(index))
        return override_sets(self.plan.args, values)

    def spawn(self, index: int) -> _Worker:
        info = os.path.join(self.tmp, f"worker-{index}.json")
        try:
            os.unlink(info)
        except FileNotFoundError:
            pass
        read_end, write_end = os.pipe()
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "addons.workers.worker",
                    "--secret-fd",
                    str(read_end),
                    "--secret-loader",
                    loader_spec(self.plan.load),
                    "--",
                    *self.worker_args(index),
                ],
                pass_fds=(read_end,),
                stdin=subprocess.DEVNULL,
                cwd=os.getcwd(),
            )
        finally:
            os.close(read_end)
        if self.plan.feed is not None:
            self.plan.feed.attach(index, write_end)  # writes the current token, keeps the pipe
        else:
            try:
                os.write(write_end, bytes(self.plan.secret))
            finally:
                os.close(write_end)
        logger.info("worker %d started (pid %d)", index, proc.pid)
        return _Worker(index, proc, info)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signalled = self.signalled or signal.Signals(signum).name
        self.stopping = True

    def run(self) -> int:
        reserve = reuseport_socket(self.host, self.port)  # bound, not listening: holds the port
        self.port = reserve.getsockname()[1]
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.plan.count):
                self.workers.append(self.spawn(index))
            if self.plan.feed is not None:
                self.plan.feed.start()
            if not self._wait_started():
                return self.exit_code
            if self.server_info:
                write_atomically(self.server_info, server_info_line(self.port, os.getpid()))
            sys.stderr.write(
                f"{self.plan.count} workers listening on {self.host}:{self.port} "
                f"(supervisor pid {os.getpid()})\n"
            )
            sys.stderr.flush()
            while not self.stopping:
                time.sleep(0.1)
                self._check()
            return self.exit_code
        finally:
            quiet = set_value(self.plan.args, "codex_stop_message") == "false"  # web's inner
            if self.signalled and not quiet:  # the one line of a stop by signal (workers: none)
                sys.stderr.write(f"{self.signalled} received: stopping the workers\n")
                sys.stderr.flush()
            self._stop_all()
            if self.plan.feed is not None:
                self.plan.feed.stop()
            for s, handler in old.items():
                signal.signal(s, handler)
            zero(self.plan.secret)
            reserve.close()
            if self.record_dir:
                from addons.workers.merge import merge_recording

                try:
                    merge_recording(
                        self.record_dir,
                        self.plan.count,
                        set_value(self.plan.args, "codex_rate_card"),
                        set_value(self.plan.args, "codex_dump_dir") or "",
                    )
                except Exception as e:  # a merge problem must not hide the exit code
                    logger.error("recording merge failed: %s", e)
                    sys.stderr.write(f"Error: recording merge failed: {e}\n")
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _wait_started(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and not self.stopping:
            if all(os.path.exists(w.info) for w in self.workers):
                return True
            for w in self.workers:
                code = w.proc.poll()
                if code is not None:
                    sys.stderr.write(f"Error: worker {w.index} exited {code} while starting\n")
                    self.exit_code = code or 1
                    return False
            time.sleep(0.05)
        if not self.stopping:
            sys.stderr.write("Error: workers did not start in time\n")
            self.exit_code = 1
        return False

    def _check(self) -> None:
        for slot, w in enumerate(self.workers):
            code = w.proc.poll()
            if code is None or self.stopping:
                continue
            if code == 0:
                logger.info("worker %d stopped cleanly (GET /shutdown): stopping all", w.index)
                self.stopping = True
                self.exit_code = 0
                return
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S]
            if len(self.restarts) >= MAX_RESTARTS:
                sys.stderr.write(
                    f"Error: workers died {MAX_RESTARTS} times in {RESTART_WINDOW_S:.0f} s; "
                    "giving up\n"
                )
                self.stopping = True
                self.exit_code = 1
                return
            self.restarts.append(now)
            sys.stderr.write(
                f"worker {w.index} (pid {w.proc.pid}) died with {code}; starting a new one\n"
            )
            sys.stderr.flush()
            self.workers[slot] = self.spawn(w.index)

    def _stop_all(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for w in self.workers:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(5)


def run(plan: Plan) -> int:
    """Run ``plan`` to the end; returns the exit code (0 after ``GET /shutdown``/SIGTERM)."""
    return Supervisor(plan).run()
