"""Secrets in memory, one set of rules for every holder: the strict proxy's key
(:mod:`addons.keyholder`), the gateway's upstream key pool (:mod:`addons.gateway_mode.keypool`),
the keyless mode's workload identity (:mod:`addons.workload_identity`), the ``--workers``
supervisor and its identity feed.

- :func:`zero`: overwrite a ``bytearray`` in place once its secret is no longer needed.
- :func:`mlock`: best effort ``mlock(2)`` so a secret's storage is not swapped out.
- :data:`REDACTED`: what every ``repr``, dump, flow file and UI shows in a secret's place.
- :func:`read_secret_line`: one line of a secret from a stream, bounded, its buffer zeroed
  (the strict proxy's key and the keyless mode's GitHub request token).
- The reference proxy's key format (:data:`KEY_PATTERN`, :data:`MAX_KEY_CHARS`,
  :data:`BEARER_PREFIX`): the strict proxy's key and every upstream key of the gateway's pool
  follow it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from typing import BinaryIO

#: Shown in place of a secret (and of every redacted header value).
REDACTED = "[REDACTED]"

#: Size of the reference proxy's read buffer (bytes; its ``read_api_key``). ``Bearer `` takes 7
#: of them, so at most 1017 bytes of stdin fit: a 1016-character key plus its newline.
REFERENCE_BUFFER_BYTES = 1024
BEARER_PREFIX = b"Bearer "
MAX_READ_BYTES = REFERENCE_BUFFER_BYTES - len(BEARER_PREFIX)
MAX_KEY_CHARS = MAX_READ_BYTES - 1
#: The characters the reference proxy accepts in a key.
KEY_PATTERN = re.compile(rb"[A-Za-z0-9_-]+")


def zero(buf: bytearray) -> None:
    """Overwrite every byte of ``buf`` with 0, in place (its length is kept)."""
    for i in range(len(buf)):
        buf[i] = 0


def mlock(buf: bytearray) -> bool:
    """Best effort ``mlock(2)`` of a bytearray's storage so it is not swapped out.

    Returns whether the lock succeeded; failure (no libc, RLIMIT_MEMLOCK) is not an error. An
    empty array is not locked (``False``). The lock follows the storage: a bytearray that
    grows may move, so holders lock arrays of their final size.
    """
    if not buf:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
        return libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(len(buf))) == 0
    except (OSError, AttributeError, TypeError, ValueError):
        return False


class SecretTooLarge(ValueError):
    """:func:`read_secret_line` filled its bound without reaching the end of the line. The
    message names no byte of the input; callers raise their own error in its place."""


def read_secret_line(stream: BinaryIO, max_bytes: int) -> bytearray:
    """The first line of a secret from ``stream`` (normally ``sys.stdin.buffer``).

    The reference proxy's reading rule, shared by its ``read_api_key`` and its GitHub request
    token reader: read at most ``max_bytes`` bytes, one at a time, stopping after the first
    ``\\n`` (nothing past it is consumed); if ``max_bytes`` arrive with no ``\\n`` last, the
    secret is too large; trailing CR/LF are trimmed. The read buffer is zeroed before this
    returns or raises.

    Returns:
        The line without its CR/LF, possibly empty: a new ``bytearray`` the caller owns and
        zeroes (its content rules are the caller's).

    Raises:
        SecretTooLarge: ``max_bytes`` read without a newline at the end.
    """
    buf = bytearray()
    try:
        while len(buf) < max_bytes:
            byte = stream.read(1)
            if not byte:
                break
            buf += byte
            if byte == b"\n":
                break
        if len(buf) >= max_bytes and not buf.endswith(b"\n"):
            raise SecretTooLarge(f"{max_bytes} bytes read without a newline")
        end = len(buf)
        while end and buf[end - 1] in (0x0A, 0x0D):
            end -= 1
        return bytearray(buf[:end])
    finally:
        zero(buf)
