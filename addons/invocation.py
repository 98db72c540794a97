"""How the user invoked us, for usage lines, help and errors: ``codex-proxy gateway`` from the
console script, ``./run.sh gateway`` through ``run.sh`` (which names itself in
:data:`PROG_ENV`), so a message names the command the user can type again.

A leaf module: every command's parser imports it; it imports nothing of ours.
"""

from __future__ import annotations

import os

#: The console script with every mode's command (``pyproject.toml``'s ``[project.scripts]``).
CONSOLE_SCRIPT = "codex-proxy"
#: Set by ``run.sh`` to the path it was run as (``$0``, e.g. ``./run.sh``).
PROG_ENV = "CODEX_PROXY_PROG"


def command() -> str:
    """The command as invoked: ``$CODEX_PROXY_PROG`` (``./run.sh``), else ``codex-proxy``."""
    return os.environ.get(PROG_ENV) or CONSOLE_SCRIPT


def prog(subcommand: str) -> str:
    """An argparse ``prog`` for ``subcommand``: ``codex-proxy gateway``, ``./run.sh gateway``."""
    return f"{command()} {subcommand}"
