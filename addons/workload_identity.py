"""GitHub Actions workload identity (``--github-oidc``): the reference proxy's keyless mode.

A CI job with ``permissions: id-token: write`` holds no OpenAI API key. The launcher reads the
job's GitHub OIDC *request token* (``ACTIONS_ID_TOKEN_REQUEST_TOKEN``) from stdin, fetches a
GitHub OIDC JWT for the configured audience from the runner's request URL
(``ACTIONS_ID_TOKEN_REQUEST_URL``), trades it at OpenAI's token endpoint for a short-lived
access token (OAuth 2.0 token exchange, RFC 8693), and the forwarder injects ``Bearer <access
token>`` in place of the API key. :class:`WorkloadIdentityRenewal` renews the access token in
the background at about 80 % of its lifetime (with jitter, and retries with backoff), so no
request waits for a renewal; while no valid token can be had, the forwarder answers a JSON 503
(:data:`MSG_UNAVAILABLE`) and sends nothing upstream.

Rules, messages and their order are the reference's (``codex responses-api-proxy``, Codex
0.171.0, checked on its binary; see ``tests/test_workload_identity.py``). The exchange itself
follows OpenAI's public "Workload identity token exchange" documentation.

Secrets held here (the request token, the JWT, the access token) never reach a log line, an
exception message or a ``repr``; the request token and the ``Bearer`` header value live in
``mlock``ed ``bytearray``s that are zeroed when replaced (as :mod:`addons.keyholder` does for
the API key). The HTTP client is aiohttp with an ``ssl.create_default_context()`` context, so
``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` choose the trusted CAs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import aiohttp
import yarl
from mitmproxy import ctx, exceptions

from addons.secret_memory import (
    BEARER_PREFIX,
    REDACTED,
    SecretTooLarge,
    mlock,
    read_secret_line,
    zero,
)

logger = logging.getLogger(__name__)

#: OpenAI's token endpoint (the ``codex_oidc_token_url`` option overrides it: a test seam).
DEFAULT_TOKEN_URL = "https://auth.openai.com/oauth/token"  # noqa: S105 - a URL
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
SUBJECT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 - a type name
ISSUED_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a type name

#: The longest request token the reference accepts (bytes, after trimming CR/LF). It reads at
#: most two more bytes (room for ``\r\n``): a longer read is "too large", 16 385 is "invalid".
MAX_REQUEST_TOKEN_BYTES = 16384
READ_LIMIT_BYTES = MAX_REQUEST_TOKEN_BYTES + 2
#: The reference's alphabet for the request token (base64 / URL-safe token characters).
REQUEST_TOKEN_PATTERN = re.compile(rb"[A-Za-z0-9\-._~+/=]+")

MSG_INVALID_CREDENTIAL = "invalid workload identity bearer credential"
MSG_CREDENTIAL_TOO_LARGE = "GitHub OIDC request credential too large"
MSG_URL_NOT_HTTPS = "GitHub OIDC request URL must be HTTPS without user info or fragment"
MSG_URL_INVALID = "invalid GitHub OIDC request URL"
MSG_NONEMPTY = "workload identity requires a nonempty {flag}"
MSG_DEFAULT_UPSTREAM = "workload identity requires the default OpenAI Responses endpoint"
MSG_GITHUB_FAILED = "GitHub OIDC token request failed"
MSG_UNSUPPORTED_TYPE = "OpenAI returned an unsupported workload identity token type"
MSG_INVALID_LIFETIME = "OpenAI returned an invalid token lifetime"
MSG_EXPIRED = "OpenAI returned an expired workload identity token"
MSG_REJECTED = "the workload identity token exchange was rejected with HTTP {status}"
MSG_UNREADABLE = "OpenAI returned an unreadable token response"
MSG_EXCHANGE_FAILED = "the workload identity token exchange failed"
MSG_UNAVAILABLE = "workload identity renewal temporarily unavailable; retry later"

#: Seconds each HTTP exchange (GitHub or OpenAI) may take in all.
HTTP_TIMEOUT_S = 30.0
#: Renew at this fraction of the lifetime, give or take :data:`RENEW_JITTER` of it.
RENEW_AT = 0.8
RENEW_JITTER = 0.05
#: A token is not handed out in the last tenth of its lifetime (at most this many seconds), so
#: a request does not leave with a token that expires on the way.
EXPIRY_MARGIN_MAX_S = 10.0
#: Longest access token lifetime believed (seconds): a day. Longer is "invalid token lifetime".
MAX_LIFETIME_S = 86400


class WorkloadIdentityError(ValueError):
    """A rule of the keyless mode is broken or an exchange failed. The message is one of this
    module's ``MSG_*`` texts (the reference's wording) and never holds a secret or a reply body.

    ``cause`` (ours, not the reference's): for a failed request, what failed, from
    :func:`failure_cause` (a status, a refused connection, a DNS or TLS error...); ``str()``
    gives it on a second line, so the first line stays the reference's exactly.
    """

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause

    def __str__(self) -> str:
        return self.message if not self.cause else f"{self.message}\n  cause: {self.cause}"

    def oneline(self) -> str:
        """Message and cause on one line (for a log line)."""
        return self.message if not self.cause else f"{self.message} ({self.cause})"


def _os_reason(error: OSError) -> str:
    """``Connection refused`` rather than asyncio's ``Connect call failed (...)``."""
    if isinstance(error.errno, int) and error.errno > 0:
        return os.strerror(error.errno)
    return str(error.strerror or error)


def failure_cause(error: BaseException | None = None, status: int | None = None) -> str:
    """Why a request of the keyless mode failed, in words, for the second line of its error:
    the HTTP ``status``, or from ``error`` the DNS, connection, TLS or timeout failure with the
    host and port. Built only from the exception's type, host, port and OS/TLS error text (no
    URL, header or body: never a token)."""
    if status is not None:
        return f"HTTP {status} from the server"
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        where = f"{error.host}:{error.port}"
        return f"TLS: the certificate of {where} is not trusted ({error.certificate_error})"
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return f"DNS: cannot resolve {error.host} ({_os_reason(error.os_error)})"
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"cannot connect to {error.host}:{error.port} ({_os_reason(error.os_error)})"
    if isinstance(error, TimeoutError):
        return f"no reply within {HTTP_TIMEOUT_S:g} s"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without a reply"
    if isinstance(error, ssl.SSLError):
        return f"TLS: {error.reason or type(error).__name__}"
    if isinstance(error, ValueError | AttributeError):
        return 'the reply is not a JSON object with a "value" string'
    if error is None:
        return 'the reply is not a JSON object with a "value" string'
    return type(error).__name__


class IdentityUnavailable(LookupError):
    """No valid access token right now (start-up not done, or expired during an outage)."""


@dataclass(frozen=True)
class IdentitySettings:
    """The four ``--github-oidc`` values and the token endpoint (a test seam)."""

    audience: str
    identity_provider_id: str
    service_account_id: str
    request_url: str
    token_url: str = DEFAULT_TOKEN_URL


def validate_settings(settings: IdentitySettings) -> None:
    """Check the settings in the reference's order: each of ``--oidc-audience``,
    ``--identity-provider-id``, ``--service-account-id``, ``--github-oidc-request-url`` is
    non-blank, then the request URL (:func:`validate_request_url`).

    Raises:
        WorkloadIdentityError: with the reference's message for the first broken rule.
    """
    for flag, value in (
        ("--oidc-audience", settings.audience),
        ("--identity-provider-id", settings.identity_provider_id),
        ("--service-account-id", settings.service_account_id),
        ("--github-oidc-request-url", settings.request_url),
    ):
        if not value.strip():
            raise WorkloadIdentityError(MSG_NONEMPTY.format(flag=flag))
    validate_request_url(settings.request_url)


def validate_request_url(url: str) -> None:
    """The GitHub request URL must be an absolute ``https`` URL (any case) with no user info
    (an empty ``@`` is allowed, as the reference's URL parser has it) and no fragment (an empty
    ``#`` counts); a query is allowed (GitHub's own URL has one).

    Raises:
        WorkloadIdentityError: :data:`MSG_URL_INVALID` when it is not an absolute URL,
            :data:`MSG_URL_NOT_HTTPS` for the other cases.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise WorkloadIdentityError(MSG_URL_INVALID) from None
    if not parts.scheme or any(c.isspace() for c in url):
        raise WorkloadIdentityError(MSG_URL_INVALID)
    if parts.scheme.lower() != "https" or "#" in url or parts.username or parts.password:
        raise WorkloadIdentityError(MSG_URL_NOT_HTTPS)


def read_request_token(stream: BinaryIO) -> bytearray:
    """Read and check the GitHub request token from ``stream`` (normally stdin).

    The reference's rule: read at most 16 386 bytes, stopping after the first ``\\n``; a read
    that fills them without ending in ``\\n`` is too large; trailing CR/LF are trimmed; the
    rest must be 1..16 384 bytes of ``[A-Za-z0-9-._~+/=]``. The read buffer is zeroed
    (:func:`addons.secret_memory.read_secret_line`).

    Returns:
        The token (the caller owns it and zeroes it).

    Raises:
        WorkloadIdentityError: :data:`MSG_CREDENTIAL_TOO_LARGE` or :data:`MSG_INVALID_CREDENTIAL`.
    """
    try:
        token = read_secret_line(stream, READ_LIMIT_BYTES)
    except SecretTooLarge:
        raise WorkloadIdentityError(MSG_CREDENTIAL_TOO_LARGE) from None
    if not 0 < len(token) <= MAX_REQUEST_TOKEN_BYTES or (
        REQUEST_TOKEN_PATTERN.fullmatch(token) is None
    ):
        zero(token)
        raise WorkloadIdentityError(MSG_INVALID_CREDENTIAL)
    return token


def github_request_url(request_url: str, audience: str) -> str:
    """``request_url`` with ``audience`` added as the (URL-encoded) ``audience`` query
    parameter, the runner's own query kept (GitHub's documented ``&audience=`` form)."""
    parts = urllib.parse.urlsplit(request_url)
    extra = urllib.parse.urlencode({"audience": audience})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urllib.parse.urlunsplit(parts._replace(query=query))


def client_ssl_context() -> ssl.SSLContext:
    """A verifying client context with the system's CAs, or those in ``SSL_CERT_FILE`` /
    ``SSL_CERT_DIR`` when set (OpenSSL's default verify paths read both)."""
    return ssl.create_default_context()


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_ssl_context()),
        timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S),
        trust_env=False,  # never send a credential through an HTTP(S)_PROXY of the environment
    )


