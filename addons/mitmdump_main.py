"""mitmproxy's own ``mitmdump``, run in this process: the last step of every launcher
(:func:`addons.launch.launch`) and of each ``--workers`` worker (:mod:`addons.workers.worker`)."""

from __future__ import annotations

from collections.abc import Sequence


def run_mitmdump(args: Sequence[str]) -> int:
    """Run mitmproxy's ``mitmdump`` with ``args`` in this process; its exit code (0 after a
    clean stop, mitmdump's ``SystemExit`` code otherwise)."""
    from mitmproxy.tools.main import mitmdump

    try:
        mitmdump(list(args))
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
