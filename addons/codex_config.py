"""``./run.sh codex-config``: print the Codex provider configuration for a running proxy.

Rules verified against the Codex CLI that ``package.json`` pins (``addons/versions.py``;
the tests feed this output to it; ``shared/CODEX.md``): the top-level
``model_provider`` line must come before any ``[table]`` (else TOML nests it and Codex ignores
it); ``base_url`` ends in ``/v1`` (Codex appends ``/responses``); ``wire_api = "responses"``;
``supports_websockets = false``; no ``env_key`` (the proxy holds the credential) and no
``query_params`` (the proxy refuses query strings). With ``--gateway`` (gateway mode) the block
names ``env_key = "CODEX_GATEWAY_KEY"``: Codex then sends ``Authorization: Bearer`` with that
variable's value, the member's own key (CODEX.md), and ``supports_websockets = true`` (Codex's
default transport, which the gateway serves by default; ``--no-websockets`` for a gateway
started with ``--no-websockets``). With ``--gateway --auth-command "CMD [ARGS...]"`` the block has
no ``env_key`` but a ``[model_providers.codex-gateway.auth]`` table (Codex 0.171's command-backed
provider auth, CODEX.md): Codex runs CMD, sends its trimmed stdout as the bearer, runs it again
every ``refresh_interval_ms`` and after a 401, so a member holds no stored key (the token
helpers, ``codex-proxy token``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass

PROVIDER_ID = "codex-proxy"
GATEWAY_PROVIDER_ID = "codex-gateway"
GATEWAY_ENV_KEY = "CODEX_GATEWAY_KEY"
#: Defaults of the ``auth`` table: Codex waits this long for the command (ms), and runs it again
#: after this long (ms) even without a 401 (shorter than any token lifetime we print).
AUTH_TIMEOUT_MS = 10_000
AUTH_REFRESH_INTERVAL_MS = 300_000


@dataclass(frozen=True)
class AuthCommand:
    """Codex's command-backed provider auth: ``program`` (an absolute path when it was found on
    ``PATH``), its ``args``, ``timeout_ms`` and ``refresh_interval_ms`` (milliseconds)."""

    program: str
    args: tuple[str, ...] = ()
    timeout_ms: int = AUTH_TIMEOUT_MS
    refresh_interval_ms: int = AUTH_REFRESH_INTERVAL_MS

    def toml_lines(self) -> list[str]:
        """The ``[model_providers.<gateway>.auth]`` table (TOML basic strings via JSON, whose
        escapes TOML shares for the characters json.dumps writes)."""
        return [
            f"[model_providers.{GATEWAY_PROVIDER_ID}.auth]",
            f"command = {json.dumps(self.program)}",
            f"args = [{', '.join(json.dumps(a) for a in self.args)}]",
            f"timeout_ms = {self.timeout_ms}",
            f"refresh_interval_ms = {self.refresh_interval_ms}",
        ]


def parse_auth_command(
    text: str,
    timeout_ms: int = AUTH_TIMEOUT_MS,
    refresh_interval_ms: int = AUTH_REFRESH_INTERVAL_MS,
    which=shutil.which,
) -> AuthCommand:
    """Split ``text`` as a POSIX shell would (``shlex.split``: quotes, no expansion) into the
    program and its arguments. A bare program name found on ``PATH`` becomes its absolute path
    (Codex runs the command without a shell); a relative path (``./run.sh``) becomes absolute
    against the current directory; a name not on ``PATH`` is kept as given.

    Raises:
        ValueError: empty or unbalanced quotes, or a timeout/interval that is not positive.
    """
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"--auth-command: {e}") from None
    if not words:
        raise ValueError("--auth-command is empty")
    if timeout_ms <= 0 or refresh_interval_ms <= 0:
        raise ValueError("--auth-timeout-ms and --auth-refresh-interval-ms must be positive")
    program = words[0]
    if "/" in program:
        program = os.path.abspath(program)
    else:
        program = which(program) or program
    return AuthCommand(program, tuple(words[1:]), timeout_ms, refresh_interval_ms)


def provider_toml(
    port: int,
    model: str | None = None,
    gateway: bool = False,
    websockets: bool = True,
    auth: AuthCommand | None = None,
    base_url: str | None = None,
) -> str:
    """The ``config.toml`` text for a proxy (or, ``gateway``, a gateway) on 127.0.0.1:``port``
    (a gateway: or at ``base_url``)."""
    if gateway:
        return gateway_toml(port, model, websockets, auth, base_url)
    lines = []
    if model:
        lines.append(f"model = {json.dumps(model)}")
    lines += [
        f'model_provider = "{PROVIDER_ID}"',
        "",
        f"[model_providers.{PROVIDER_ID}]",
        'name = "codex-responses-api-proxy"',
        f'base_url = "http://127.0.0.1:{port}/v1"',
        'wire_api = "responses"',
        "supports_websockets = false",
    ]
    return "\n".join(lines) + "\n"


def gateway_toml(
    port: int,
    model: str | None = None,
    websockets: bool = True,
    auth: AuthCommand | None = None,
    base_url: str | None = None,
) -> str:
    """The member's ``config.toml`` for a gateway on 127.0.0.1:``port``, or at ``base_url`` (a
    team gateway elsewhere, from :func:`gateway_base_url`): Codex sends the
    member key from ``$CODEX_GATEWAY_KEY``, or with ``auth`` the token its command prints (no
    ``env_key`` then). ``websockets``: ``supports_websockets = true`` (the default, Codex's
    own: one socket per session, served by the gateway unless started with
    ``--no-websockets``); false for such a gateway."""
    lines = [f"model = {json.dumps(model)}"] if model else []
    lines += [
        f'model_provider = "{GATEWAY_PROVIDER_ID}"',
        "",
        f"[model_providers.{GATEWAY_PROVIDER_ID}]",
        'name = "codex-gateway"',
        f"base_url = {json.dumps(base_url or f'http://127.0.0.1:{port}/v1')}",
        'wire_api = "responses"',
        *([] if auth else [f'env_key = "{GATEWAY_ENV_KEY}"']),
        f"supports_websockets = {'true' if websockets else 'false'}",
    ]
    if auth:
        lines += ["", *auth.toml_lines()]
    return "\n".join(lines) + "\n"


def gateway_base_url(url: str) -> str:
    """Codex's ``base_url`` for a gateway at ``url`` (``https://gw.example.com`` or
    ``.../v1``): ``/v1`` appended unless there (Codex appends ``/responses``).

    Raises:
        ValueError: not an http(s) URL with a host, or with a query or fragment (Codex would
            send the query on; the gateway refuses one).
    """
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"--url must be an http(s) URL without query or fragment: {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return urllib.parse.urlunsplit(parts._replace(path=path))


def exec_one_liner(port: int, model: str | None = None) -> str:
    """The equivalent ``codex exec -c ...`` command line (no config file needed)."""
    provider = (
        f'{{ name = "codex-responses-api-proxy", base_url = "http://127.0.0.1:{port}/v1", '
        f'wire_api = "responses", supports_websockets = false }}'
    )
    parts = [
        "codex",
        "exec",
        "--skip-git-repo-check",  # runs as pasted outside a git repository too
        "-c",
        f"'model_providers.{PROVIDER_ID}={provider}'",
        "-c",
        f"model_provider={PROVIDER_ID}",
    ]
    if model:
        parts += ["-c", f"'model={json.dumps(model)}'"]
    return " ".join(parts) + ' "your prompt"'


def port_from_server_info(path: str) -> int:
    """Read the port from a server-info file (``{"port":N,"pid":N}``).

    Raises:
        ValueError: when the file is missing or malformed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            port = json.load(f)["port"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the port from {path}: {e}") from None
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"bad port in {path}: {port!r}")
    return port


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``./run.sh codex-config``; returns the exit code (2 for bad arguments)."""
    from addons.invocation import prog

    parser = argparse.ArgumentParser(
        prog=prog("codex-config"),
        description="Print the Codex config.toml provider block for a running proxy.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--server-info", metavar="FILE", help="the proxy's --server-info file")
    where.add_argument("--port", type=int, help="the proxy's port")
    where.add_argument(
        "--url",
        metavar="URL",
        help="with --gateway: a team gateway elsewhere (https://gw.example.com[/v1])",
    )
    parser.add_argument(
        "--model",
        help='also set the top-level model, one of Codex\'s catalog (e.g. "gpt-6.2-sol"; '
        "config/codex-models.yaml lists them); without it Codex uses its catalog's default",
    )
    parser.add_argument("--toml-only", action="store_true", help="print only the TOML")
    parser.add_argument(
        "--gateway",
        action="store_true",
        help=f"for a gateway ({prog('gateway serve')}): the member's key from ${GATEWAY_ENV_KEY}",
    )
    parser.add_argument(
        "--auth-command",
        metavar='"CMD [ARGS...]"',
        help="with --gateway: no stored key; Codex runs CMD (split as a shell would, the program "
        "resolved on PATH) and sends what it prints as the bearer, e.g. "
        f'"{prog("token")} github-actions --audience AUD" ({prog("help")} token)',
    )
    parser.add_argument(
        "--auth-timeout-ms",
        type=int,
        default=AUTH_TIMEOUT_MS,
        help=f"with --auth-command: Codex's timeout_ms for it (default {AUTH_TIMEOUT_MS})",
    )
    parser.add_argument(
        "--auth-refresh-interval-ms",
        type=int,
        default=AUTH_REFRESH_INTERVAL_MS,
        help="with --auth-command: Codex runs it again this often even without a 401 "
        f"(refresh_interval_ms, default {AUTH_REFRESH_INTERVAL_MS})",
    )
    sockets = parser.add_mutually_exclusive_group()
    sockets.add_argument(
        "--websockets",
        action="store_true",
        help="with --gateway: kept for old scripts (supports_websockets = true is the default)",
    )
    sockets.add_argument(
        "--no-websockets",
        action="store_true",
        help="with --gateway: supports_websockets = false, for a gateway started with "
        "--no-websockets (Codex would otherwise try the socket first)",
    )
    ns = parser.parse_args(argv)
    if (ns.websockets or ns.no_websockets) and not ns.gateway:
        parser.error(
            "--websockets / --no-websockets need --gateway (the strict proxy answers upgrades "
            "426: its block always says supports_websockets = false)"
        )
    websockets = not ns.no_websockets
    auth = None
    if ns.auth_command is not None:
        if not ns.gateway:
            parser.error("--auth-command needs --gateway (the strict proxy holds the credential)")
        try:
            auth = parse_auth_command(
                ns.auth_command, ns.auth_timeout_ms, ns.auth_refresh_interval_ms
            )
        except ValueError as e:
            parser.error(str(e))
    base_url = None
    if ns.url is not None:
        if not ns.gateway:
            parser.error("--url needs --gateway (a strict proxy runs on this machine)")
        try:
            base_url = gateway_base_url(ns.url)
        except ValueError as e:
            parser.error(str(e))
    try:
        if ns.port is not None:
            port = ns.port
        elif ns.server_info is not None:
            port = port_from_server_info(ns.server_info)
        else:
            port = 1  # unused: base_url
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if not 0 < port < 65536:
        parser.exit(2, f"{parser.prog}: error: port {port} out of range\n")
    if ns.toml_only:
        sys.stdout.write(provider_toml(port, ns.model, ns.gateway, websockets, auth, base_url))
        return 0
    if ns.gateway:
        sys.stdout.write("# CODEX_HOME/config.toml of a gateway member (top-level keys first):\n")
        sys.stdout.write(gateway_toml(port, ns.model, websockets, auth, base_url))
        if auth is not None:
            sys.stdout.write(
                "\n# Codex runs the command for its bearer token (stdout); a first device-flow"
                "\n# sign-in (token oidc) is done by running the command once in a terminal.\n"
            )
            return 0
        sys.stdout.write(
            f"\n# then: export {GATEWAY_ENV_KEY}=sk-codex-gw-...  ({prog('gateway add-key')})\n"
        )
        return 0
    # All of stdout is valid TOML (`> config.toml` works): the one-liner is a comment.
    sys.stdout.write("# CODEX_HOME/config.toml (top-level keys before any [table]):\n")
    sys.stdout.write(provider_toml(port, ns.model))
    sys.stdout.write("\n# or, without a config file:\n")
    sys.stdout.write("# " + exec_one_liner(port, ns.model) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