async def fetch_github_jwt(
    session: aiohttp.ClientSession, settings: IdentitySettings, request_token: bytearray
) -> bytearray:
    """``GET <request url>&audience=<audience>`` with ``Authorization: bearer <request
    token>``; the reply is ``{"value": "<jwt>"}``.

    Raises:
        WorkloadIdentityError: :data:`MSG_GITHUB_FAILED` for any failure (network, TLS,
            non-200, a reply without a string ``value``).
    """
    url = github_request_url(settings.request_url, settings.audience)
    headers = {
        "authorization": "bearer " + request_token.decode("ascii"),
        "accept": "application/json",
    }
    try:
        # encoded=True: send the audience percent-encoded exactly as urlencode wrote it.
        target = yarl.URL(url, encoded=True)
        async with session.get(target, headers=headers, allow_redirects=False) as reply:
            if reply.status != 200:
                raise WorkloadIdentityError(MSG_GITHUB_FAILED, failure_cause(status=reply.status))
            data = await reply.read()
        value = json.loads(data).get("value")
    except WorkloadIdentityError:
        raise
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError, OSError) as e:
        raise WorkloadIdentityError(MSG_GITHUB_FAILED, failure_cause(e)) from None
    finally:
        headers.clear()
    if not isinstance(value, str) or not value or not value.isascii():
        raise WorkloadIdentityError(MSG_GITHUB_FAILED, failure_cause())
    return bytearray(value.encode("ascii"))


