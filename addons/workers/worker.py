"""One worker process: ``python -m addons.workers.worker --secret-fd FD --kind strict|gateway|oidc
-- MITMDUMP_ARGS...`` (started by :mod:`addons.workers.supervisor`, never by hand).

Hardened first (as the single-process launcher is), then it reads the secret from the pipe the
supervisor wrote it to (never argv, the environment or a file), closes the pipe, and runs
mitmproxy's ``mitmdump`` in-process with ``SO_REUSEPORT`` listeners. Exit code: mitmdump's (0
after ``GET /shutdown``), 1 for a hardening or secret error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def load_secret(kind: str, fd: int) -> None:
    """Read the secret of ``kind`` from ``fd`` into its holder module, then close ``fd``
    (``oidc``: the first access token; ``fd`` stays open for the renewed ones).

    Raises:
        ValueError: the secret breaks its rules (``ApiKeyError`` / ``UpstreamKeyError`` /
            ``WorkloadIdentityError``).
    """
    if kind == "oidc":
        from addons.workers.identity_feed import follow

        follow(fd)
        return
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        if kind == "gateway":
            from addons.gateway_mode import keypool

            keypool.POOL.set_keys(keypool.read_upstream_keys(pipe))
        else:
            from addons import keyholder

            keyholder.load_from_stream(pipe)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker; returns its exit code."""
    parser = argparse.ArgumentParser(prog="codex-proxy-worker")
    parser.add_argument("--secret-fd", type=int, required=True)
    parser.add_argument("--kind", choices=["strict", "gateway", "oidc"], required=True)
    parser.add_argument("mitmdump_args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    args = ns.mitmdump_args[1:] if ns.mitmdump_args[:1] == ["--"] else ns.mitmdump_args
    from addons.hardening import HardeningError, harden_process

    try:
        harden_process()
        load_secret(ns.kind, ns.secret_fd)
    except (HardeningError, ValueError, OSError) as e:
        sys.stderr.write(f"Error: worker: {e}\n")
        return 1
    from addons.workers.reuseport import patch_listen

    patch_listen()
    from addons.cli import run_mitmdump

    return run_mitmdump(args)


if __name__ == "__main__":
    sys.exit(main())
