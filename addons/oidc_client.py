"""``codex-proxy token oidc``: a person's ID token from the team's OpenID provider, for Codex.

The first run signs the person in with the OAuth 2.0 device authorization grant (RFC 8628):
discovery (``{issuer}/.well-known/openid-configuration``, OpenID Connect Discovery 1.0: its
``issuer`` must equal ours) gives ``device_authorization_endpoint`` and ``token_endpoint``; the
verification URL and user code go to stderr; the token endpoint is polled every ``interval``
seconds (5 when not given, RFC 8628 §3.5), 5 s more after each ``slow_down``, until the tokens
come, ``access_denied``, ``expired_token`` or the code's ``expires_in`` runs out. The refresh
token is kept in a 0600 file (:class:`TokenStore`, one per issuer and client id, under
``$XDG_CONFIG_HOME/codex-proxy/oidc/`` or ``~/.config/codex-proxy/oidc/``, directories 0700);
every later run prints a fresh ID token without asking: the cached one while it has more than
:data:`CACHE_MARGIN_S` left (Codex runs the command every few minutes and after each 401, so
most runs make no request), else one from the refresh grant (RFC 6749 §6; a rotated refresh
token replaces the old one). A refused refresh (``invalid_grant``: the sign-in expired or was
revoked) starts the device flow again when stderr is a terminal, else fails with one line that
says to run the command once in a terminal. Runs are serialised by an ``flock`` on the store's
lock file, so two runs of Codex at once never spend the same rotating refresh token twice.

HTTPS only (the issuer and both endpoints); the trusted CAs are the system's or
``SSL_CERT_FILE`` / ``SSL_CERT_DIR``'s (``ssl.create_default_context``). HTTP is aiohttp's. No
token, code or reply body ever reaches a message: errors name the step, the HTTP status and
the OAuth ``error`` code only. The JWT payload is read (not verified: the gateway verifies
it) only for ``exp`` and ``aud``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp

DEFAULT_SCOPE = "openid email offline_access"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
#: RFC 8628 §3.5: the polling interval when the server names none, and the increase on slow_down.
DEFAULT_INTERVAL_S = 5
SLOW_DOWN_STEP_S = 5
#: A cached ID token is printed again while it has more than this many seconds left.
CACHE_MARGIN_S = 120
#: Seconds each HTTP request may take in all (Codex's ``timeout_ms`` bounds a whole run).
HTTP_TIMEOUT_S = 20.0
#: Largest reply read from the provider (bytes).
MAX_REPLY_BYTES = 1 << 20


class OidcError(Exception):
    """A sign-in or refresh failed. The message is one line for the user, with no secret."""


class InvalidGrant(OidcError):
    """The token endpoint refused the refresh token (``invalid_grant``)."""


@dataclass(frozen=True)
class Endpoints:
    """What discovery found: the issuer and its two endpoints (all ``https``)."""

    issuer: str
    device_authorization_endpoint: str
    token_endpoint: str


def validate_https_url(url: str, what: str) -> None:
    """``url`` must be an absolute ``https`` URL with a host, no user info and no fragment.

    Raises:
        OidcError: naming ``what`` (the URL itself is not secret and is shown).
    """
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise OidcError(f"{what} is not a valid URL: {url!r}") from None
    if (
        parts.scheme.lower() != "https"
        or not parts.hostname
        or parts.username
        or parts.password
        or "#" in url
        or any(c.isspace() for c in url)
    ):
        raise OidcError(f"{what} must be an https URL without user info or fragment: {url!r}")


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, decoded but NOT verified (for ``exp`` and ``aud`` only);
    ``{}`` when ``token`` is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}


def audiences(claims: dict[str, Any]) -> list[str]:
    """``aud`` as a list (a JWT may carry one string or an array)."""
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    return [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []


def pick_token(tokens: dict[str, Any], audience: str | None) -> str:
    """The token to print from a token-endpoint reply: the ID token; with ``audience``, the
    first of the ID token and the access token that is a JWT whose ``aud`` holds it (an IdP
    that issues JWT access tokens for an API audience, as Auth0 does with ``audience=``).

    Raises:
        OidcError: no ID token (``openid`` missing from the scope?), or none for ``audience``.
    """
    candidates = [tokens.get("id_token"), tokens.get("access_token") if audience else None]
    usable = [t for t in candidates if isinstance(t, str) and t and t.isascii()]
    if audience is None:
        if not usable:
            raise OidcError("the provider sent no ID token (is openid in --scope?)")
        return usable[0]
    for token in usable:
        if audience in audiences(jwt_claims(token)):
            return token
    seen = sorted({a for t in usable for a in audiences(jwt_claims(t))})
    raise OidcError(f"the provider sent no token for audience {audience!r} (audiences: {seen})")


def config_dir(environ: dict[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/codex-proxy``, or ``~/.config/codex-proxy`` (XDG Base Directory)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "codex-proxy"


@dataclass
class TokenStore:
    """The sign-in of one issuer and client id: a JSON file, mode 0600, in a 0700 directory.

    Fields: ``refresh_token``, and the cached ``id_token`` with its ``exp`` (Unix seconds), the
    ``audience`` and ``scope`` it was got for. :meth:`locked` holds an exclusive ``flock`` on
    ``<file>.lock`` for a whole run. ``repr`` never shows a token.
    """

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_client(cls, issuer: str, client_id: str, directory: Path | None = None) -> TokenStore:
        """The store of ``issuer`` + ``client_id`` (a file named by their SHA-256)."""
        key = hashlib.sha256(f"{issuer}\0{client_id}".encode()).hexdigest()[:32]
        return cls((directory or config_dir()) / "oidc" / f"{key}.json")

    def __repr__(self) -> str:
        return f"<TokenStore {self.path} keys={sorted(self.data)}>"

    def _make_dirs(self) -> None:
        for d in (self.path.parent.parent, self.path.parent):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if d.stat().st_mode & 0o077:
                d.chmod(0o700)

    @contextlib.contextmanager
    def locked(self) -> Iterator[TokenStore]:
        """Load the file under an exclusive lock held until the block ends."""
        self._make_dirs()
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.load()
            yield self
        finally:
            os.close(fd)  # releases the lock

    def load(self) -> None:
        """Read the file (an unreadable or missing one is an empty store)."""
        try:
            if self.path.stat().st_mode & 0o077:
                self.path.chmod(0o600)
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = {}
        self.data = doc if isinstance(doc, dict) else {}

    def save(self) -> None:
        """Write the file atomically (a 0600 temporary file, then ``os.replace``)."""
        self._make_dirs()
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def cached_token(self, audience: str | None, scope: str, now: float) -> str | None:
        """The cached ID token when it was got for ``audience`` and ``scope`` and has more than
        :data:`CACHE_MARGIN_S` left, else ``None``."""
        token, exp = self.data.get("id_token"), self.data.get("id_token_exp")
        if not isinstance(token, str) or not isinstance(exp, int | float):
            return None
        if self.data.get("audience") != audience or self.data.get("scope") != scope:
            return None
        return token if exp - now > CACHE_MARGIN_S else None

    def keep_refresh_token(self, tokens: dict[str, Any]) -> None:
        """Save the (possibly rotated) refresh token of a token reply at once: a rotated one
        is the only one that works from now on, whatever happens next."""
        refresh = tokens.get("refresh_token")
        if isinstance(refresh, str) and refresh:
            self.data["refresh_token"] = refresh
            for k in ("id_token", "id_token_exp"):
                self.data.pop(k, None)
            self.save()

    def remember(self, printed: str, audience: str | None, scope: str) -> None:
        """Cache ``printed`` until its ``exp``, for ``audience`` and ``scope``."""
        exp = jwt_claims(printed).get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            self.data.update(id_token=printed, id_token_exp=exp, audience=audience, scope=scope)
        else:
            for k in ("id_token", "id_token_exp"):
                self.data.pop(k, None)
        self.save()

    def forget(self) -> None:
        """Drop every token (after ``invalid_grant``)."""
        self.data = {}
        self.save()


def client_session() -> aiohttp.ClientSession:
    """aiohttp with a verifying TLS context (``SSL_CERT_FILE`` honoured) and
    :data:`HTTP_TIMEOUT_S`. ``trust_env``: ``HTTPS_PROXY``/``NO_PROXY`` apply (a laptop behind a
    company proxy; TLS still ends at the provider)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ssl.create_default_context()),
        timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S),
        trust_env=True,
    )


