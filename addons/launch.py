"""What every launcher does around mitmproxy's ``mitmdump``: one home for the strict proxy's
launcher (:mod:`addons.cli`) and ``./run.sh gateway serve`` (:mod:`addons.gateway_mode.cli`),
which import down into it. It runs mitmdump in this process (:mod:`addons.mitmdump_main`) or
the ``--workers`` supervisor (:mod:`addons.workers.supervisor`), whose worker processes load
their secret with the loader each launcher names (:attr:`Secret.worker_load`), so the workers
know no mode.

- Argument types shared by the launchers' parsers: :func:`port_number`, :func:`set_spec`,
  :func:`worker_count`.
- :class:`OptionSpecs`: our ``--set name=value`` specs, the user's ``--set`` winning.
- :func:`record_options`: ``--record DIR``'s mitmproxy options.
- :func:`reverse_mode`: the ``--mode reverse:...`` head and the entry script.
- :func:`launch`: the sequence after the flags are checked: harden the process, read the
  secret from stdin into its holder module (:class:`Secret`), then run mitmdump in this
  process, or the ``--workers`` supervisor, and wipe the holder at the end. SIGINT or SIGTERM
  before mitmproxy handles them (while the secret is read, while mitmproxy starts) ends it
  with one line and :func:`interrupted_exit`, not a traceback; once mitmproxy runs, its stop
  is :mod:`addons.clean_stop`'s.
- :func:`run_mitmdump` (from :mod:`addons.mitmdump_main`): mitmproxy's own ``mitmdump`` in
  this process, its exit code.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from addons.hardening import HardeningError
from addons.mitmdump_main import run_mitmdump
from addons.secret_memory import zero
from addons.workers import supervisor

#: Hardening and secret errors at start-up: the reference proxy's exit code (one line on stderr).
EXIT_SECRET = 1
#: The signals that stop a launcher (mitmproxy's own, once it runs).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived before mitmproxy's own handlers were in place; ``signum`` is
    its number. A ``BaseException``, as ``KeyboardInterrupt``: no ``except Exception`` on the
    way catches it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def interrupted_exit(signum: int) -> int:
    """The exit code of a stop by signal ``signum`` before the proxy served: 128 + its number
    (130 for SIGINT, 143 for SIGTERM), as a shell reports a command a signal ended. (A stop by
    signal while serving is mitmproxy's clean exit, 0, as after ``GET /shutdown``.)"""
    return 128 + signum


def port_number(value: str) -> int:
    """``--port``: a TCP port 0-65535 (0: ephemeral). Raises ``argparse.ArgumentTypeError``."""
    try:
        port = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range 0-65535")
    return port


def set_spec(value: str) -> str:
    """``--set``: ``name=value`` with a non-empty name. Raises ``argparse.ArgumentTypeError``."""
    if "=" not in value or not value.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected name=value, got {value!r}")
    return value


def worker_count(value: str) -> int:
    """``--workers``: a whole number >= 1, or ``auto`` (the cores this process may use).

    Raises:
        ValueError: anything else.
    """
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    try:
        count = int(value, 10)
    except ValueError:
        raise ValueError(f"--workers: expected a number or auto, got {value!r}") from None
    if not 1 <= count <= 256:
        raise ValueError("--workers must be between 1 and 256")
    return count


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class OptionSpecs:
    """The ``--set name=value`` specs a launcher hands mitmdump (the strict proxy's and the
    gateway's): :meth:`put` our values, then :meth:`specs` with the user's ``--set``."""

    def __init__(self) -> None:
        self.values: dict[str, list[str]] = {}

    def put(self, name: str, value: Any) -> None:
        """Our value for ``name`` (a list for sequence options; ``None``: leave it unset)."""
        if isinstance(value, list):
            self.values[name] = [_format_value(v) for v in value]
        elif value is not None:
            self.values[name] = [_format_value(value)]

    def specs(self, user_sets: Sequence[str]) -> list[str]:
        """Every ``name=value``. A user's ``--set`` for a name replaces every value we would
        pass for it (mitmproxy refuses two values for one scalar option in a single start-up).
        """
        user: dict[str, list[str]] = {}
        for spec in user_sets:
            name, value = spec.split("=", 1)
            user.setdefault(name, []).append(value)
        values = {**self.values, **user}
        return [f"{name}={value}" for name, vals in values.items() for value in vals]


def record_options(record_dir: str) -> dict[str, str]:
    """The mitmproxy options of ``--record DIR`` (the directory is created, mode 0700): our
    recorder, and mitmproxy's own flow file and HAR in it. Raises ``OSError``."""
    record = os.path.abspath(record_dir)
    os.makedirs(record, mode=0o700, exist_ok=True)
    return {
        "codex_record_dir": record,
        "save_stream_file": os.path.join(record, "flows.mitm"),
        "hardump": os.path.join(record, "session.har"),
    }


def reverse_mode(host: str, port: int, script: str) -> list[str]:
    """The head of mitmdump's arguments: reverse mode to the upstream's origin ``host:port``
    over plain TCP (each flow is routed to the exact URL by a forwarder; a ``reverse:https``
    spec would also open a UDP/HTTP3 listener, MITMPROXY.md), and the entry ``script``."""
    bracketed = f"[{host}]" if ":" in host else host
    return ["--mode", f"reverse:http://{bracketed}:{port}", "-s", script]


@dataclass
class Secret:
    """One mode's secret on its way from stdin to its holder module (and to the workers).

    ``load`` reads stdin into the holder and raises ``ValueError`` whose message is the user's
    one line (``ApiKeyError``, ``UpstreamKeyError``, ``WorkloadIdentityError``). ``take``
    (``--workers`` only) hands back the bytes each worker reads from its pipe and clears the
    holder (the supervisor keeps them, and zeroes them when it returns). ``clear`` wipes the
    holder at exit. ``worker_load`` (``--workers`` only): what a worker process calls with its
    pipe's fd to load those bytes into the same holder there, a module-level function of the
    mode that owns the secret (its module and name go to the worker's argv, see
    ``supervisor.Plan``).
    """

    load: Callable[[], None]
    take: Callable[[], bytearray]
    clear: Callable[[], None]
    worker_load: Callable[[int], None]
    #: Per-worker option changes (the gateway's spool), see ``supervisor.Plan``.
    per_worker: Callable[[int], dict[str, str]] | None = None
    #: Makes the keyless mode's identity feed for the workers, see ``supervisor.Plan``.
    feed: Callable[[], Any] | None = None


def launch(
    secret: Secret,
    args: Callable[[], list[str]],
    workers: int,
    harden: Callable[[], None],
    err: TextIO,
) -> int:
    """Harden, read ``secret``, then run mitmdump with ``args()`` (built only once the secret
    is in) here, or the supervisor of ``workers`` > 1 processes. Returns the exit code:
    :data:`EXIT_SECRET` after ``Error: <message>`` on ``err`` for a hardening or secret
    error (nothing listens), else mitmdump's or the supervisor's. The holder is wiped when
    mitmdump or the supervisor returns. SIGINT/SIGTERM before mitmproxy (or the supervisor)
    takes them over: ``<SIGNAL> received: stopped`` on ``err`` and :func:`interrupted_exit`
    (handlers are set only on the main thread, where signals are delivered)."""
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _interrupt) for s in STOP_SIGNALS} if main else {}
    try:
        return _launch(secret, args, workers, harden, err)
    except (Interrupted, KeyboardInterrupt) as e:
        secret.clear()  # it may have stopped halfway through reading the secret
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        err.write(f"{signal.Signals(signum).name} received: stopped\n")
        return interrupted_exit(signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _launch(
    secret: Secret,
    args: Callable[[], list[str]],
    workers: int,
    harden: Callable[[], None],
    err: TextIO,
) -> int:
    try:
        harden()
    except HardeningError as e:
        err.write(f"Error: {e}\n")
        return EXIT_SECRET
    try:
        secret.load()
    except ValueError as e:
        err.write(f"Error: {e}\n")
        return EXIT_SECRET
    try:
        if workers > 1:
            line = secret.take()
            try:
                plan = supervisor.Plan(workers, args(), line, secret.worker_load)
                if secret.per_worker is not None:
                    plan.per_worker = secret.per_worker
                if secret.feed is not None:
                    plan.feed = secret.feed()
                return supervisor.run(plan)
            finally:
                zero(line)
        return run_mitmdump(args())
    finally:
        secret.clear()
