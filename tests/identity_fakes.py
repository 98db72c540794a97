"""Loopback HTTPS stand-ins for GitHub's OIDC token endpoint and OpenAI's token endpoint,
behind a throwaway CA (``--github-oidc`` tests).

One aiohttp server (``addons.aio_server.ThreadedServer``) with a leaf for 127.0.0.1 signed by a
CA made with mitmproxy's ``CertStore`` (the ``cryptography`` package): ``GET /github/token``
answers ``{"value": <jwt>}`` to ``Authorization: bearer <request token>``, ``POST
/oauth/token`` exchanges a JWT it issued for an access token. Every secret it hands out carries
a recognisable marker so leak scans can grep for it.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from addons.aio_server import ThreadedServer
from addons.workload_identity import ISSUED_TOKEN_TYPE

#: The GitHub request token the tests pipe to the proxy (the runner's
#: ACTIONS_ID_TOKEN_REQUEST_TOKEN); alphabet of the reference's rule.
REQUEST_TOKEN = "ghreq-REQLEAKCHECK.0123456789~abc+def/ghi="  # noqa: S105 - a fake
JWT_MARK = "JWTLEAKCHECK"
ACCESS_MARK = "ATLEAKCHECK"


def make_ca_and_leaf(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A throwaway CA in ``directory`` and a server context with a 127.0.0.1 leaf it signed.
    Returns the CA certificate's PEM path (for ``SSL_CERT_FILE``) and the context."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from mitmproxy import certs

    store = certs.CertStore.from_store(directory / "ca", "oidc-testca", 2048)
    entry = store.get_cert("127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert_file, key_file = directory / "leaf.pem", directory / "leaf.key"
    cert_file.write_bytes(entry.cert.to_pem())
    key_file.write_bytes(
        entry.privatekey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return directory / "ca" / "oidc-testca-ca-cert.pem", context


@dataclass
class Seen:
    """One request the fakes got: path with query, headers (lower-case names), body."""

    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class IdentityFakes:
    """The two endpoints. Steer with ``lifetime`` (``expires_in`` of each access token),
    ``exchange_status`` (non-200: refuse exchanges with it), ``github_status``, ``reply``
    (overrides the exchange reply object). ``access_tokens`` / ``jwts``: what was issued."""

    directory: Path
    lifetime: int = 3600
    exchange_status: int = 200
    github_status: int = 200
    reply: dict[str, Any] | None = None
    seen: list[Seen] = field(default_factory=list)
    jwts: list[str] = field(default_factory=list)
    access_tokens: list[str] = field(default_factory=list)
    ca_file: Path | None = None
    port: int = 0
    _server: ThreadedServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def request_url(self) -> str:
        """What the runner's ACTIONS_ID_TOKEN_REQUEST_URL looks like (it carries a query)."""
        return f"https://127.0.0.1:{self.port}/github/token?api-version=2.0"

    @property
    def token_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/oauth/token"

    def secrets(self) -> list[str]:
        return [REQUEST_TOKEN, *self.jwts, *self.access_tokens]

    async def _github(self, request: web.Request) -> web.Response:
        self.seen.append(
            Seen("GET", request.path_qs, {k.lower(): v for k, v in request.headers.items()}, b"")
        )
        if request.headers.get("authorization") != f"bearer {REQUEST_TOKEN}":
            return web.json_response({"message": "bad credentials"}, status=401)
        if self.github_status != 200:
            return web.json_response({"message": "down"}, status=self.github_status)
        with self._lock:
            jwt = f"eyJhbGciOiJSUzI1NiJ9.{JWT_MARK}{len(self.jwts) + 1}.c2lnbmF0dXJl"
            self.jwts.append(jwt)
        return web.json_response({"count": 1, "value": jwt})

    async def _exchange(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(
            Seen("POST", request.path_qs, {k.lower(): v for k, v in request.headers.items()}, body)
        )
        if self.exchange_status != 200:
            return web.json_response(
                {"error": "temporarily_unavailable"}, status=self.exchange_status
            )
        doc = json.loads(body)
        if doc.get("subject_token") not in self.jwts:
            return web.json_response({"error": "invalid_grant"}, status=400)
        if self.reply is not None:
            return web.json_response(self.reply)
        with self._lock:
            token = f"at-{ACCESS_MARK}-{len(self.access_tokens) + 1}"
            self.access_tokens.append(token)
        return web.json_response(
            {
                "access_token": token,
                "issued_token_type": ISSUED_TOKEN_TYPE,
                "token_type": "Bearer",
                "expires_in": self.lifetime,
            }
        )

    def start(self) -> IdentityFakes:
        self.ca_file, context = make_ca_and_leaf(self.directory)
        app = web.Application()
        app.router.add_get("/github/token", self._github)
        app.router.add_post("/oauth/token", self._exchange)
        self._server = ThreadedServer(app, "identity-fakes", ssl_context=context)
        self.port = self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def exchanges(self) -> list[Seen]:
        return [s for s in self.seen if s.path_qs.startswith("/oauth/token")]