@dataclass
class AccessToken:
    """An exchanged access token: ``token`` (bytes, the caller zeroes it) and its lifetime."""

    token: bytearray
    expires_in: int

    def __repr__(self) -> str:
        return f"<AccessToken {REDACTED} expires_in={self.expires_in}>"


def parse_exchange_reply(doc: Any) -> AccessToken:
    """Check a token-exchange reply (the JSON object) and take its access token.

    Rules: ``issued_token_type`` is :data:`ISSUED_TOKEN_TYPE`; ``expires_in`` an integer in
    1..86 400 s (0 or less: expired; not an integer or more than a day: invalid lifetime);
    ``access_token`` a non-empty string of visible ASCII (it goes into a header).

    Raises:
        WorkloadIdentityError: :data:`MSG_UNREADABLE`, :data:`MSG_UNSUPPORTED_TYPE`,
            :data:`MSG_INVALID_LIFETIME` or :data:`MSG_EXPIRED`.
    """
    if not isinstance(doc, dict):
        raise WorkloadIdentityError(MSG_UNREADABLE)
    if doc.get("issued_token_type") != ISSUED_TOKEN_TYPE:
        raise WorkloadIdentityError(MSG_UNSUPPORTED_TYPE)
    token_type = doc.get("token_type")
    if token_type is not None and str(token_type).lower() != "bearer":
        raise WorkloadIdentityError(MSG_UNSUPPORTED_TYPE)
    lifetime = doc.get("expires_in")
    if not isinstance(lifetime, int) or isinstance(lifetime, bool) or lifetime > MAX_LIFETIME_S:
        raise WorkloadIdentityError(MSG_INVALID_LIFETIME)
    if lifetime <= 0:
        raise WorkloadIdentityError(MSG_EXPIRED)
    token = doc.get("access_token")
    if not isinstance(token, str) or not token or not all(33 <= ord(c) < 127 for c in token):
        raise WorkloadIdentityError(MSG_UNREADABLE)
    return AccessToken(bytearray(token.encode("ascii")), lifetime)


