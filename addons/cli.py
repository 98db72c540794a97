"""The launcher: ``codex-responses-api-proxy`` / ``codex-proxy`` / ``./run.sh`` with no command,
flag-compatible with the reference (and ``record DIR``: the same with ``--record DIR``).

Reads the API key from stdin (the reference proxy's rules, messages and exit codes), keeps it in
:mod:`addons.keyholder`, then runs mitmproxy's own ``mitmdump`` in this process in reverse-proxy
mode with ``addons/proxy.py`` as its script. mitmproxy keeps its CLI, signal handling, exit
codes and addon order; the key never reaches argv, the environment or a log line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from addons import invocation, keyholder, workload_identity
from addons.config import DEFAULT_CONFIG_PATH, ProxyConfig, load_config
from addons.hardening import harden_process
from addons.launch import (
    OptionSpecs,
    Secret,
    launch,
    port_number,
    record_options,
    reverse_mode,
    set_spec,
    worker_count,
)
from addons.routing import DEFAULT_UPSTREAM_URL, Upstream, parse_upstream_url
from addons.workers.identity_feed import IdentityFeed, follow

EXIT_ARGS = 2  # argument errors, as clap in the reference proxy (key errors: launch.EXIT_SECRET)

SCRIPT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proxy.py")
#: The drop-in console script's name (the reference's command, ``codex responses-api-proxy``).
PROG = "codex-responses-api-proxy"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The reference proxy's flags plus ``--config`` and mitmproxy's ``--set``; ``prog``: the
    command as invoked (usage lines and errors name it). The help ends with where the other
    commands are (``codex-proxy help``)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Strict reverse proxy for the OpenAI Responses API. Reads the API key from "
        f"stdin: printenv OPENAI_API_KEY | env -u OPENAI_API_KEY {prog}",
        epilog="The other commands (gateway, web, record, replay, compare, demo, standin, "
        f"...): {invocation.command()} help",
    )
    parser.add_argument("--port", type=port_number, help="port to listen on (default: ephemeral)")
    parser.add_argument(
        "--server-info", metavar="FILE", help='write {"port":N,"pid":N} to FILE once listening'
    )
    parser.add_argument(
        "--http-shutdown",
        action="store_true",
        default=None,
        help="enable GET /shutdown (200, then exit 0)",
    )
    parser.add_argument(
        "--upstream-url",
        metavar="URL",
        help="absolute URL to forward to (default https://api.openai.com/v1/responses)",
    )
    parser.add_argument("--dump-dir", metavar="DIR", help="write request/response dumps here")
    parser.add_argument(
        "--dump-required",
        action="store_true",
        default=None,
        help="fail closed when a dump cannot be written (503 / killed reply)",
    )
    parser.add_argument(
        "--record",
        metavar="DIR",
        help="record the session: dumps, flows.mitm, session.har, usage.jsonl, summary.json",
    )
    parser.add_argument(
        "--chat-bridge",
        action="store_true",
        default=None,
        help="also serve POST /v1/chat/completions (translated to the Responses upstream) "
        "and GET /v1/models (ours; off by default, as in the reference)",
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        default="1",
        help="worker processes sharing the port (a number, or auto = the usable cores; "
        "default 1: one process, as the reference)",
    )
    oidc = parser.add_argument_group(
        "GitHub Actions workload identity (keyless; the reference's --github-oidc)"
    )
    oidc.add_argument(
        "--github-oidc",
        action="store_true",
        help="authenticate with GitHub Actions workload identity: stdin supplies the GitHub "
        "OIDC request token (ACTIONS_ID_TOKEN_REQUEST_TOKEN), not an API key",
    )
    oidc.add_argument(
        "--oidc-audience",
        metavar="AUDIENCE",
        help="audience configured on the OpenAI workload identity provider",
    )
    oidc.add_argument(
        "--identity-provider-id", metavar="ID", help="OpenAI workload identity provider ID"
    )
    oidc.add_argument(
        "--service-account-id",
        metavar="ID",
        help="OpenAI service account ID selected by the provider mapping",
    )
    oidc.add_argument(
        "--github-oidc-request-url",
        metavar="URL",
        help="HTTPS token-request URL from the runner's ACTIONS_ID_TOKEN_REQUEST_URL (use the "
        "value from the trusted runner environment only: the request token is sent to it)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=DEFAULT_CONFIG_PATH,
        help="YAML defaults (default: config/proxy.yaml)",
    )
    parser.add_argument(
        "--set",
        dest="setoptions",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        type=set_spec,
        help="set a mitmproxy option (repeatable); overrides everything else",
    )
    return parser


def mitmproxy_options(
    config: ProxyConfig,
    upstream: Upstream,
    user_sets: Sequence[str],
    identity: workload_identity.IdentitySettings | None = None,
) -> list[str]:
    """The ``--set name=value`` specs for mitmdump, from the config, the keyless mode's
    settings and the user's ``--set`` (which win; see :meth:`OptionSpecs.specs`)."""
    options = OptionSpecs()
    put = options.put

    put("listen_host", "127.0.0.1")
    put("listen_port", config.port if config.port is not None else 0)
    # Keep the client's Host until the forwarder sets the upstream's, so dumps show the
    # headers as received (as the reference proxy's do).
    put("keep_host_header", True)
    for name, value in config.mitmproxy.items():
        put(name, value)
    put("codex_upstream_url", upstream.url)
    put("codex_http_shutdown", config.http_shutdown)
    put("codex_dump_required", config.dump_required)
    put("codex_extra_routes", config.extra_routes)
    put("codex_redact_headers", config.redact_headers)
    put("codex_chat_bridge", config.chat_bridge)
    put("codex_chat_bridge_reasoning_content", config.chat_bridge_reasoning_content)
    if config.chat_bridge_models:
        put("codex_chat_bridge_models", json.dumps(config.chat_bridge_models))
    if config.server_info:
        put("codex_server_info", os.path.abspath(config.server_info))
    if config.dump_dir:
        put("codex_dump_dir", os.path.abspath(config.dump_dir))
    if config.record_dir:
        for name, value in record_options(config.record_dir).items():
            put(name, value)
        if config.rate_card:
            put("codex_rate_card", config.rate_card)
    if identity is not None:
        put("codex_github_oidc", True)
        put("codex_oidc_audience", identity.audience)
        put("codex_identity_provider_id", identity.identity_provider_id)
        put("codex_service_account_id", identity.service_account_id)
        put("codex_github_oidc_request_url", identity.request_url)
        put("codex_oidc_token_url", identity.token_url)

    return options.specs(user_sets)