def _failure(step: str, error: BaseException) -> OidcError:
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        why = f"the certificate of {error.host} is not trusted"
    elif isinstance(error, aiohttp.ClientConnectorError):
        why = f"cannot connect to {error.host}:{error.port}"
    elif isinstance(error, TimeoutError):
        why = f"no reply within {HTTP_TIMEOUT_S:g} s"
    else:
        why = type(error).__name__
    return OidcError(f"{step} failed: {why}")


async def _json(reply: aiohttp.ClientResponse) -> Any:
    body = await reply.content.read(MAX_REPLY_BYTES + 1)
    if len(body) > MAX_REPLY_BYTES:
        raise ValueError("reply too large")
    return json.loads(body)


async def discover(session: aiohttp.ClientSession, issuer: str) -> Endpoints:
    """OpenID Connect Discovery: the provider's endpoints, all checked ``https``.

    Raises:
        OidcError: unreachable, not 200, not JSON, another ``issuer``, or no device endpoint.
    """
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    step = f"discovery ({url})"
    try:
        async with session.get(url, allow_redirects=False) as reply:
            if reply.status != 200:
                raise OidcError(f"{step} answered HTTP {reply.status}")
            doc = await _json(reply)
    except OidcError:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
        raise _failure(step, e) from None
    if not isinstance(doc, dict):
        raise OidcError(f"{step}: not a JSON object")
    if doc.get("issuer") != issuer:
        raise OidcError(f"{step}: the document names issuer {doc.get('issuer')!r}, not {issuer!r}")
    device, token = doc.get("device_authorization_endpoint"), doc.get("token_endpoint")
    if not isinstance(device, str) or not isinstance(token, str):
        raise OidcError(
            f"{step}: the provider offers no device authorization grant "
            "(no device_authorization_endpoint)"
        )
    validate_https_url(device, "device_authorization_endpoint")
    validate_https_url(token, "token_endpoint")
    return Endpoints(issuer, device, token)


