"""Secrets in memory, one set of rules for every holder: the strict proxy's key
(:mod:`addons.keyholder`), the gateway's upstream key pool (:mod:`addons.gateway_mode.keypool`),
the keyless mode's workload identity (:mod:`addons.workload_identity`), the ``--workers``
supervisor and its identity feed.

- :func:`zero`: overwrite a ``bytearray`` in place once its secret is no longer needed.
- :func:`mlock`: best effort ``mlock(2)`` so a secret's storage is not swapped out.
- :data:`REDACTED`: what every ``repr``, dump, flow file and UI shows in a secret's place.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: Shown in place of a secret (and of every redacted header value).
REDACTED = "[REDACTED]"


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
