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
started with ``--no-websockets``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

PROVIDER_ID = "codex-proxy"
GATEWAY_PROVIDER_ID = "codex-gateway"
GATEWAY_ENV_KEY = "CODEX_GATEWAY_KEY"


def provider_toml(
    port: int, model: str | None = None, gateway: bool = False, websockets: bool = True
) -> str:
    """The ``config.toml`` text for a proxy (or, ``gateway``, a gateway) on 127.0.0.1:``port``."""
    if gateway:
        return gateway_toml(port, model, websockets)
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


def gateway_toml(port: int, model: str | None = None, websockets: bool = True) -> str:
    """The member's ``config.toml`` for a gateway on 127.0.0.1:``port``: Codex sends the
    member key from ``$CODEX_GATEWAY_KEY``. ``websockets``: ``supports_websockets = true``
    (the default, Codex's own: one socket per session, served by the gateway unless started
    with ``--no-websockets``); false for such a gateway."""
    lines = [f"model = {json.dumps(model)}"] if model else []
    lines += [
        f'model_provider = "{GATEWAY_PROVIDER_ID}"',
        "",
        f"[model_providers.{GATEWAY_PROVIDER_ID}]",
        'name = "codex-gateway"',
        f'base_url = "http://127.0.0.1:{port}/v1"',
        'wire_api = "responses"',
        f'env_key = "{GATEWAY_ENV_KEY}"',
        f"supports_websockets = {'true' if websockets else 'false'}",
    ]
    return "\n".join(lines) + "\n"


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
    try:
        port = ns.port if ns.port is not None else port_from_server_info(ns.server_info)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if not 0 < port < 65536:
        parser.exit(2, f"{parser.prog}: error: port {port} out of range\n")
    if ns.toml_only:
        sys.stdout.write(provider_toml(port, ns.model, ns.gateway, websockets))
        return 0
    if ns.gateway:
        sys.stdout.write("# CODEX_HOME/config.toml of a gateway member (top-level keys first):\n")
        sys.stdout.write(gateway_toml(port, ns.model, websockets))
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