def mitmdump_args(
    config: ProxyConfig,
    upstream: Upstream,
    user_sets: Sequence[str],
    identity: workload_identity.IdentitySettings | None = None,
) -> list[str]:
    """Arguments for ``mitmproxy.tools.main.mitmdump``: reverse mode to the upstream's origin
    (:func:`addons.launch.reverse_mode`), our script, and the option specs."""
    args = reverse_mode(upstream.host, upstream.port, SCRIPT_PATH)
    for spec in mitmproxy_options(config, upstream, user_sets, identity):
        args += ["--set", spec]
    return args


def resolve_config(ns: argparse.Namespace) -> ProxyConfig:
    """Apply command-line flags over the YAML config. Raises ValueError from the config."""
    config = load_config(ns.config)
    if ns.port is not None:
        config.port = ns.port
    if ns.server_info is not None:
        config.server_info = ns.server_info
    if ns.http_shutdown:
        config.http_shutdown = True
    if ns.upstream_url is not None:
        config.upstream_url = ns.upstream_url
    if ns.dump_dir is not None:
        config.dump_dir = ns.dump_dir
    if ns.dump_required:
        config.dump_required = True
    if ns.chat_bridge:
        config.chat_bridge = True
    if ns.record is not None:
        config.record_dir = ns.record
        if config.dump_dir is None:
            config.dump_dir = os.path.join(ns.record, "dumps")
    return config


OIDC_FLAGS = (
    ("oidc_audience", "--oidc-audience"),
    ("identity_provider_id", "--identity-provider-id"),
    ("service_account_id", "--service-account-id"),
    ("github_oidc_request_url", "--github-oidc-request-url"),
)


def identity_settings(ns: argparse.Namespace) -> workload_identity.IdentitySettings | None:
    """The keyless mode's settings from the flags (``None`` without ``--github-oidc``); the
    token endpoint from ``--set codex_oidc_token_url=`` (a test seam, last one wins).

    Raises:
        ValueError: one of the four flags without ``--github-oidc``, or ``--github-oidc``
            without all four (argument errors, exit 2, as clap in the reference).
    """
    given = [flag for attr, flag in OIDC_FLAGS if getattr(ns, attr) is not None]
    if not ns.github_oidc:
        if given:
            raise ValueError(f"{given[0]} requires --github-oidc")
        return None
    missing = [flag for attr, flag in OIDC_FLAGS if getattr(ns, attr) is None]
    if missing:
        raise ValueError("--github-oidc requires " + ", ".join(missing))
    token_url = workload_identity.DEFAULT_TOKEN_URL
    for spec in ns.setoptions:
        name, value = spec.split("=", 1)
        if name == "codex_oidc_token_url":
            token_url = value
    if not token_url.lower().startswith("https://"):
        raise ValueError("codex_oidc_token_url must be an https URL")
    return workload_identity.IdentitySettings(
        audience=ns.oidc_audience,
        identity_provider_id=ns.identity_provider_id,
        service_account_id=ns.service_account_id,
        request_url=ns.github_oidc_request_url,
        token_url=token_url,
    )


