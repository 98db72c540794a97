"""The upstream key pool: the operator's OpenAI keys, in memory only, with their health.

``serve`` reads the keys from stdin before listening (:func:`read_upstream_keys`), one per
line, ``NAME KEY`` or a bare ``KEY`` (named ``key-1``, ``key-2``, ... by position). Each key
follows the strict proxy's rules (``[A-Za-z0-9_-]``, at most 1016 characters; the reference
proxy's ``read_api_key``). Keys are held like :mod:`addons.keyholder` holds the strict proxy's
one key (an ``mlock``ed ``bytearray`` per key, redacted ``repr``), in this imported module so a
hot reload of ``addons/gateway.py`` keeps them. The database only learns names and health.

Health: ``healthy``; ``cooling`` until a time (after a 429: its ``Retry-After``, else
``cooldown_s``); ``disabled`` until restart (after a 401/403: the key is bad). Picking a key
(:meth:`KeyPool.pick`): the Codex session's previous key while it is healthy (prompt-cache
locality), else the healthy key with the fewest requests in flight (ties: least recently
picked).
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import BinaryIO

from addons.secret_memory import BEARER_PREFIX, KEY_PATTERN, MAX_KEY_CHARS, REDACTED, mlock, zero

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Bytes read from stdin at most (many keys of the largest size, and their names).
MAX_INPUT_BYTES = 1 << 20
#: Sessions remembered for stickiness (least recently used dropped first).
MAX_SESSIONS = 100_000

HEALTHY, COOLING, DISABLED = "healthy", "cooling", "disabled"


class UpstreamKeyError(ValueError):
    """The key list on stdin breaks a rule. The message names the line number and the rule,
    never any byte of the line."""


class UpstreamKey:
    """One upstream key: ``name`` (public), the ``Bearer`` header (private), health."""

    def __init__(self, name: str, key: bytearray) -> None:
        self.name = name
        self._header = bytearray(BEARER_PREFIX) + key
        zero(key)
        self.locked = mlock(self._header)
        self.state = HEALTHY
        self.cooling_until = 0.0
        self.reason = ""
        self.in_flight = 0
        self.picked_at = 0

    def __repr__(self) -> str:
        return f"<UpstreamKey {self.name} {self.state} {REDACTED}>"

    __str__ = __repr__

    def header_value(self) -> str:
        """``Bearer <key>`` for the outgoing request."""
        return self._header.decode("ascii")

    def line(self) -> bytearray:
        """``NAME KEY`` and a newline, as on stdin: what ``--workers`` hands each worker over
        its pipe (the caller zeroes it)."""
        return bytearray(self.name.encode()) + b" " + self._header[len(BEARER_PREFIX) :] + b"\n"

    def matches(self, value: str) -> bool:
        """Whether ``value`` is this key's header value (for redaction)."""
        return value.encode("ascii", "replace") == bytes(self._header)

    def clear(self) -> None:
        zero(self._header)
        self._header = bytearray()


def load_from_fd(fd: int) -> None:
    """A ``--workers`` worker's loader: read the key list from the pipe ``fd`` the supervisor
    wrote it to into :data:`POOL`, then close ``fd``.

    Raises:
        UpstreamKeyError: as :func:`read_upstream_keys`.
    """
    import os

    with os.fdopen(fd, "rb", buffering=0) as pipe:
        POOL.set_keys(read_upstream_keys(pipe))


def read_upstream_keys(stream: BinaryIO) -> list[UpstreamKey]:
    """Read the key list (see the module docstring) until EOF.

    Blank lines and lines starting with ``#`` are skipped; trailing CR/LF and surrounding
    spaces are trimmed. Names must be unique (``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``).

    Raises:
        UpstreamKeyError: no key at all, a bad name or key, a duplicate name, too much input.
    """
    data = bytearray(stream.read(MAX_INPUT_BYTES + 1) or b"")
    try:
        if len(data) > MAX_INPUT_BYTES:
            raise UpstreamKeyError(f"more than {MAX_INPUT_BYTES} bytes of upstream keys on stdin")
        keys: list[UpstreamKey] = []
        names: set[str] = set()
        for number, raw_line in enumerate(data.split(b"\n"), start=1):
            line = bytearray(raw_line.strip(b" \t\r"))
            zero(raw_line)
            if not line or line.startswith(b"#"):
                zero(line)
                continue
            parts = line.split()
            if len(parts) == 1:
                name, key = bytearray(f"key-{len(keys) + 1}".encode()), parts[0]
            elif len(parts) == 2:
                name, key = parts
            else:
                raise UpstreamKeyError(f"stdin line {number}: expected NAME KEY or KEY")
            if NAME_PATTERN.fullmatch(name) is None:
                raise UpstreamKeyError(
                    f"stdin line {number}: a key name may only contain ASCII letters, numbers, "
                    "'.', '-' or '_' (at most 64)"
                )
            if len(key) > MAX_KEY_CHARS:
                raise UpstreamKeyError(
                    f"stdin line {number}: the key is longer than {MAX_KEY_CHARS} characters"
                )
            if KEY_PATTERN.fullmatch(key) is None:
                raise UpstreamKeyError(
                    f"stdin line {number}: API key may only contain ASCII letters, numbers, "
                    "'-' or '_'"
                )
            text_name = name.decode("ascii")
            if text_name in names:
                raise UpstreamKeyError(f"stdin line {number}: duplicate key name {text_name!r}")
            names.add(text_name)
            keys.append(UpstreamKey(text_name, bytearray(key)))
            zero(line)
        if not keys:
            raise UpstreamKeyError(
                "upstream keys must be provided via stdin, one per line (NAME KEY or KEY)"
            )
        return keys
    finally:
        zero(data)


