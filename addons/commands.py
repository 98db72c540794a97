"""``codex-proxy [COMMAND] [ARGS...]``: one command for every mode (``./run.sh`` hands over here).

Like ``git``: each command is a module with its own ``argparse`` parser and a ``main(argv)``
that returns the exit code; this dispatcher only picks it (imported when chosen, so the strict
proxy does not load the gateway). No command, or a first argument starting with ``-``, is the
strict proxy with exactly the reference's flags (``codex-proxy --help`` is its help; the
console script ``codex-responses-api-proxy`` stays the drop-in). ``help`` (exit 0, stdout) and
an unknown word (exit 2, stderr) list the commands. stdin is never touched here: the key (or the
gateway's upstream keys) goes to the command that reads it.

``test``, ``bench`` and ``refresh-models`` need a checkout (the test suite and benchmark are
not in the wheel; ``refresh-models`` runs ``node_modules``' Codex and rewrites the checkout's
``config/codex-models.yaml``): ``run.sh`` keeps them, and the list names them as such.
"""

from __future__ import annotations

import difflib
import importlib
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from addons.invocation import command

EXIT_USAGE = 2


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, ``module:function`` (a ``main(argv) -> int``), the arguments
    shown in the list and a one-line summary."""

    name: str
    target: str
    args: str
    summary: str

    def load(self) -> Callable[[Sequence[str]], Any]:
        """The command's ``main``, its module imported now."""
        module, _, function = self.target.partition(":")
        main: Callable[[Sequence[str]], Any] = getattr(
            importlib.import_module(module), function or "main"
        )
        return main


#: The strict proxy (no command): the reference's drop-in, named as invoked.
PROXY = Command("", "addons.cli:command_main", "[FLAGS]", "the strict proxy (API key on stdin)")

#: Every command, in the order ``help`` lists them.
COMMANDS = (
    Command(
        "gateway",
        "addons.gateway_mode.cli",
        "[--config F] [--database URL] [--actor NAME] COMMAND",
        "the team gateway: init, add-member, set-member, list-members, add-team, set-team, "
        "list-teams, add-key, list-keys, revoke-key, add-identity, list-identities, "
        "remove-identity, audit, usage, serve (upstream keys on stdin)",
    ),
    Command(
        "web", "addons.web", "[FLAGS] [--web-port N]", "the proxy behind mitmweb (key on stdin)"
    ),
    Command(
        "record",
        "addons.cli:record_main",
        "DIR [FLAGS]",
        "the proxy, recording the session into DIR (key on stdin)",
    ),
    Command(
        "replay",
        "addons.replay",
        "DIR [--pace original|fast] [FLAGS]",
        "serve a recording offline: no key, no network",
    ),
    Command(
        "compare",
        "addons.compare",
        "BASE NEW [...]",
        "judge a recording against the last good one: exit 0 pass, 1 regression, 2 unreadable",
    ),
    Command(
        "demo",
        "addons.demo",
        "",
        "the proxy in front of the local stand-in, driven by the openai SDK: no key, no network",
    ),
    Command(
        "standin",
        "addons.standin",
        "[--port N] [--server-info F]",
        "the local Responses stand-in alone (no key, no network), to point a proxy at",
    ),
    Command(
        "codex-config",
        "addons.codex_config",
        "--server-info F | --port N",
        "print Codex's provider config for a running proxy or gateway",
    ),
    Command(
        "token",
        "addons.token_helpers",
        "github-actions|oidc ...",
        "print a short-lived bearer token for a gateway (Codex's command-backed auth): the "
        "job's GitHub Actions OIDC token, or a person's ID token from the team's OpenID provider",
    ),
    Command("help", "addons.commands:help_main", "[COMMAND]", "this list, or COMMAND's help"),
)
#: ``run.sh``'s own commands, which need a checkout (see the module docstring).
CHECKOUT_ONLY = (
    ("test [ARGS]", "the test suite (pytest ARGS)"),
    ("bench [...]", "the benchmark"),
    ("refresh-models [--check]", "rewrite config/codex-models.yaml from node_modules' Codex"),
)


def find(name: str) -> Command | None:
    """The command called ``name``, or ``None``."""
    return next((c for c in COMMANDS if c.name == name), None)


def command_list() -> str:
    """The text ``help`` prints (and an unknown command's error ends with)."""
    prog = command()

    def entry(left: str, summary: str) -> list[str]:
        return [
            f"  {left}",
            *textwrap.wrap(summary, 90, initial_indent=" " * 6, subsequent_indent=" " * 6),
        ]

    lines = [
        f"usage: {prog} [COMMAND] [ARGS...]",
        "",
        "No command (or a first argument starting with -): the strict proxy, a drop-in for",
        "`codex responses-api-proxy`, the API key on stdin:",
        f"  printenv OPENAI_API_KEY | env -u OPENAI_API_KEY {prog} --server-info /tmp/info.json",
        "",
        "commands:",
        *(line for c in COMMANDS for line in entry(f"{c.name} {c.args}".rstrip(), c.summary)),
        "",
        "in a checkout, ./run.sh only:",
        *(line for left, summary in CHECKOUT_ONLY for line in entry(left, summary)),
        "",
        f"`{prog} COMMAND --help` for a command's flags; `{prog} --help` for the proxy's.",
    ]
    return "\n".join(lines) + "\n"


def help_main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """``help``: the command list on stdout (exit 0); ``help COMMAND``: that command's help."""
    argv = list(argv or [])
    if argv and argv[0] != "help":
        chosen = find(argv[0])
        if chosen is None:
            return unknown(argv[0])
        return run(chosen, ["--help"])
    (out or sys.stdout).write(command_list())
    return 0


def unknown(word: str, err: TextIO | None = None) -> int:
    """An unknown command: says so and lists the commands on stderr; returns 2."""
    err = err or sys.stderr
    names = [c.name for c in COMMANDS] + [left.split()[0] for left, _ in CHECKOUT_ONLY]
    close = difflib.get_close_matches(word, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    err.write(f"{command()}: unknown command {word!r}{hint}\n\n{command_list()}")
    return EXIT_USAGE


#: The exit code of a Ctrl-C the command did not handle itself (128 + SIGINT, as a shell's).
EXIT_INTERRUPTED = 130


def run(chosen: Command, argv: Sequence[str]) -> int:
    """Run ``chosen`` with ``argv``; returns its exit code (``None``: 0). argparse's
    ``SystemExit`` (``--help``: 0, a usage error: 2) passes through, as from the module. A
    Ctrl-C before the command handles signals itself (while its modules import: a second or
    two) ends with one line and exit 130, not a ``KeyboardInterrupt`` traceback (issue 29: a
    clean log)."""
    try:
        code = chosen.load()(list(argv))
    except KeyboardInterrupt:
        sys.stderr.write(f"{command()}: SIGINT received: stopped\n")
        return EXIT_INTERRUPTED
    return 0 if code is None else int(code)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script ``codex-proxy``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        return run(PROXY, args)
    chosen = find(args[0])
    if chosen is None:
        return unknown(args[0])
    return run(chosen, args[1:])


if __name__ == "__main__":
    sys.exit(main())
