"""A real OpenID provider on loopback (npm's ``oidc-provider``, run by ``tests/oidc_provider.mjs``)
behind a throwaway CA, and a programmatic person who signs in on its device-flow pages.

Reusable: ``with OidcProvider(tmp_path).start() as idp:`` gives ``idp.issuer``
(``https://127.0.0.1:PORT``), ``idp.ca_file`` (for ``SSL_CERT_FILE``), ``idp.client_id`` (a
public device-flow client: ``token_endpoint_auth_method: none``, grants device_code and
refresh_token, so ``offline_access`` brings a refresh token), ``idp.paths()`` (the requests it
got, method and path only). :func:`sign_in` plays the person: it opens the verification URL,
enters the user code, logs in through the provider's development login (any login/password; the
ID token's ``sub`` is the login, ``email`` ``login@example.test``) and consents (or aborts, for
``access_denied``). :func:`device_sign_in` runs a ``codex-proxy token oidc`` command through its
first sign-in and returns the token it printed: the end-to-end tests' one-liner. For them
too: :func:`provider` (a fixture body), :func:`token_argv`, :func:`env_for`, :func:`store_file`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

from tests.identity_fakes import make_ca_and_leaf

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "oidc_provider.mjs"
CLIENT_ID = "codex-cli"
START_TIMEOUT_S = 30.0


def node_ready() -> str | None:
    """Why the provider cannot run here (no node, or ``npm install`` not done), else ``None``."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (ROOT / "node_modules" / "oidc-provider" / "package.json").exists():
        return "node_modules/oidc-provider is missing (./run.sh test installs package.json)"
    return None


def device_client(client_id: str = CLIENT_ID) -> dict[str, Any]:
    """oidc-provider metadata of a public device-flow client."""
    return {
        "client_id": client_id,
        "client_name": "Codex CLI (test)",
        "token_endpoint_auth_method": "none",
        "grant_types": ["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"],
        "response_types": [],
        "redirect_uris": [],
        "application_type": "native",
    }


@dataclass
class OidcProvider:
    """The provider process. ``id_token_ttl`` (s): lifetime of its ID tokens."""

    directory: Path
    id_token_ttl: int = 3600
    clients: list[dict[str, Any]] = field(default_factory=lambda: [device_client()])
    issuer: str = ""
    port: int = 0
    ca_file: Path | None = None
    _proc: subprocess.Popen[bytes] | None = None
    _log: list[dict[str, str]] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def client_id(self) -> str:
        return str(self.clients[0]["client_id"])

    def start(self) -> OidcProvider:
        """Make the CA and leaf, start node, wait (bounded) for its ``{"issuer"}`` line.

        Raises: RuntimeError: it did not start (its stderr in the message)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_file, _ = make_ca_and_leaf(self.directory)
        config = self.directory / "oidc-provider.json"
        config.write_text(
            json.dumps(
                {
                    "cert": str(self.directory / "leaf.pem"),
                    "key": str(self.directory / "leaf.key"),
                    "clients": self.clients,
                    "id_token_ttl": self.id_token_ttl,
                }
            )
        )
        self._proc = subprocess.Popen(
            ["node", str(SCRIPT), str(config)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "NODE_ENV": "test"},
        )
        line = _readline_within(self._proc.stdout, START_TIMEOUT_S)
        if not line:
            self.stop()
            raise RuntimeError(f"oidc-provider did not start: {self.stderr_text()}")
        info = json.loads(line)
        self.issuer, self.port = info["issuer"], info["port"]
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        return self

    def _read_log(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for raw in self._proc.stderr:
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = {"other": raw.decode("utf-8", "replace").rstrip()}
            self._log.append(entry if isinstance(entry, dict) else {"other": str(entry)})

    def paths(self) -> list[str]:
        """``"METHOD /path"`` of every request so far."""
        return [f"{e['method']} {e['path']}" for e in list(self._log) if "method" in e]

    def stderr_text(self) -> str:
        return "\n".join(e.get("other", "") for e in self._log if "other" in e)

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the throwaway CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            if self._reader is not None:
                self._reader.join(10)  # EOF once the process is gone
            for pipe in (self._proc.stdout, self._proc.stderr):
                if pipe is not None:
                    pipe.close()
            self._proc = None

    def __enter__(self) -> OidcProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _readline_within(stream: Any, timeout_s: float) -> bytes:
    """One line of ``stream``, or ``b""`` when none came within ``timeout_s``."""
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return result[0] if result else b""


class _Forms(HTMLParser):
    """The forms of a page: ``{"id", "action", "method", "fields"}``, fields from ``<input>``."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self._open = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append({"id": a.get("id", ""), "action": a.get("action", ""), "fields": {}})
            self._open = True
        elif tag == "input" and self._open and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._open = False