def start_identity(
    config: ProxyConfig, identity: workload_identity.IdentitySettings, stream: Any
) -> None:
    """The keyless mode's start-up, in the reference's order: the default upstream (the
    ``--upstream-url`` flag or the YAML's; the ``codex_upstream_url`` option is a test seam),
    the four values, the request URL, the request token from ``stream``, then the GitHub
    OIDC fetch and the token exchange (:func:`workload_identity.start`).

    Raises:
        workload_identity.WorkloadIdentityError: the reference's message.
    """
    if config.upstream_url != DEFAULT_UPSTREAM_URL:
        raise workload_identity.WorkloadIdentityError(workload_identity.MSG_DEFAULT_UPSTREAM)
    workload_identity.validate_settings(identity)
    token = workload_identity.read_request_token(stream)
    workload_identity.start(identity, token)


def stdin_hint(stream: Any, prog: str, keyless: bool, err: Any) -> None:
    """When ``stream`` is a terminal, one line on ``err`` saying what the proxy waits for on
    it, with the piped form; silent for a pipe or a file (the reference says nothing either
    way; a script sees no change). Never raises."""
    try:
        if not os.isatty(stream.fileno()):
            return
    except (AttributeError, OSError, ValueError):  # io.BytesIO: io.UnsupportedOperation
        return
    if keyless:
        line = (
            f"{prog}: waiting for the GitHub OIDC request token on stdin (pipe it: printenv "
            f"ACTIONS_ID_TOKEN_REQUEST_TOKEN | {prog} --github-oidc ...)"
        )
    else:
        line = (
            f"{prog}: waiting for the API key on stdin, up to Enter (typing shows it; pipe it: "
            f"printenv OPENAI_API_KEY | env -u OPENAI_API_KEY {prog} ...)"
        )
    err.write(line + "\n")
    err.flush()


def main(
    argv: Sequence[str] | None = None,
    stdin: Any = None,
    harden: Callable[[], None] = harden_process,
    prog: str = PROG,
    parser: argparse.ArgumentParser | None = None,
) -> int:
    """Run the proxy. Returns the process exit code (0 after a clean shutdown).

    Exit codes: 2 for argument/config errors (before reading the key), 1 for hardening or key
    errors (the reference proxy's messages, one line on stderr, nothing listening), else
    mitmdump's own. ``harden`` runs before the key is read (a seam for unit tests). ``prog``:
    the command as invoked (see :func:`build_parser`); ``parser``: one built by the caller
    (``record``'s).
    """
    parser = parser or build_parser(prog)
    ns = parser.parse_args(argv)
    try:
        config = resolve_config(ns)
        upstream = parse_upstream_url(config.upstream_url)
        workers = worker_count(ns.workers)
        identity = identity_settings(ns)
    except ValueError as e:
        parser.exit(EXIT_ARGS, f"{parser.prog}: error: {e}\n")

    stream = stdin if stdin is not None else sys.stdin.buffer
    if identity is not None:
        settings = identity

        def load_identity() -> None:
            stdin_hint(stream, parser.prog, True, sys.stderr)
            start_identity(config, settings, stream)

        secret = Secret(
            load=load_identity,
            take=bytearray,  # the workers follow the supervisor's renewals (one identity)
            clear=workload_identity.IDENTITY.clear,
            feed=identity_feed,
            worker_load=follow,  # the workers follow the renewals
        )
    else:

        def load_key() -> None:
            stdin_hint(stream, parser.prog, False, sys.stderr)
            keyholder.load_from_stream(stream)

        secret = Secret(
            load=load_key,
            take=take_key,
            clear=keyholder.API_KEY.clear,
            worker_load=keyholder.load_from_fd,
        )
    return launch(
        secret,
        lambda: mitmdump_args(config, upstream, ns.setoptions, identity),
        workers,
        harden,
        sys.stderr,
    )


def command_main(argv: Sequence[str] | None = None) -> int:
    """``codex-proxy`` / ``./run.sh`` with no command: :func:`main`, named as invoked."""
    return main(argv, prog=invocation.command())


def record_main(argv: Sequence[str] | None = None) -> int:
    """``record DIR [FLAGS]``: the proxy with ``--record DIR`` (the key on stdin); exit 2 with
    the usage line when DIR is missing."""
    args = list(argv or [])
    parser = build_parser(invocation.prog("record"))
    parser.usage = "%(prog)s DIR [FLAGS]   (the API key on stdin; FLAGS: the proxy's, below)"
    parser.description = "The strict proxy, recording the session into DIR (docs/recording.md)."
    if args and args[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if not args or args[0].startswith("-"):
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{parser.prog}: error: the recording directory DIR comes first\n")
        return EXIT_ARGS
    return main(["--record", args[0], *args[1:]], parser=parser)


def take_key() -> bytearray:
    """``--workers``: the key line each worker reads from its pipe; the holder is cleared (the
    supervisor only keeps the line it hands each worker)."""
    line = keyholder.API_KEY.secret_line()
    keyholder.API_KEY.clear()
    return line


def identity_feed() -> Any:
    """``--github-oidc --workers N``: the supervisor renews, the workers follow."""
    return IdentityFeed()


if __name__ == "__main__":
    sys.exit(main())
