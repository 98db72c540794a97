"""Process hardening before the key is read (the reference proxy's "hardening details").

Not an addon: the launcher calls :func:`harden_process` first thing, and the forwarder calls it
before reading ``codex_key_file`` under plain ``mitmdump -s``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


class HardeningError(RuntimeError):
    """A hardening step failed; the launcher refuses to start (as the reference proxy does)."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def set_non_dumpable() -> None:
    """``prctl(PR_SET_DUMPABLE, 0)``: no core dumps, and ``/proc/<pid>/mem``, ``environ`` and
    ptrace become off limits to other processes of the same user (without CAP_SYS_PTRACE).

    Raises:
        HardeningError: when prctl fails or is unavailable (non-Linux).
    """
    if not sys.platform.startswith("linux"):
        raise HardeningError("prctl(PR_SET_DUMPABLE) is only available on Linux")
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise HardeningError(f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(err)}")
    if libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise HardeningError("prctl(PR_SET_DUMPABLE, 0) did not take effect")


def disable_core_dumps() -> None:
    """``RLIMIT_CORE`` = 0 (soft and hard).

    Raises:
        HardeningError: when setrlimit fails.
    """
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as e:
        raise HardeningError(f"setrlimit(RLIMIT_CORE, 0) failed: {e}") from None


def remove_ld_variables(environ: dict[str, str] | os._Environ[str] = os.environ) -> list[str]:
    """Remove every ``LD_*`` variable (``LD_PRELOAD``, ``LD_LIBRARY_PATH``, …) from the
    environment so nothing this process starts inherits them. Returns the names removed."""
    removed = [name for name in list(environ) if name.startswith("LD_")]
    for name in removed:
        del environ[name]
    return removed


def harden_process() -> None:
    """All three steps, in the reference proxy's order. Idempotent.

    Raises:
        HardeningError: naming the step that failed.
    """
    disable_core_dumps()
    set_non_dumpable()
    remove_ld_variables()