async def exchange_jwt(
    session: aiohttp.ClientSession, settings: IdentitySettings, jwt: bytearray
) -> AccessToken:
    """``POST <token url>`` with the JSON token-exchange request for ``jwt``.

    Raises:
        WorkloadIdentityError: :data:`MSG_REJECTED` for a non-2xx status,
            :data:`MSG_EXCHANGE_FAILED` for network/TLS errors, else as
            :func:`parse_exchange_reply`.
    """
    body = {
        "grant_type": GRANT_TYPE,
        "subject_token_type": SUBJECT_TOKEN_TYPE,
        "subject_token": jwt.decode("ascii"),
        "identity_provider_id": settings.identity_provider_id,
        "service_account_id": settings.service_account_id,
    }
    try:
        async with session.post(
            settings.token_url,
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json", "accept": "application/json"},
            allow_redirects=False,
        ) as reply:
            status = reply.status
            data = await reply.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise WorkloadIdentityError(MSG_EXCHANGE_FAILED, failure_cause(e)) from None
    finally:
        body.clear()
    if not 200 <= status < 300:
        raise WorkloadIdentityError(MSG_REJECTED.format(status=status))
    try:
        doc = json.loads(data)
    except ValueError:
        raise WorkloadIdentityError(MSG_UNREADABLE) from None
    return parse_exchange_reply(doc)


