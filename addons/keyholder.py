"""The one place the upstream API key lives in this process.

The key is read once, before mitmproxy starts, by the launcher (``addons.cli``) or by
``--set codex_key_file=...`` when the addons run under plain ``mitmdump -s``. It is kept in a
module-level :class:`ApiKey` holder so that mitmproxy's hot reload of ``-s`` scripts never drops
or re-reads it (scripts are re-imported on change; this module is not).

Nothing here logs, prints or formats the key: the holder's ``repr``/``str`` are redacted and the
error messages never echo the input.
"""

from __future__ import annotations

import logging
from typing import BinaryIO

from addons.secret_memory import (
    BEARER_PREFIX,
    KEY_PATTERN,
    MAX_READ_BYTES,
    REDACTED,
    REFERENCE_BUFFER_BYTES,
    SecretTooLarge,
    mlock,
    read_secret_line,
    zero,
)

logger = logging.getLogger(__name__)

MSG_EMPTY = (
    "API key must be provided via stdin "
    "(e.g. printenv OPENAI_API_KEY | env -u OPENAI_API_KEY codex-responses-api-proxy)"
)
MSG_CHARSET = "API key may only contain ASCII letters, numbers, '-' or '_'"
MSG_TOO_LARGE = f"API key is too large to fit in the {REFERENCE_BUFFER_BYTES}-byte buffer"


class ApiKeyError(ValueError):
    """The key read from stdin breaks one of the reference proxy's rules.

    The message is one of ``MSG_EMPTY``, ``MSG_CHARSET``, ``MSG_TOO_LARGE`` (the reference
    proxy's own wording) and never contains any byte of the input.
    """


def read_api_key(stream: BinaryIO) -> bytearray:
    """Read and validate the API key from a binary stream (normally ``sys.stdin.buffer``).

    Mirrors the reference proxy's ``read_api_key`` rule: read at most 1017 bytes, stopping after
    the first ``\\n``; if 1017 bytes arrive with no newline the key is too large; trailing CR/LF
    are trimmed; the rest must be non-empty and match ``[A-Za-z0-9_-]+`` (so at most 1016
    characters).

    Returns the key as a new ``bytearray`` (the caller owns it and should zero it when done).
    The read buffer is zeroed before returning or raising
    (:func:`addons.secret_memory.read_secret_line`).

    Raises:
        ApiKeyError: with the reference proxy's message for empty, too large or bad input.
    """
    try:
        key = read_secret_line(stream, MAX_READ_BYTES)
    except SecretTooLarge:
        raise ApiKeyError(MSG_TOO_LARGE) from None
    if not key:
        raise ApiKeyError(MSG_EMPTY)
    if KEY_PATTERN.fullmatch(key) is None:
        zero(key)
        raise ApiKeyError(MSG_CHARSET)
    return key


class ApiKey:
    """Holder for the ``Authorization`` header value ``Bearer <key>``.

    ``repr``/``str`` never show the key. The header bytes are kept in one ``bytearray`` that is
    ``mlock``ed where the OS allows; :meth:`header_value` hands out a ``str`` copy for the
    outgoing request (CPython's HTTP stack needs immutable copies; see docs/security.md).
    """

    def __init__(self) -> None:
        self._header: bytearray = bytearray()
        self.locked = False

    def __repr__(self) -> str:
        state = "set" if self._header else "empty"
        return f"<ApiKey {state} {REDACTED}>"

    __str__ = __repr__

    @property
    def is_set(self) -> bool:
        return bool(self._header)

    def set_key(self, key: bytearray) -> None:
        """Take ownership of a validated key (from :func:`read_api_key`) and zero the argument."""
        self.clear()
        header = bytearray(BEARER_PREFIX) + key
        zero(key)
        self._header = header
        self.locked = mlock(self._header)

    def header_value(self) -> str:
        """The ``Authorization`` value ``Bearer <key>``.

        Raises:
            LookupError: when no key has been set (callers fail closed on it).
        """
        if not self._header:
            raise LookupError("no API key loaded")
        return self._header.decode("ascii")

    def secret_line(self) -> bytearray:
        """The key and a newline, as read from stdin: what ``--workers`` hands each worker
        over its pipe (the caller zeroes it).

        Raises:
            LookupError: when no key has been set.
        """
        if not self._header:
            raise LookupError("no API key loaded")
        return bytearray(self._header[len(BEARER_PREFIX) :]) + b"\n"

    def matches(self, value: str) -> bool:
        """Whether ``value`` is exactly the header value we inject (used for redaction)."""
        return bool(self._header) and value.encode("ascii", "replace") == bytes(self._header)

    def clear(self) -> None:
        zero(self._header)
        self._header = bytearray()
        self.locked = False


#: The process-wide key. Imported by the launcher and the key-injecting addon.
API_KEY = ApiKey()


def load_from_stream(stream: BinaryIO) -> None:
    """Read the key from ``stream`` into :data:`API_KEY`.

    Raises:
        ApiKeyError: as :func:`read_api_key`.
    """
    API_KEY.set_key(read_api_key(stream))


def load_from_fd(fd: int) -> None:
    """A ``--workers`` worker's loader: read the key from the pipe ``fd`` the supervisor wrote
    it to into :data:`API_KEY`, then close ``fd``.

    Raises:
        ApiKeyError: as :func:`read_api_key`.
    """
    import os

    with os.fdopen(fd, "rb", buffering=0) as pipe:
        load_from_stream(pipe)


def load_from_path(path: str) -> None:
    """Read the key from a file path (``-`` for stdin) into :data:`API_KEY`; same rules.

    Raises:
        ApiKeyError: as :func:`read_api_key`.
        OSError: when the file cannot be opened.
    """
    if path == "-":
        import sys

        load_from_stream(sys.stdin.buffer)
        return
    with open(path, "rb") as f:
        load_from_stream(f)