async def post_form(
    session: aiohttp.ClientSession, url: str, form: dict[str, str], step: str
) -> tuple[int, dict[str, Any]]:
    """POST ``form`` (``application/x-www-form-urlencoded``) and read a JSON object reply.

    Returns: the status and the object. Raises: :class:`OidcError` (network, not JSON)."""
    try:
        async with session.post(
            url, data=form, headers={"accept": "application/json"}, allow_redirects=False
        ) as reply:
            status = reply.status
            doc = await _json(reply)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
        raise _failure(step, e) from None
    if not isinstance(doc, dict):
        raise OidcError(f"{step}: HTTP {status}, not a JSON object")
    return status, doc


def _error_code(doc: dict[str, Any]) -> str:
    code = doc.get("error")
    return code if isinstance(code, str) and code.isascii() and len(code) < 100 else "?"


async def refresh(
    session: aiohttp.ClientSession, endpoints: Endpoints, client_id: str, refresh_token: str
) -> dict[str, Any]:
    """The refresh grant (RFC 6749 §6) for a public client.

    Raises:
        InvalidGrant: the provider refused the refresh token.
        OidcError: any other failure.
    """
    status, doc = await post_form(
        session,
        endpoints.token_endpoint,
        {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id},
        "the token refresh",
    )
    if status == 200:
        return doc
    code = _error_code(doc)
    if code == "invalid_grant":
        raise InvalidGrant("the sign-in has expired or was revoked (invalid_grant)")
    raise OidcError(f"the token refresh was refused: HTTP {status} ({code})")


def printable(text: str, limit: int = 2000) -> str:
    """``text`` from the provider, safe for a terminal: visible ASCII only (an escape sequence
    in a hostile reply would otherwise drive the person's terminal), at most ``limit`` chars;
    anything else becomes ``?``."""
    return "".join(c if 32 < ord(c) < 127 else "?" for c in text[:limit])


@dataclass(frozen=True)
class DeviceGrant:
    """A device authorization reply (RFC 8628 §3.2). ``repr`` hides the device code."""

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


def parse_device_grant(doc: dict[str, Any]) -> DeviceGrant:
    """Check a device authorization reply.

    Raises: OidcError: a required field is missing or of the wrong type."""
    device_code, user_code = doc.get("device_code"), doc.get("user_code")
    uri = doc.get("verification_uri") or doc.get("verification_url")  # Google's older name
    complete = doc.get("verification_uri_complete")
    expires_in, interval = doc.get("expires_in"), doc.get("interval", DEFAULT_INTERVAL_S)
    if not (
        isinstance(device_code, str)
        and isinstance(user_code, str)
        and isinstance(uri, str)
        and isinstance(expires_in, int)
        and isinstance(interval, int)
    ):
        raise OidcError("the device authorization reply lacks a field RFC 8628 requires")
    return DeviceGrant(
        device_code,
        user_code,
        uri,
        complete if isinstance(complete, str) else None,
        expires_in,
        max(interval, 1),
    )