@dataclass(frozen=True)
class _Current:
    """The current token as one value (replaced by one assignment, so a reader on another
    thread never sees a new token with an old lifetime)."""

    header: bytearray
    issued_at: float
    lifetime_s: int

    def usable_until(self) -> float:
        margin = min(EXPIRY_MARGIN_MAX_S, self.lifetime_s * 0.1)
        return self.issued_at + self.lifetime_s - margin


_NONE = _Current(bytearray(), 0.0, 0)


class WorkloadIdentity:
    """Holder of the keyless mode's state: settings, request token, current access token.

    ``repr``/``str`` never show a secret. :meth:`header_value` hands out ``Bearer <access
    token>`` while it is valid (until :data:`EXPIRY_MARGIN_MAX_S` or a tenth of its lifetime
    before expiry), else raises :class:`IdentityUnavailable`. :meth:`renew` fetches a new JWT
    and exchanges it (one attempt). A ``--workers`` worker holds no request token: it is a
    *follower* (:meth:`follow`) that gets each token from the supervisor
    (:meth:`share_line` / :meth:`install_shared`). ``clock`` is ``time.monotonic`` (a seam).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.settings: IdentitySettings | None = None
        self.follower = False
        self._request_token = bytearray()
        self._current = _NONE
        self._previous = bytearray()  # the last token: flows injected with it are still scrubbed
        self.renewals = 0
        self.locked = False

    def __repr__(self) -> str:
        state = "follower" if self.follower else ("active" if self.settings else "off")
        token = "token" if self._current.header else "no token"
        return f"<WorkloadIdentity {state} {token} {REDACTED}>"

    __str__ = __repr__

    @property
    def active(self) -> bool:
        return self.settings is not None or self.follower

    @property
    def can_renew(self) -> bool:
        return self.settings is not None and bool(self._request_token)

    @property
    def lifetime_s(self) -> int:
        return self._current.lifetime_s

    @property
    def issued_at(self) -> float:
        return self._current.issued_at

    def configure(self, settings: IdentitySettings, request_token: bytearray) -> None:
        """Take the settings and ownership of a checked request token (zeroes the argument)."""
        self.clear()
        self.settings = settings
        self._request_token = bytearray(request_token)
        zero(request_token)
        self.locked = mlock(self._request_token)

    def follow(self) -> None:
        """Become a follower: active, no request token, tokens come from :meth:`install_shared`."""
        self.clear()
        self.follower = True

    def install(self, token: AccessToken, issued_at: float | None = None) -> None:
        """Make ``token`` the current one (zeroes ``token.token`` and the one before last).
        ``issued_at``: clock time of issue (default: now)."""
        header = bytearray(BEARER_PREFIX) + token.token
        zero(token.token)
        mlock(header)
        zero(self._previous)
        self._previous = self._current.header
        when = self.clock() if issued_at is None else issued_at
        self._current = _Current(header, when, token.expires_in)
        self.renewals += 1

    def share_line(self) -> bytearray:
        """The current token for a follower: ``<ms since issue> <lifetime s> <token>\\n`` (the
        caller zeroes it; an empty array when there is no token)."""
        current = self._current
        if not current.header:
            return bytearray()
        age_ms = max(0, int((self.clock() - current.issued_at) * 1000))
        head = f"{age_ms} {current.lifetime_s} ".encode()
        return bytearray(head) + current.header[len(BEARER_PREFIX) :] + b"\n"

    def install_shared(self, line: bytearray) -> None:
        """Install a :meth:`share_line` (zeroes ``line``).

        Raises:
            WorkloadIdentityError: :data:`MSG_UNREADABLE` for a malformed line.
        """
        try:
            age_b, lifetime_b, token = bytes(line).rstrip(b"\n").split(b" ", 2)
            age_ms, lifetime = int(age_b), int(lifetime_b)
        except ValueError:
            raise WorkloadIdentityError(MSG_UNREADABLE) from None
        finally:
            zero(line)
        if not token or lifetime <= 0 or age_ms < 0:
            raise WorkloadIdentityError(MSG_UNREADABLE)
        self.install(AccessToken(bytearray(token), lifetime), self.clock() - age_ms / 1000)

    def usable_until(self) -> float:
        """Clock time after which the current token is no longer handed out."""
        return self._current.usable_until()

    def header_value(self) -> str:
        """``Bearer <access token>`` for the outgoing request.

        Raises:
            IdentityUnavailable: no token yet, or it is about to expire (renewal failing).
        """
        current = self._current
        if not current.header or self.clock() >= current.usable_until():
            raise IdentityUnavailable(MSG_UNAVAILABLE)
        return current.header.decode("ascii")

    def matches(self, value: str) -> bool:
        """Whether ``value`` is the current or the previous injected header value."""
        raw = value.encode("ascii", "replace")
        return any(held and raw == bytes(held) for held in (self._current.header, self._previous))

    def next_renewal_in(self) -> float:
        """Seconds until the next renewal: 80 % of the lifetime after issue, +-5 % jitter."""
        jitter = random.uniform(-RENEW_JITTER, RENEW_JITTER)
        due = self.issued_at + self.lifetime_s * (RENEW_AT + jitter)
        return max(0.0, due - self.clock())

    def retry_delay(self, attempt: int) -> float:
        """Backoff before retry ``attempt`` (1, 2, ...): doubling from 0.5 s, capped at a
        quarter of the lifetime (1..30 s), with +-20 % jitter."""
        cap = max(1.0, min(30.0, self.lifetime_s * 0.25))
        return min(cap, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)

    async def renew(self) -> None:
        """One renewal: fetch a GitHub JWT with the request token and exchange it.

        Raises:
            WorkloadIdentityError: as :func:`fetch_github_jwt` / :func:`exchange_jwt`.
            IdentityUnavailable: when not configured.
        """
        settings = self.settings
        if settings is None or not self._request_token:
            raise IdentityUnavailable("workload identity is not configured")
        async with _session() as session:
            jwt = await fetch_github_jwt(session, settings, self._request_token)
            try:
                token = await exchange_jwt(session, settings, jwt)
            finally:
                zero(jwt)
        self.install(token)

    def clear(self) -> None:
        for buf in (self._request_token, self._current.header, self._previous):
            zero(buf)
        self._request_token, self._previous = bytearray(), bytearray()
        self._current = _NONE
        self.settings = None
        self.follower = False
        self.locked = False


#: The process-wide identity (kept here, not in a ``-s`` script, so a hot reload keeps it).
IDENTITY = WorkloadIdentity()


def start(settings: IdentitySettings, request_token: bytearray) -> None:
    """The start-up exchange, before listening: configure :data:`IDENTITY` and renew once, in
    a fresh event loop (on a helper thread when this thread already runs one, as mitmproxy's
    ``configure`` does).

    Raises:
        WorkloadIdentityError: the reference's message; :data:`IDENTITY` is cleared.
    """
    IDENTITY.configure(settings, request_token)
    try:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(IDENTITY.renew())
            return
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, IDENTITY.renew()).result()
    except BaseException:
        IDENTITY.clear()
        raise


async def renew_forever(
    identity: WorkloadIdentity, on_renewed: Callable[[], None] | None = None
) -> None:
    """Renew ``identity`` at ~80 % of each lifetime until cancelled or cleared; on failure
    retry with backoff (:meth:`WorkloadIdentity.retry_delay`), logging the cause (one of the
    ``MSG_*`` texts, never a secret). ``on_renewed`` runs after each renewal (the
    ``--workers`` supervisor hands the new token to its workers there)."""
    while identity.can_renew:
        await asyncio.sleep(identity.next_renewal_in())
        attempt = 0
        while identity.can_renew:
            attempt += 1
            try:
                await identity.renew()
            except (WorkloadIdentityError, IdentityUnavailable) as e:
                delay = identity.retry_delay(attempt)
                why = e.oneline() if isinstance(e, WorkloadIdentityError) else str(e)
                logger.warning(
                    "workload identity renewal failed (%s); retry %d in %.1f s", why, attempt, delay
                )
                await asyncio.sleep(delay)
                continue
            except Exception as e:  # never let the renewal task die silently
                logger.error("workload identity renewal error (%s)", type(e).__name__)
                await asyncio.sleep(identity.retry_delay(attempt))
                continue
            logger.info(
                "workload identity renewed (lifetime %d s, renewal %d)",
                identity.lifetime_s,
                identity.renewals,
            )
            if on_renewed is not None:
                on_renewed()
            break


class WorkloadIdentityRenewal:
    """Declares the keyless mode's options and renews the access token in the background.

    Under the launcher the start-up exchange is already done (:func:`start`); under plain
    ``mitmdump -s`` with ``codex_github_oidc`` this addon does it in ``configure``, reading the
    request token from ``codex_oidc_request_token_file`` (a path, ``-`` for stdin). In
    ``running`` it starts a task that renews at ~80 % of each lifetime and, on failure, retries
    with backoff until it succeeds (requests meanwhile get the old token while it is valid,
    then a JSON 503 from the forwarder). ``done`` stops it.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "codex_github_oidc",
            bool,
            False,
            "GitHub Actions workload identity: inject a short-lived OpenAI access token "
            "obtained with the job's OIDC token instead of an API key (see --github-oidc).",
        )
        loader.add_option("codex_oidc_audience", str, "", "--oidc-audience")
        loader.add_option("codex_identity_provider_id", str, "", "--identity-provider-id")
        loader.add_option("codex_service_account_id", str, "", "--service-account-id")
        loader.add_option("codex_github_oidc_request_url", str, "", "--github-oidc-request-url")
        loader.add_option(
            "codex_oidc_token_url",
            str,
            DEFAULT_TOKEN_URL,
            "OpenAI's token-exchange endpoint. A test seam: leave it at the default in real use.",
        )
        loader.add_option(
            "codex_oidc_request_token_file",
            str,
            "",
            "Under plain mitmdump -s: read the GitHub OIDC request token from this file "
            "('-' for stdin). The launcher reads it from stdin itself.",
        )

    def configure(self, updated: set[str]) -> None:
        if not ctx.options.codex_github_oidc or IDENTITY.active:
            return
        path = ctx.options.codex_oidc_request_token_file
        if not path:
            raise exceptions.OptionsError(
                "codex_github_oidc needs the request token: start through the launcher "
                "(--github-oidc, token on stdin) or set codex_oidc_request_token_file"
            )
        settings = settings_from_options(ctx.options)
        if not settings.token_url.lower().startswith("https://"):
            raise exceptions.OptionsError("codex_oidc_token_url must be an https URL")
        try:
            validate_settings(settings)
            from addons.hardening import HardeningError, harden_process

            try:
                harden_process()
            except HardeningError as e:
                raise exceptions.OptionsError(f"codex_github_oidc: {e}") from None
            if path == "-":
                import sys

                token = read_request_token(sys.stdin.buffer)
            else:
                with open(path, "rb") as f:
                    token = read_request_token(f)
            start(settings, token)
        except (WorkloadIdentityError, OSError) as e:
            raise exceptions.OptionsError(f"codex_github_oidc: {e}") from None

    def running(self) -> None:
        if IDENTITY.can_renew and self._task is None:
            self._task = asyncio.get_running_loop().create_task(renew_forever(IDENTITY))

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


def settings_from_options(options: Any) -> IdentitySettings:
    """The :class:`IdentitySettings` named by the ``codex_*`` options."""
    return IdentitySettings(
        audience=options.codex_oidc_audience,
        identity_provider_id=options.codex_identity_provider_id,
        service_account_id=options.codex_service_account_id,
        request_url=options.codex_github_oidc_request_url,
        token_url=options.codex_oidc_token_url,
    )
