"""A loopback OpenID Connect issuer for the gateway's identity tests (issue 31): discovery and
JWKS over HTTPS behind a throwaway CA (``SSL_CERT_FILE``), and tokens it signs.

One aiohttp server (``addons.aio_server.ThreadedServer``, the leaf of
:func:`tests.identity_fakes.make_ca_and_leaf`) holds any number of named issuers, each at
``https://127.0.0.1:PORT/<name>``: ``GET /<name>/.well-known/openid-configuration`` and ``GET
/<name>/jwks``, each counted (``fetches``), each able to fail on demand (``down``). Every
issuer has an RS256 and an ES256 key (kids ``<name>-rs`` / ``<name>-es`` unless told).
Tokens carry :data:`TOKEN_MARK` in a claim so leak scans can grep for them.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from addons.aio_server import ThreadedServer
from tests.identity_fakes import make_ca_and_leaf

#: The runner's ``ACTIONS_ID_TOKEN_REQUEST_TOKEN`` its runner-like endpoint accepts.
ACTIONS_REQUEST_TOKEN = "ghreq-IDTOKLEAKCHECK-request"  # noqa: S105 - a fake

#: In the ``jti`` of every token minted here: a leak scan looks for it.
TOKEN_MARK = "IDTOKLEAKCHECK"  # noqa: S105 - a marker

#: The claims GitHub Actions puts in a job's OIDC token (docs.github.com, "About security
#: hardening with OpenID Connect"), for a push to main of octo-org/octo-repo.
GITHUB_CLAIMS = {
    "sub": "repo:octo-org/octo-repo:ref:refs/heads/main",
    "repository": "octo-org/octo-repo",
    "repository_owner": "octo-org",
    "repository_owner_id": "5412",
    "ref": "refs/heads/main",
    "workflow": "ci",
    "job_workflow_ref": "octo-org/octo-repo/.github/workflows/ci.yml@refs/heads/main",
    "event_name": "push",
    "actor": "octocat",
}


@dataclass
class Issuer:
    """One issuer: its keys by kid (private keys; the JWKS shows the public halves)."""

    name: str
    url: str
    keys: dict[str, Any] = field(default_factory=dict)
    down: bool = False
    #: In place of ``{url}/jwks`` in the discovery document (e.g. an ``http://`` one).
    jwks_uri: str | None = None
    #: The discovery document answers a 302 to this URL instead.
    redirect: str | None = None


@dataclass
class OidcIssuers:
    """The server and its issuers (:meth:`add`); ``fetches`` counts requests by path."""

    directory: Path
    port: int = 0
    ca_file: Path | None = None
    issuers: dict[str, Issuer] = field(default_factory=dict)
    fetches: Counter[str] = field(default_factory=Counter)
    minted: list[str] = field(default_factory=list)
    #: Lifetime (s) of the tokens its runner-like endpoint hands out.
    actions_lifetime: float = 300
    _server: ThreadedServer | None = None

    def start(self) -> OidcIssuers:
        self.ca_file, context = make_ca_and_leaf(self.directory)
        app = web.Application()
        app.router.add_get("/{name}/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/{name}/jwks", self._jwks)
        app.router.add_get("/{name}/actions-token", self._actions_token)
        self._server = ThreadedServer(app, "oidc-issuer", ssl_context=context)
        self.port = self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def add(self, name: str, kids: tuple[str, str] | None = None) -> Issuer:
        """A new issuer with an RS256 and an ES256 key (``kids``: their kids)."""
        rs_kid, es_kid = kids or (f"{name}-rs", f"{name}-es")
        issuer = Issuer(name, f"https://127.0.0.1:{self.port}/{name}")
        issuer.keys[rs_kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        issuer.keys[es_kid] = ec.generate_private_key(ec.SECP256R1())
        self.issuers[name] = issuer
        return issuer

    def jwks_fetches(self, name: str) -> int:
        return self.fetches[f"/{name}/jwks"]

    def mint(
        self,
        name: str,
        audience: str | list[str],
        alg: str = "RS256",
        lifetime: float = 300,
        claims: dict[str, Any] | None = None,
        kid: str | None = None,
        key: Any = None,
        issued: float | None = None,
    ) -> str:
        """A token of issuer ``name``: ``iss``, ``aud``, ``iat``/``exp`` (``lifetime`` s from
        ``issued``, default now), a ``jti`` with :data:`TOKEN_MARK`, then ``claims``
        (which may override any of them). Signed with its key for ``alg`` unless ``key`` (and
        ``kid``) are given."""
        issuer = self.issuers[name]
        if kid is None:
            kid = next(
                k
                for k, v in issuer.keys.items()
                if isinstance(v, rsa.RSAPrivateKey) == (alg == "RS256")
            )
        now = time.time() if issued is None else issued
        payload = {
            "iss": issuer.url,
            "aud": audience,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + lifetime),
            "jti": f"{TOKEN_MARK}-{len(self.minted) + 1}",
            **(claims or {}),
        }
        signing = key if key is not None else issuer.keys[kid]
        token = jwt.encode(payload, signing, algorithm=alg, headers={"kid": kid})
        self.minted.append(token)
        return token

    def actions_request_url(self, name: str) -> str:
        """A GitHub runner's ``ACTIONS_ID_TOKEN_REQUEST_URL`` for issuer ``name``: ``GET`` it
        with ``&audience=AUD`` and ``Authorization: bearer <ACTIONS_REQUEST_TOKEN>`` for
        ``{"value": <a token of that issuer for AUD, with GitHub's claims>}``."""
        return f"https://127.0.0.1:{self.port}/{name}/actions-token?api-version=2.0"

    async def _actions_token(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.fetches[request.path] += 1
        if request.headers.get("authorization") != f"bearer {ACTIONS_REQUEST_TOKEN}":
            return web.json_response({"message": "bad credentials"}, status=401)
        audience = request.query.get("audience")
        if name not in self.issuers or not audience:
            return web.json_response({"message": "no such issuer or no audience"}, status=400)
        token = self.mint(name, audience, claims=GITHUB_CLAIMS, lifetime=self.actions_lifetime)
        return web.json_response({"count": 1, "value": token})

    async def _discovery(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.fetches[request.path] += 1
        issuer = self.issuers.get(name)
        if issuer is None or issuer.down:
            return web.json_response({"error": "down"}, status=503)
        if issuer.redirect is not None:
            raise web.HTTPFound(issuer.redirect)
        return web.json_response(
            {
                "issuer": issuer.url,
                "jwks_uri": issuer.jwks_uri or f"{issuer.url}/jwks",
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.fetches[request.path] += 1
        issuer = self.issuers.get(name)
        if issuer is None or issuer.down:
            return web.json_response({"error": "down"}, status=503)
        keys = []
        for kid, private in issuer.keys.items():
            alg = "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
            public = jwt.algorithms.get_default_algorithms()[alg].to_jwk(
                private.public_key(), as_dict=True
            )
            keys.append({**public, "kid": kid, "use": "sig", "alg": alg})
        return web.json_response({"keys": keys})