async def device_flow(
    session: aiohttp.ClientSession,
    endpoints: Endpoints,
    client_id: str,
    scope: str,
    audience: str | None,
    err: TextIO,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """RFC 8628: ask for a user code, print where to enter it on ``err``, and poll the token
    endpoint (``interval``, +5 s per ``slow_down``) until the person has signed in.
    ``sleep``/``clock`` are seams for the pacing test.

    Returns: the token reply. Raises: :class:`OidcError` (denied, expired, any failure)."""
    form = {"client_id": client_id, "scope": scope}
    if audience:
        form["audience"] = audience
    status, doc = await post_form(
        session, endpoints.device_authorization_endpoint, form, "the device authorization request"
    )
    if status != 200:
        raise OidcError(
            f"the device authorization request was refused: HTTP {status} ({_error_code(doc)})"
        )
    grant = parse_device_grant(doc)
    if grant.verification_uri_complete:
        where = f"  open {printable(grant.verification_uri_complete)}\n  and check that it shows"
        where += " the code "
    else:
        where = f"  open {printable(grant.verification_uri)}\n  and enter the code "
    err.write(
        f"To sign in at {endpoints.issuer}:\n{where}{printable(grant.user_code)}\n"
        f"Waiting for the sign-in (the code expires in {grant.expires_in // 60} min)...\n"
    )
    err.flush()
    deadline = clock() + grant.expires_in
    interval = grant.interval
    poll = {"grant_type": DEVICE_GRANT, "device_code": grant.device_code, "client_id": client_id}
    while True:
        await sleep(interval)
        if clock() > deadline:
            raise OidcError("the code expired before the sign-in finished (expired); run again")
        status, doc = await post_form(session, endpoints.token_endpoint, poll, "polling")
        if status == 200:
            err.write("Signed in.\n")
            err.flush()
            return doc
        code = _error_code(doc)
        if code == "authorization_pending":
            continue
        if code == "slow_down":
            interval += SLOW_DOWN_STEP_S
            continue
        if code == "access_denied":
            raise OidcError("the sign-in was denied at the provider (access_denied)")
        if code == "expired_token":
            raise OidcError(
                "the code expired before the sign-in finished (expired_token); run again"
            )
        raise OidcError(f"the sign-in failed: HTTP {status} ({code})")


@dataclass(frozen=True)
class Request:
    """What ``token oidc`` was asked for."""

    issuer: str
    client_id: str
    audience: str | None = None
    scope: str = DEFAULT_SCOPE


async def id_token(
    request: Request,
    store: TokenStore,
    err: TextIO,
    interactive: bool,
    again: str,
    now: Callable[[], float] = time.time,
) -> str:
    """The token to print for ``request`` (see the module docstring for the order: cache,
    refresh, device flow). ``interactive``: stderr is a terminal, so a refused refresh may
    start a new sign-in. ``again``: the command line the person should run in a terminal.

    Raises:
        OidcError: the one-line reason.
    """
    validate_https_url(request.issuer, "--issuer")
    with store.locked():
        cached = store.cached_token(request.audience, request.scope, now())
        if cached is not None:
            return cached
        async with client_session() as session:
            endpoints = await discover(session, request.issuer)
            saved = store.data.get("refresh_token")
            if isinstance(saved, str) and saved:
                try:
                    tokens = await refresh(session, endpoints, request.client_id, saved)
                except InvalidGrant as e:
                    store.forget()
                    if not interactive:
                        raise OidcError(
                            f"{e}: run `{again}` once in a terminal to sign in again"
                        ) from None
                    err.write(f"{e}; signing in again.\n")
                    tokens = await device_flow(
                        session, endpoints, request.client_id, request.scope, request.audience, err
                    )
            else:
                tokens = await device_flow(
                    session, endpoints, request.client_id, request.scope, request.audience, err
                )
        store.keep_refresh_token(tokens)
        token = pick_token(tokens, request.audience)
        if not store.data.get("refresh_token"):
            err.write(
                "warning: the provider issued no refresh token (is offline_access in --scope and "
                "the refresh_token grant allowed for this client?): the next run after this token "
                "expires asks for a new sign-in\n"
            )
        store.remember(token, request.audience, request.scope)
        return token
