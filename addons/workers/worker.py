"""One worker process: ``python -m addons.workers.worker --secret-fd FD --secret-loader
MODULE:NAME -- MITMDUMP_ARGS...`` (started by :mod:`addons.workers.supervisor`, never by hand).

Hardened first (as the single-process launcher is), then it reads the secret from the pipe the
supervisor wrote it to (never argv, the environment or a file) with the loader the launcher
named (the strict key holder's, the gateway key pool's, the keyless mode's identity feed: the
worker knows no mode), and runs mitmproxy's ``mitmdump`` in-process with ``SO_REUSEPORT``
listeners. Exit code: mitmdump's (0 after ``GET /shutdown``), 1 for a hardening or secret error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence


def _in_bundle(module: str, name: str) -> bool:
    """Whether ``module``/``name`` can name a secret loader: a top-level name in a module of
    the ``addons`` package."""
    return module.startswith("addons.") and name.isidentifier()


def loader_spec(load: Callable[[int], None]) -> str:
    """``module:name`` of a module-level function, as :func:`secret_loader` takes it (the
    supervisor puts it in each worker's ``--secret-loader``).

    Raises:
        ValueError: ``load`` is no module-level function of the ``addons`` package.
    """
    module, name = getattr(load, "__module__", ""), getattr(load, "__qualname__", "")
    if not _in_bundle(module, name):
        raise ValueError(f"not a module-level function of addons: {load!r}")
    return f"{module}:{name}"


def secret_loader(spec: str) -> Callable[[int], None]:
    """The function ``spec`` (``module:name``, :func:`loader_spec`) names: it reads
    the secret from a pipe's fd into its holder module (and closes the fd, or keeps reading
    renewals from it: the keyless mode).

    Raises:
        ValueError: ``spec`` names no function of the ``addons`` package.
    """
    module, _, name = spec.partition(":")
    if not _in_bundle(module, name):
        raise ValueError(f"not a secret loader: {spec!r}")
    try:
        load = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"not a secret loader: {spec!r}") from e
    if not callable(load):
        raise ValueError(f"not a secret loader: {spec!r}")
    return load  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker; returns its exit code."""
    parser = argparse.ArgumentParser(prog="codex-proxy-worker")
    parser.add_argument("--secret-fd", type=int, required=True)
    parser.add_argument("--secret-loader", required=True, metavar="MODULE:NAME")
    parser.add_argument("mitmdump_args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    args = ns.mitmdump_args[1:] if ns.mitmdump_args[:1] == ["--"] else ns.mitmdump_args
    from addons.hardening import HardeningError, harden_process

    try:
        harden_process()
        secret_loader(ns.secret_loader)(ns.secret_fd)
    except (HardeningError, ValueError, OSError) as e:
        sys.stderr.write(f"Error: worker: {e}\n")
        return 1
    from addons.workers.reuseport import patch_listen

    patch_listen()
    from addons.mitmdump_main import run_mitmdump

    return run_mitmdump(args)


def _main_quietly() -> int:
    """:func:`main`; SIGINT before mitmproxy takes it over (a terminal's Ctrl-C reaches every
    worker while it starts) exits 130 with no traceback: the supervisor says the one line."""
    try:
        return main()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(_main_quietly())