def forms_of(html: str) -> list[dict[str, Any]]:
    parser = _Forms()
    parser.feed(html)
    return parser.forms


async def _sign_in(
    url: str, user_code: str | None, login: str, context: ssl.SSLContext, deny: bool
) -> str:
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for a host that is an IP address
    async with aiohttp.ClientSession(
        cookie_jar=jar, connector=aiohttp.TCPConnector(ssl=context), trust_env=False
    ) as session:
        async with session.get(url) as reply:
            page, where = await reply.text(), reply.url
        for _ in range(8):
            if "Sign-in Success" in page or "Sign-in Cancelled" in page:
                return page
            forms = forms_of(page)
            if not forms:
                return page
            form = forms[0]
            fields = dict(form["fields"])
            if "user_code" in fields and not fields["user_code"] and user_code:
                fields["user_code"] = user_code
            if "login" in fields or form["action"].endswith("/login"):
                fields.update(login=login, password="any")  # noqa: S106 - dev login
            if form["id"] == "op.deviceConfirmForm" and deny:
                fields["abort"] = "yes"
            target = where.join(yarl.URL(form["action"]))
            async with session.post(target, data=fields) as reply:
                page, where = await reply.text(), reply.url
        return page


def sign_in(
    idp: OidcProvider,
    url: str,
    user_code: str | None = None,
    login: str = "alice",
    deny: bool = False,
) -> str:
    """Play the person at ``url`` (the verification URI, complete or not with ``user_code``):
    enter the code, log in as ``login``, consent (``deny``: abort). Returns the last page's HTML
    (the provider's "Sign-in Success" page when it worked)."""
    return asyncio.run(_sign_in(url, user_code, login, idp.ssl_context(), deny))


URL_LINE = re.compile(r"^\s+open (https://\S+)")
CODE_LINE = re.compile(r"(?:enter the code|shows the code) (\S+)$")


@dataclass
class DeviceRun:
    """A finished ``token oidc`` run: exit code, stdout, stderr, the page the person saw."""

    returncode: int
    stdout: str
    stderr: str
    page: str


def device_sign_in(
    idp: OidcProvider,
    argv: Sequence[str],
    env: dict[str, str],
    login: str = "alice",
    deny: bool = False,
    timeout_s: float = 90.0,
) -> DeviceRun:
    """Run ``argv`` (a ``codex-proxy token oidc ...`` command, ``env`` with ``SSL_CERT_FILE`` and
    ``XDG_CONFIG_HOME``) through its device-flow sign-in: read the URL and code it prints on
    stderr, sign in as ``login`` (:func:`sign_in`), wait (bounded) for it to end."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stderr is not None and proc.stdout is not None
    err_lines: list[str] = []
    url = code = None
    while url is None or code is None:
        line = _readline_within(proc.stderr, timeout_s).decode("utf-8", "replace")
        if not line:
            break
        err_lines.append(line)
        url = url or (m.group(1) if (m := URL_LINE.match(line)) else None)
        code = code or (m.group(1) if (m := CODE_LINE.search(line.rstrip())) else None)
    page = sign_in(idp, url, code, login, deny) if url else ""
    try:
        out, rest = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, rest = proc.communicate()
    return DeviceRun(proc.returncode, out.decode(), "".join(err_lines) + rest.decode(), page)


def provider(tmp_path: Path, **kwargs: Any) -> Iterator[OidcProvider]:
    """A fixture body: ``yield from provider(tmp_path)`` gives a started provider (``kwargs``
    to :class:`OidcProvider`), stopped afterwards; skipped without node / node_modules, a
    failure under ``CI=true``."""
    why = node_ready()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    with OidcProvider(tmp_path / "idp", **kwargs).start() as idp:
        yield idp


def token_argv(idp: OidcProvider, *extra: str) -> list[str]:
    """``codex-proxy token oidc --issuer <idp> --client-id <its client>`` (+ ``extra``)."""
    return [
        sys.executable,
        "-m",
        "addons.commands",
        "token",
        "oidc",
        "--issuer",
        idp.issuer,
        "--client-id",
        idp.client_id,
        *extra,
    ]


def env_for(idp: OidcProvider, config: Path) -> dict[str, str]:
    """This environment, trusting the provider's CA, with ``XDG_CONFIG_HOME=config`` (where
    the helper keeps its sign-in)."""
    return {**os.environ, "SSL_CERT_FILE": str(idp.ca_file), "XDG_CONFIG_HOME": str(config)}


def store_file(config: Path) -> Path:
    """The helper's one sign-in file under ``config`` (``XDG_CONFIG_HOME``)."""
    (path,) = (config / "codex-proxy" / "oidc").glob("*.json")
    return path
