"""The gateway's check of an OIDC bearer token (issue 31, "members without static keys"):
which identity, if any, a JWT names (:mod:`addons.gateway_mode.identities`).

Signatures, times and audiences are PyJWT's (``jwt.decode`` with a ``PyJWK``); this module
only chooses the key and fetches it. The order of the checks, and the reason each refusal
names (:class:`IdentityRefused`, never the token):

1. Size (``too_large``): a bearer over :data:`MAX_TOKEN_CHARS` is refused unread.
2. Header (``malformed``, ``algorithm``): ``alg`` must be RS256 or ES256 (:data:`ALGORITHMS`;
   never ``none``, never HMAC, whatever the key set holds).
3. Issuer (``unknown_issuer``): the token's *unverified* ``iss`` only chooses which key set to
   use, among the issuers of live identities; no other issuer is ever fetched.
4. Key (``unknown_key``, or 503 ``issuer_unavailable``): by ``kid`` from the issuer's JWKS
   (``{issuer}/.well-known/openid-configuration`` → ``jwks_uri``, both ``https://``; the
   document's ``issuer`` must equal it). The key set is cached; an unknown ``kid`` fetches it
   again at most every :data:`REFETCH_S` seconds per issuer (a flood of made-up ``kid`` s
   costs one fetch), and after :data:`MAX_AGE_S` it is fetched again on use, the old one
   kept if that fails. Fetches are aiohttp's (on the event loop, never blocking it),
   :data:`FETCH_TIMEOUT_S` and :data:`MAX_DOCUMENT_BYTES` each, trusting the system's CAs
   (``SSL_CERT_FILE`` honoured), following no redirect and no proxy of the environment.
5. PyJWT (``signature``, ``expired``, ``not_yet_valid``, ``issued_at``, ``issuer``,
   ``audience``, ``missing_claim``): signature with that key and only its algorithm; ``exp``
   and ``iat`` required; ``exp``/``nbf``/``iat`` with :data:`LEEWAY_S` seconds of leeway;
   ``iss`` equal to the issuer; ``aud`` containing one of its identities' audiences.
6. Claims (``no_identity``): the first live identity of that issuer (oldest first) whose
   audience is in ``aud`` and whose claim patterns all match names the member.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt

from addons.gateway_mode.identities import claims_match
from addons.workload_identity import client_ssl_context

logger = logging.getLogger(__name__)

#: Signature algorithms accepted: asymmetric only (GitHub Actions signs RS256; ES256 is the
#: other common choice of IdPs). ``none`` and ``HS*`` are never accepted.
ALGORITHMS = ("RS256", "ES256")
_KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}
#: Seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``.
LEEWAY_S = 60
#: The largest bearer read as a token (GitHub's are ~1-2 KB; a header of 16 KB is generous).
MAX_TOKEN_CHARS = 16 * 1024
#: At most one key set fetch per issuer in this many seconds (after the first).
REFETCH_S = 5.0
#: A key set older than this is fetched again when used (keys rotate).
MAX_AGE_S = 3600.0
FETCH_TIMEOUT_S = 5.0
MAX_DOCUMENT_BYTES = 1024 * 1024
#: Three base64url segments, the first a JSON object (``eyJ``): what a compact JWS looks like.
JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class IdentityRefused(Exception):
    """A token the gateway will not accept: ``check`` (a short name of the failed check, see
    the module docstring), ``status`` (401, or 503 when the issuer could not be reached) and a
    message for the member that never holds the token."""

    def __init__(self, check: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.check, self.status = check, status


class FetchError(Exception):
    """A discovery or JWKS fetch that failed (the message names the URL's host, not more)."""


def looks_like_jwt(token: str) -> bool:
    """Whether a bearer is shaped as a compact JWS (so it is checked as an identity token)."""
    return JWT_SHAPE.fullmatch(token) is not None


def _session() -> aiohttp.ClientSession:
    """A client with the system's CAs (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` honoured:
    :func:`addons.workload_identity.client_ssl_context`), :data:`FETCH_TIMEOUT_S` in all,
    no proxy of the environment (the strict proxy's rule)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_ssl_context()),
        timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S),
        trust_env=False,
    )


async def fetch_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """GET ``url`` (``https://`` only, no redirect followed) and parse its JSON object body
    of at most :data:`MAX_DOCUMENT_BYTES`. Raises :class:`FetchError` (naming the host and
    the failure, never more of the URL)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    if parts.scheme != "https":
        raise FetchError(f"{url[:200]} is not https")
    body = bytearray()
    try:
        async with session.get(
            url, allow_redirects=False, headers={"Accept": "application/json"}
        ) as response:
            if response.status != 200:
                raise FetchError(f"{host} answered {response.status}")
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise FetchError(f"{host}: document over {MAX_DOCUMENT_BYTES} bytes")
    except FetchError:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
        raise FetchError(f"{host} unreachable ({type(e).__name__})") from None
    try:
        doc = json.loads(body)
    except ValueError:
        raise FetchError(f"{host}: not JSON") from None
    if not isinstance(doc, dict):
        raise FetchError(f"{host}: not a JSON object")
    return doc


async def fetch_key_set(issuer: str) -> dict[str, jwt.PyJWK]:
    """The signing keys of ``issuer`` by ``kid`` (OpenID Connect Discovery 1.0 §4: the
    configuration at ``{issuer}/.well-known/openid-configuration``, whose ``issuer`` must equal
    ``issuer``; its ``jwks_uri`` must be ``https://``). Only RSA and EC keys for
    :data:`ALGORITHMS`, not marked for encryption, are kept; a key without ``kid`` is kept
    under ``""``. Raises :class:`FetchError`."""
    async with _session() as session:
        config = await fetch_json(session, issuer.rstrip("/") + "/.well-known/openid-configuration")
        if config.get("issuer") != issuer:
            raise FetchError("the discovery document names another issuer")
        jwks_uri = config.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
            raise FetchError("the discovery document has no https jwks_uri")
        document = await fetch_json(session, jwks_uri)
    keys: dict[str, jwt.PyJWK] = {}
    for data in document.get("keys") or []:
        if not isinstance(data, dict) or data.get("use", "sig") != "sig":
            continue
        if data.get("kty") not in ("RSA", "EC"):
            continue
        try:
            key = jwt.PyJWK(data)
        except jwt.PyJWTError:
            continue
        if key.algorithm_name in ALGORITHMS:
            keys[str(data.get("kid", ""))] = key
    if not keys:
        raise FetchError("the key set holds no RS256 or ES256 key")
    return keys


@dataclass
class IssuerKeys:
    """One issuer's cached key set and when it was fetched (monotonic seconds)."""

    keys: dict[str, jwt.PyJWK] = field(default_factory=dict)
    fetched: float | None = None
    last_attempt: float | None = None
    error: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Verified:
    """A token that named a member: the directory ``entry`` of its identity, the token's
    ``subject`` (``sub``, at most 255 characters, ``None`` if absent) and ``expires`` (its
    ``exp``, epoch seconds)."""

    entry: dict[str, Any]
    subject: str | None
    expires: int


class OidcVerifier:
    """Checks identity tokens against the live identities (module docstring). One per gateway
    process; :meth:`load` takes the identities' directory rows
    (:func:`addons.gateway_mode.identities.directory_rows`) at each directory refresh.

    ``fetch``: the key set fetcher (a seam for tests; :func:`fetch_key_set`); ``fetches``
    counts its calls, for tests and the docs' flood figure."""

    def __init__(
        self, fetch: Callable[[str], Awaitable[dict[str, jwt.PyJWK]]] = fetch_key_set
    ) -> None:
        self._fetch = fetch
        self._by_issuer: dict[str, list[dict[str, Any]]] = {}
        self._issuers: dict[str, IssuerKeys] = {}
        self.fetches = 0

    def load(self, rows: list[dict[str, Any]]) -> None:
        """The live identities (oldest first), grouped by issuer."""
        by_issuer: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_issuer.setdefault(row["issuer"], []).append(row)
        self._by_issuer = by_issuer

    def knows(self, issuer: Any) -> bool:
        """Whether a live identity has this issuer."""
        return isinstance(issuer, str) and issuer in self._by_issuer

    async def verify(self, token: str, refresh: Callable[[], Any] | None = None) -> Verified:
        """The identity ``token`` names. ``refresh``: an awaitable-returning callable that
        reloads the directory (rate limited by its owner), tried once when no identity knows
        the token's issuer or none matches.

        Raises:
            IdentityRefused: the failed check (module docstring).
        """
        if len(token) > MAX_TOKEN_CHARS:
            raise IdentityRefused(
                "too_large", f"the bearer token is over {MAX_TOKEN_CHARS} characters; not read"
            )
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise IdentityRefused("malformed", "the bearer token is not a readable JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise IdentityRefused(
                "algorithm",
                f"token algorithm {str(alg)[:20]!r} is not accepted (only {', '.join(ALGORITHMS)})",
            )
        issuer = unverified.get("iss")
        if not self.knows(issuer) and refresh is not None:
            await refresh()
        if not self.knows(issuer):
            raise IdentityRefused(
                "unknown_issuer", "no identity of this gateway has the token's issuer (iss)"
            )
        assert isinstance(issuer, str)
        kid = header.get("kid", "")
        key = await self._key(issuer, str(kid) if isinstance(kid, str) else "")
        if key.algorithm_name != alg:
            raise IdentityRefused("algorithm", "the token's algorithm does not fit its key")
        candidates = self._by_issuer.get(issuer, [])
        audiences = sorted({c["audience"] for c in candidates})
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=audiences,
                issuer=issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.PyJWTError as e:
            raise _refusal(e) from None
        match = self._match(issuer, claims)
        if match is None and refresh is not None:
            await refresh()
            match = self._match(issuer, claims)
        if match is None:
            raise IdentityRefused(
                "no_identity",
                "the token is valid, but no identity's audience and claims match it",
            )
        sub = claims.get("sub")
        return Verified(match, sub[:255] if isinstance(sub, str) else None, int(claims["exp"]))

    def _match(self, issuer: str, claims: dict[str, Any]) -> dict[str, Any] | None:
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        for entry in self._by_issuer.get(issuer, []):
            if entry["audience"] in auds and claims_match(entry["claims"], claims):
                return entry
        return None

    async def _key(self, issuer: str, kid: str) -> jwt.PyJWK:
        state = self._issuers.setdefault(issuer, IssuerKeys())
        async with state.lock:  # concurrent requests share one fetch
            now = time.monotonic()
            stale = state.fetched is None or now - state.fetched > MAX_AGE_S
            may_fetch = state.last_attempt is None or now - state.last_attempt >= REFETCH_S
            if (stale or kid not in state.keys) and may_fetch:
                state.last_attempt = now
                self.fetches += 1
                try:
                    state.keys = await self._fetch(issuer)
                    state.fetched, state.error = time.monotonic(), None
                except FetchError as e:
                    state.error = str(e)
                    logger.warning("identity issuer %s: key set not fetched: %s", issuer, e)
                except Exception as e:  # a fetcher's bug must not pass a token
                    state.error = type(e).__name__
                    logger.error("identity issuer %s: key set fetch failed (%s)", issuer, e)
            key = state.keys.get(kid)
            if key is not None:
                return key
            if not state.keys:
                raise IdentityRefused(
                    "issuer_unavailable",
                    f"the token's issuer could not be reached to check it ({state.error}); "
                    "try again shortly",
                    503,
                )
            raise IdentityRefused(
                "unknown_key", "the token's key (kid) is not in its issuer's keys"
            )


def _refusal(e: jwt.PyJWTError) -> IdentityRefused:
    """PyJWT's exception as the failed check (most specific classes first)."""
    table: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
        (jwt.ExpiredSignatureError, "expired", f"the token has expired (leeway {LEEWAY_S} s)"),
        (jwt.ImmatureSignatureError, "not_yet_valid", "the token is not valid yet (nbf)"),
        (jwt.InvalidIssuedAtError, "issued_at", "the token's iat is in the future"),
        (jwt.InvalidAudienceError, "audience", "the token's aud names no identity's audience"),
        (jwt.InvalidIssuerError, "issuer", "the token's iss is not its identity's issuer"),
        (jwt.MissingRequiredClaimError, "missing_claim", "the token lacks a required claim"),
        (jwt.InvalidSignatureError, "signature", "the token's signature does not verify"),
        (jwt.InvalidAlgorithmError, "algorithm", "the token's algorithm is not accepted"),
    )
    for kind, check, message in table:
        if isinstance(e, kind):
            if isinstance(e, jwt.MissingRequiredClaimError):
                message += f" ({e.claim})"
            return IdentityRefused(check, message)
    return IdentityRefused("malformed", "the bearer token is not a valid JWT")


#: The ``REFUSED`` reason of an identity token's refusal: its 401 reaches Codex as 401 (not
#: the 400 of a bad member key), so Codex runs its auth command again and retries.
IDENTITY_REFUSAL = "identity-auth"


def identity_bearer(value: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value when it is to be checked as an
    identity token: shaped as a JWT (:func:`looks_like_jwt`), or any bearer longer than
    :data:`MAX_TOKEN_CHARS` that is no member key (refused unread). ``None`` otherwise (the
    member key path decides). Never raises."""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token or token.startswith("sk-codex-gw-"):
        return None
    if len(token) > MAX_TOKEN_CHARS or looks_like_jwt(token):
        return token
    return None