@dataclass
class PoolStatus:
    """Names by state (for ``/health``) and when the first cooling key is back (epoch s)."""

    healthy: list[str] = field(default_factory=list)
    cooling: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    next_ready_s: float | None = None


class KeyPool:
    """The process's upstream keys and their health (thread-safe; hooks call it on the loop,
    the ledger thread reads :meth:`states`)."""

    def __init__(self) -> None:
        self.keys: list[UpstreamKey] = []
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._ticks = itertools.count(1)
        self.changed = threading.Event()

    def __repr__(self) -> str:
        return f"<KeyPool {len(self.keys)} keys {REDACTED}>"

    @property
    def is_set(self) -> bool:
        return bool(self.keys)

    def set_keys(self, keys: list[UpstreamKey]) -> None:
        """Replace the pool (clearing the old keys' memory)."""
        with self._lock:
            for key in self.keys:
                key.clear()
            self.keys = keys
            self._sessions.clear()
        self.changed.set()

    def clear(self) -> None:
        self.set_keys([])

    def _refresh(self, now: float) -> None:
        for key in self.keys:
            if key.state == COOLING and key.cooling_until <= now:
                key.state, key.reason = HEALTHY, ""
                self.changed.set()

    def pick(
        self, session: str | None, exclude: set[str] | frozenset[str] = frozenset()
    ) -> UpstreamKey | None:
        """A healthy key not in ``exclude`` (see the module docstring), its in-flight count
        raised; ``None`` when there is none. Pair with :meth:`done`."""
        now = time.time()
        with self._lock:
            self._refresh(now)
            healthy = [k for k in self.keys if k.state == HEALTHY and k.name not in exclude]
            if not healthy:
                return None
            chosen = None
            if session:
                name = self._sessions.get(session)
                chosen = next((k for k in healthy if k.name == name), None)
            if chosen is None:
                chosen = min(healthy, key=lambda k: (k.in_flight, k.picked_at))
            chosen.in_flight += 1
            chosen.picked_at = next(self._ticks)
            if session:
                self._sessions[session] = chosen.name
                self._sessions.move_to_end(session)
                while len(self._sessions) > MAX_SESSIONS:
                    self._sessions.popitem(last=False)
            return chosen

    def done(self, key: UpstreamKey) -> None:
        """The request that picked ``key`` no longer uses it."""
        with self._lock:
            key.in_flight = max(0, key.in_flight - 1)

    def cool_down(self, key: UpstreamKey, seconds: float, reason: str) -> None:
        """Take ``key`` out of rotation for ``seconds`` (a 429)."""
        with self._lock:
            if key.state == DISABLED:
                return
            key.state = COOLING
            key.cooling_until = max(key.cooling_until, time.time() + seconds)
            key.reason = reason
        logger.warning("upstream key %s cooling down for %.0f s (%s)", key.name, seconds, reason)
        self.changed.set()

    def disable(self, key: UpstreamKey, reason: str) -> None:
        """Take ``key`` out of rotation until restart (a 401/403: the key is refused)."""
        with self._lock:
            key.state = DISABLED
            key.reason = reason
        logger.error("upstream key %s disabled until restart (%s)", key.name, reason)
        self.changed.set()

    def status(self) -> PoolStatus:
        """Names by state, for ``/health`` and the 503's ``Retry-After``."""
        now = time.time()
        with self._lock:
            self._refresh(now)
            status = PoolStatus()
            for key in self.keys:
                getattr(status, key.state).append(key.name)
            cooling = [k.cooling_until for k in self.keys if k.state == COOLING]
            status.next_ready_s = min(cooling) if cooling else None
            return status

    def states(self) -> list[dict[str, object]]:
        """``[{name, state, cooling_until_ms, reason}]`` for the database and ``/metrics``."""
        now = time.time()
        with self._lock:
            self._refresh(now)
            return [
                {
                    "name": k.name,
                    "state": k.state,
                    "cooling_until_ms": int(k.cooling_until * 1000) if k.state == COOLING else None,
                    "reason": k.reason,
                }
                for k in self.keys
            ]

    def redact(self, value: str) -> bool:
        """Whether ``value`` is the header value of any key in the pool."""
        return any(key.matches(value) for key in self.keys)


#: The process-wide pool, filled by the launcher (or ``codex_gateway_keys_file``).
POOL = KeyPool()
