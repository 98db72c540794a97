"""``codex-proxy token github-actions|oidc``: print a short-lived bearer token for a gateway.

Codex's command-backed provider auth (``[model_providers.NAME.auth]``, printed by
``codex-config --gateway --auth-command``) runs one of these, takes its stdout (trimmed) as the
bearer and runs it again every ``refresh_interval_ms`` and after a 401, so a gateway member
holds no stored key. The gateway verifies the token (an OIDC identity mapped to a member).

- ``github-actions --audience AUD``: the job's GitHub Actions OIDC ID token, asked of the
  runner at ``$ACTIONS_ID_TOKEN_REQUEST_URL`` with ``$ACTIONS_ID_TOKEN_REQUEST_TOKEN``, with the
  strict proxy's ``--github-oidc`` rules and code (:mod:`addons.workload_identity`: the
  request token's alphabet and size, an HTTPS URL without user info or fragment, the
  ``&audience=`` request). ``--github-oidc-request-url`` overrides the variable (a test seam,
  as in the strict proxy).
- ``oidc --issuer URL --client-id ID``: a person's ID token from the team's OpenID provider
  (:mod:`addons.oidc_client`: device-flow sign-in the first time, then refresh).

stdout carries the token and nothing else (one line); every error is one line on stderr and
exit 1 (2 for usage), never a token.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shlex
import sys
from collections.abc import Sequence
from typing import TextIO

from addons import oidc_client, workload_identity
from addons.invocation import prog
from addons.secret_memory import zero

REQUEST_URL_ENV = "ACTIONS_ID_TOKEN_REQUEST_URL"
REQUEST_TOKEN_ENV = "ACTIONS_ID_TOKEN_REQUEST_TOKEN"  # noqa: S105 - a variable name
EXIT_FAILED = 1
HINT_PERMISSIONS = "does the job have `permissions: id-token: write`?"


class TokenError(Exception):
    """A helper failed; the message is one line without a secret."""


async def _github_jwt(request_url: str, audience: str, request_token: bytearray) -> bytearray:
    settings = workload_identity.IdentitySettings(
        audience=audience, identity_provider_id="-", service_account_id="-", request_url=request_url
    )
    async with workload_identity._session() as session:
        return await workload_identity.fetch_github_jwt(session, settings, request_token)


def github_actions_token(
    audience: str, request_url: str | None = None, environ: dict[bytes, bytes] | None = None
) -> str:
    """The job's GitHub OIDC token for ``audience``.

    ``request_url``: the runner's URL (default ``$ACTIONS_ID_TOKEN_REQUEST_URL``); the request
    token is ``$ACTIONS_ID_TOKEN_REQUEST_TOKEN`` (bytes of ``environ``, default the process's).

    Raises:
        TokenError: a variable is missing, breaks the reference's rules
            (:func:`addons.workload_identity.validate_request_url`,
            :func:`addons.workload_identity.read_request_token`), or the request failed.
    """
    env = os.environb if environ is None else environ
    if not audience.strip():
        raise TokenError("--audience must not be empty")
    if request_url is None:
        raw_url = env.get(REQUEST_URL_ENV.encode())
        if not raw_url:
            raise TokenError(f"{REQUEST_URL_ENV} is not set ({HINT_PERMISSIONS})")
        request_url = raw_url.decode("utf-8", "replace")
    raw_token = env.get(REQUEST_TOKEN_ENV.encode())
    if not raw_token:
        raise TokenError(f"{REQUEST_TOKEN_ENV} is not set ({HINT_PERMISSIONS})")
    try:
        workload_identity.validate_request_url(request_url)
        body = raw_token.rstrip(b"\r\n")
        if b"\n" in body:  # the reference reads one line; a variable holds no second one
            raise workload_identity.WorkloadIdentityError(workload_identity.MSG_INVALID_CREDENTIAL)
        token = workload_identity.read_request_token(io.BytesIO(body + b"\n"))
        try:
            jwt = asyncio.run(_github_jwt(request_url, audience, token))
        finally:
            zero(token)
    except workload_identity.WorkloadIdentityError as e:
        raise TokenError(e.oneline()) from None
    try:
        text = jwt.decode("ascii")
    finally:
        zero(jwt)
    if any(c.isspace() for c in text):
        raise TokenError(f"{workload_identity.MSG_GITHUB_FAILED} (the value is not a token)")
    return text


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def oidc_token(ns: argparse.Namespace, err: TextIO) -> str:
    """``token oidc``: see :func:`addons.oidc_client.id_token`.

    Raises: TokenError."""
    request = oidc_client.Request(ns.issuer, ns.client_id, ns.audience, ns.scope)
    again = " ".join(
        shlex.quote(w)
        for w in [
            *prog("token").split(" "),
            "oidc",
            "--issuer",
            ns.issuer,
            "--client-id",
            ns.client_id,
            *(["--audience", ns.audience] if ns.audience else []),
            *(["--scope", ns.scope] if ns.scope != oidc_client.DEFAULT_SCOPE else []),
        ]
    )
    store = oidc_client.TokenStore.for_client(ns.issuer, ns.client_id)
    try:
        return asyncio.run(oidc_client.id_token(request, store, err, _is_terminal(err), again))
    except oidc_client.OidcError as e:
        raise TokenError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    """``token``'s parser, with one subcommand per helper."""
    top = argparse.ArgumentParser(
        prog=prog("token"),
        description="Print a short-lived bearer token for a gateway on stdout (for Codex's "
        "command-backed provider auth: codex-config --gateway --auth-command).",
    )
    helpers = top.add_subparsers(dest="helper", required=True, metavar="HELPER")
    gh = helpers.add_parser(
        "github-actions",
        help="the job's GitHub Actions OIDC token (needs permissions: id-token: write)",
        description="Print the job's GitHub Actions OIDC ID token for AUD, asked of the runner "
        f"(${REQUEST_URL_ENV}, ${REQUEST_TOKEN_ENV}).",
    )
    gh.add_argument("--audience", required=True, help="the token's aud (the gateway's identity)")
    gh.add_argument(
        "--github-oidc-request-url",
        metavar="URL",
        help=f"the runner's token-request URL (default ${REQUEST_URL_ENV}); a test seam",
    )
    people = helpers.add_parser(
        "oidc",
        help="a person's ID token from the team's OpenID provider (device-flow sign-in once)",
        description="Print an ID token from ISSUER. The first run signs you in with the device "
        "flow (run it once in a terminal: it prints a URL and a code on stderr); later runs "
        "refresh it without asking. The refresh token is kept in a 0600 file under "
        f"{oidc_client.config_dir()}/oidc/.",
    )
    people.add_argument("--issuer", required=True, metavar="URL", help="the provider (https)")
    people.add_argument("--client-id", required=True, metavar="ID", help="a public client's id")
    people.add_argument(
        "--audience",
        metavar="AUD",
        help="print the token (ID token, else a JWT access token) whose aud holds AUD; sent as "
        "the audience parameter (default: the ID token, whose aud is the client id)",
    )
    people.add_argument(
        "--scope",
        default=oidc_client.DEFAULT_SCOPE,
        help=f"scopes to ask for (default {oidc_client.DEFAULT_SCOPE!r}: offline_access brings "
        "the refresh token)",
    )
    return top


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """``codex-proxy token HELPER ...``; returns the exit code."""
    out = out or sys.stdout
    err = sys.stderr
    ns = parser().parse_args(argv)
    try:
        if ns.helper == "github-actions":
            token = github_actions_token(ns.audience, ns.github_oidc_request_url)
        else:
            token = oidc_token(ns, err)
    except TokenError as e:
        err.write(f"{prog('token')} {ns.helper}: {e}\n")
        return EXIT_FAILED
    out.write(token + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
