"""The gateway's identity rules and token check (addons/gateway_mode/identities.py, oidc.py)
against a real loopback HTTPS issuer with a throwaway CA (tests/oidc_issuer.py): each check,
and the attacks of issue 31 (alg none, HS256 with the public key, a colliding kid of another
issuer, wrong audience, expired, an unknown-kid flood, a 1 MB bearer)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from addons.gateway_mode.identities import (
    GITHUB_ISSUER,
    check_identity,
    check_issuer,
    claim_matches,
    claims_match,
    parse_claim,
)
from addons.gateway_mode.oidc import (
    LEEWAY_S,
    MAX_TOKEN_CHARS,
    IdentityRefused,
    OidcVerifier,
    identity_bearer,
)
from tests.oidc_issuer import GITHUB_CLAIMS, OidcIssuers

AUD = "codex-gateway"


@pytest.fixture
def issuers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[OidcIssuers]:
    server = OidcIssuers(tmp_path).start()
    assert server.ca_file is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_file))
    server.add("gh")
    server.add("idp")
    yield server
    server.stop()


def entry(issuer: str, claims: dict[str, str] | None = None, key_id: str = "oi_000000000001"):
    return {
        "key_id": key_id,
        "member_id": 1,
        "member": "ci",
        "issuer": issuer,
        "audience": AUD,
        "claims": claims if claims is not None else {"repository_owner": "octo-org"},
    }


def verifier(*rows: dict[str, Any]) -> OidcVerifier:
    v = OidcVerifier()
    v.load(list(rows))
    return v


def refused(v: OidcVerifier, token: str) -> IdentityRefused:
    with pytest.raises(IdentityRefused) as info:
        asyncio.run(v.verify(token))
    assert token not in str(info.value)
    return info.value


# -- rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "claims, ok",
    [
        ({}, False),
        ({"workflow": "ci"}, False),
        ({"repository_owner": "*"}, False),
        ({"repository_owner": "octo-*"}, False),  # anyone can register octo-evil
        ({"repository": "*"}, False),
        ({"repository": "*/octo-repo"}, False),
        ({"repository": "octo-org"}, False),
        ({"repository_owner": "octo-org"}, True),
        ({"repository_owner_id": "5412"}, True),
        ({"repository": "octo-org/*"}, True),
        ({"repository": "octo-org/octo-repo", "ref": "refs/heads/*"}, True),
    ],
)
def test_the_github_issuer_needs_an_owner(claims, ok):
    for issuer in (GITHUB_ISSUER, GITHUB_ISSUER + "/"):
        if ok:
            check_identity(issuer, AUD, claims)
        else:
            with pytest.raises(ValueError, match="repository_owner"):
                check_identity(issuer, AUD, claims)


def test_other_issuers_need_no_claims():
    check_identity("https://idp.example.com/realms/team", AUD, {})


@pytest.mark.parametrize(
    "issuer",
    [
        "http://idp.example.com",
        "https://user@idp.example.com",
        "https://idp.example.com/?x=1",
        "https://idp.example.com/#f",
        "idp.example.com",
        "https://" + "a" * 500,
    ],
)
def test_issuers_are_plain_https_urls(issuer):
    with pytest.raises(ValueError):
        check_issuer(issuer)


@pytest.mark.parametrize("spec", ["novalue", "=x", "aud=x", "exp=1", "iss=x", "x=", "a b=c"])
def test_bad_claims_are_refused(spec):
    with pytest.raises(ValueError):
        parse_claim(spec)


@pytest.mark.parametrize(
    "pattern, value, ok",
    [
        ("octo-org", "octo-org", True),
        ("octo-org", "octo-org2", False),
        ("octo-org/*", "octo-org/repo", True),
        ("octo-org/*", "octo-orgx/repo", False),
        ("refs/*/main", "refs/heads/main", True),
        ("a.c", "abc", False),  # literal, not a regex
        ("*", "", True),
        ("true", True, True),
        ("5412", 5412, True),
        ("admins", ["devs", "admins"], True),
        ("admins", ["devs"], False),
        ("x", {"x": 1}, False),
        ("x", None, False),
    ],
)
def test_claim_patterns(pattern, value, ok):
    assert claim_matches(pattern, value) is ok


def test_every_claim_must_match_and_a_missing_claim_never_does():
    assert claims_match({"repository_owner": "octo-org", "ref": "refs/heads/*"}, GITHUB_CLAIMS)
    assert not claims_match({"repository_owner": "octo-org", "ref": "refs/tags/*"}, GITHUB_CLAIMS)
    assert not claims_match({"environment": "*"}, GITHUB_CLAIMS)


def test_which_bearers_are_identity_tokens():
    assert identity_bearer("Bearer eyJhbGciOiJSUzI1NiJ9.eyJ4IjoxfQ.c2ln") is not None
    assert identity_bearer("bearer eyJhbGciOiJSUzI1NiJ9.eyJ4IjoxfQ.") is not None
    assert identity_bearer("Bearer sk-codex-gw-" + "a" * 43) is None
    assert identity_bearer("Bearer sk-codex-gw-" + "a" * MAX_TOKEN_CHARS) is None
    assert identity_bearer("Bearer not-a-jwt") is None
    assert identity_bearer("Basic eyJhbGciOiJSUzI1NiJ9.eyJ4IjoxfQ.c2ln") is None
    assert identity_bearer("Bearer " + "x" * (1024 * 1024)) is not None  # refused unread


# -- the check against a real issuer -----------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_a_good_token_names_its_identity(issuers, alg):
    gh = issuers.issuers["gh"]
    v = verifier(entry(gh.url))
    token = issuers.mint("gh", AUD, alg=alg, claims=GITHUB_CLAIMS)
    got = asyncio.run(v.verify(token))
    assert got.entry["key_id"] == "oi_000000000001"
    assert got.subject == GITHUB_CLAIMS["sub"]
    assert issuers.jwks_fetches("gh") == 1


def test_the_first_matching_identity_wins_and_claims_must_match(issuers):
    gh = issuers.issuers["gh"]
    main_only = entry(gh.url, {"repository": "octo-org/octo-repo", "ref": "refs/heads/main"})
    v = verifier(
        entry(gh.url, {"repository_owner": "other-org"}, "oi_000000000001"),
        {**main_only, "key_id": "oi_000000000002"},
        entry(gh.url, {"repository_owner": "octo-org"}, "oi_000000000003"),
    )
    token = issuers.mint("gh", AUD, claims=GITHUB_CLAIMS)
    assert asyncio.run(v.verify(token)).entry["key_id"] == "oi_000000000002"
    tag = issuers.mint("gh", AUD, claims={**GITHUB_CLAIMS, "ref": "refs/tags/v1"})
    assert asyncio.run(v.verify(tag)).entry["key_id"] == "oi_000000000003"
    evil = {**GITHUB_CLAIMS, "repository_owner": "evil", "repository": "evil/octo-repo"}
    stranger = issuers.mint("gh", AUD, claims=evil)
    assert refused(v, stranger).check == "no_identity"


def test_alg_none_is_refused(issuers):
    v = verifier(entry(issuers.issuers["gh"].url))
    claims = {
        "iss": issuers.issuers["gh"].url,
        "aud": AUD,
        "exp": time.time() + 60,
        **GITHUB_CLAIMS,
    }
    token = jwt.encode(claims, "", algorithm="none")
    assert refused(v, token).check == "algorithm"
    assert issuers.jwks_fetches("gh") == 0


def test_hs256_signed_with_the_public_key_is_refused(issuers):
    gh = issuers.issuers["gh"]
    v = verifier(entry(gh.url))
    public_pem = (
        gh.keys["gh-rs"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = {"alg": "HS256", "kid": "gh-rs", "typ": "JWT"}
    payload = {"iss": gh.url, "aud": AUD, "iat": int(time.time()), "exp": int(time.time()) + 60}
    payload.update(GITHUB_CLAIMS)

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    import hashlib
    import hmac

    signing_input = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(payload).encode())
    signature = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
    token = (signing_input + b"." + b64(signature)).decode()
    assert refused(v, token).check == "algorithm"


def test_another_issuers_token_with_a_colliding_kid_is_refused(issuers):
    gh = issuers.issuers["gh"]
    evil = issuers.add("evil", kids=("gh-rs", "gh-es"))  # same kids as gh's
    v = verifier(entry(gh.url))
    # Signed by evil's key, claiming to be gh's: verified with gh's key of that kid.
    forged = issuers.mint("gh", AUD, claims=GITHUB_CLAIMS, kid="gh-rs", key=evil.keys["gh-rs"])
    assert refused(v, forged).check == "signature"
    # Evil's own token (its own iss): no identity has that issuer; evil is never fetched.
    own = issuers.mint("evil", AUD, claims=GITHUB_CLAIMS)
    assert refused(v, own).check == "unknown_issuer"
    assert issuers.jwks_fetches("evil") == 0


def test_wrong_audience_and_wrong_issuer(issuers):
    gh = issuers.issuers["gh"]
    v = verifier(entry(gh.url))
    assert refused(v, issuers.mint("gh", "someone-else", claims=GITHUB_CLAIMS)).check == "audience"
    # An aud list holding ours passes.
    token = issuers.mint("gh", ["x", AUD], claims=GITHUB_CLAIMS)
    assert asyncio.run(v.verify(token)).entry["key_id"] == "oi_000000000001"
    # iss of a known issuer's sibling path: unknown, no fetch.
    wrong = issuers.mint("gh", AUD, claims={**GITHUB_CLAIMS, "iss": gh.url + "x"})
    assert refused(v, wrong).check == "unknown_issuer"


def test_times_with_the_stated_leeway(issuers):
    gh = issuers.issuers["gh"]
    v = verifier(entry(gh.url))
    now = time.time()
    late = issuers.mint("gh", AUD, claims=GITHUB_CLAIMS, issued=now - 600, lifetime=600 - 30)
    assert asyncio.run(v.verify(late)).entry["member"] == "ci"  # 30 s past exp < leeway
    expired = issuers.mint(
        "gh", AUD, claims=GITHUB_CLAIMS, issued=now - 600, lifetime=600 - LEEWAY_S - 5
    )
    error = refused(v, expired)
    assert error.check == "expired" and f"leeway {LEEWAY_S} s" in str(error)
    future = issuers.mint("gh", AUD, claims=GITHUB_CLAIMS, issued=now + LEEWAY_S + 30)
    assert refused(v, future).check in {"not_yet_valid", "issued_at"}
    no_exp = issuers.mint("gh", AUD, claims={**GITHUB_CLAIMS, "exp": None})
    assert refused(v, no_exp).check in {"missing_claim", "malformed"}


def test_an_unknown_kid_flood_fetches_the_key_set_once(issuers):
    gh = issuers.issuers["gh"]
    v = verifier(entry(gh.url))
    assert asyncio.run(v.verify(issuers.mint("gh", AUD, claims=GITHUB_CLAIMS)))
    assert issuers.jwks_fetches("gh") == 1

    async def flood() -> list[BaseException | Any]:
        tokens = [
            issuers.mint("gh", AUD, claims=GITHUB_CLAIMS, kid=f"made-up-{i}", key=gh.keys["gh-rs"])
            for i in range(200)
        ]
        return await asyncio.gather(*(v.verify(t) for t in tokens), return_exceptions=True)

    results = asyncio.run(flood())
    assert all(isinstance(r, IdentityRefused) and r.check == "unknown_key" for r in results)
    # The set was fetched at most once more (the first unknown kid, REFETCH_S after the last).
    assert issuers.jwks_fetches("gh") <= 2
    assert v.fetches == issuers.jwks_fetches("gh")


def test_a_rotated_key_is_fetched_on_its_first_use(issuers, monkeypatch):
    import addons.gateway_mode.oidc as oidc

    monkeypatch.setattr(oidc, "REFETCH_S", 0.0)
    gh = issuers.issuers["gh"]
    v = verifier(entry(gh.url))
    assert asyncio.run(v.verify(issuers.mint("gh", AUD, claims=GITHUB_CLAIMS)))
    from cryptography.hazmat.primitives.asymmetric import rsa

    gh.keys["gh-rs-2"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = issuers.mint("gh", AUD, claims=GITHUB_CLAIMS, kid="gh-rs-2")
    assert asyncio.run(v.verify(token)).entry["member"] == "ci"
    assert issuers.jwks_fetches("gh") == 2


def test_a_1mb_bearer_is_refused_unread(issuers):
    v = verifier(entry(issuers.issuers["gh"].url))
    token = "eyJ" + "A" * (1024 * 1024)
    assert refused(v, token).check == "too_large"
    assert issuers.jwks_fetches("gh") == 0


def test_an_unreachable_issuer_is_a_503_and_not_fetched_again_at_once(issuers):
    gh = issuers.issuers["gh"]
    gh.down = True
    v = verifier(entry(gh.url))
    token = issuers.mint("gh", AUD, claims=GITHUB_CLAIMS)
    error = refused(v, token)
    assert (error.check, error.status) == ("issuer_unavailable", 503)
    assert "127.0.0.1 answered 503" in str(error)
    assert refused(v, token).status == 503
    assert issuers.fetches["/gh/.well-known/openid-configuration"] == 1


def test_an_issuer_behind_an_unknown_ca_is_unreachable(issuers, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE")
    monkeypatch.setenv("SSL_CERT_DIR", "/nonexistent")
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent/ca.pem")
    v = verifier(entry(issuers.issuers["gh"].url))
    error = refused(v, issuers.mint("gh", AUD, claims=GITHUB_CLAIMS))
    assert error.status == 503 and "unreachable" in str(error)


def test_a_discovery_document_naming_another_issuer_is_refused(issuers):
    gh = issuers.issuers["gh"]
    # The identity's issuer differs from what the server's discovery document says (a
    # trailing slash): the document is refused, so is the token.
    v = verifier(entry(gh.url + "/"))
    token = issuers.mint("gh", AUD, claims={**GITHUB_CLAIMS, "iss": gh.url + "/"})
    error = refused(v, token)
    assert error.status == 503 and "another issuer" in str(error)


@pytest.mark.parametrize("where", ["http jwks_uri", "redirect"])
def test_keys_come_over_https_and_no_redirect_is_followed(issuers, where):
    gh, idp = issuers.issuers["gh"], issuers.issuers["idp"]
    plain = f"http://127.0.0.1:{issuers.port}/gh/jwks"
    if where == "http jwks_uri":
        gh.jwks_uri = plain
    else:  # to another issuer's discovery document, itself fine
        gh.redirect = f"{idp.url}/.well-known/openid-configuration"
    v = verifier(entry(gh.url))
    error = refused(v, issuers.mint("gh", AUD, claims=GITHUB_CLAIMS))
    assert (error.check, error.status) == ("issuer_unavailable", 503)
    assert ("no https jwks_uri" if where == "http jwks_uri" else "answered 302") in str(error)
    assert issuers.jwks_fetches("gh") == 0
    assert issuers.fetches["/idp/.well-known/openid-configuration"] == 0


# -- the member auth path (taddons) -------------------------------------------------------------


def test_member_auth_checks_a_jwt_bearer_and_drops_it(issuers):
    from mitmproxy.test import taddons, tflow

    from addons.common import ALLOWED, REFUSED
    from addons.gateway_mode.auth import MemberAuth
    from addons.gateway_mode.core import MEMBER, GatewayCore

    core = GatewayCore()
    gh = issuers.issuers["gh"]
    core.oidc.load([entry(gh.url)])
    addon = MemberAuth(core)
    good = issuers.mint("gh", AUD, claims=GITHUB_CLAIMS)
    expired = issuers.mint("gh", AUD, claims=GITHUB_CLAIMS, issued=time.time() - 900, lifetime=60)

    async def run(token: str) -> Any:
        with taddons.context(addon):
            flow = tflow.tflow()
            flow.metadata[ALLOWED] = True
            flow.request.headers["authorization"] = f"Bearer {token}"
            await addon.requestheaders(flow)
            return flow

    flow = asyncio.run(run(good))
    assert "authorization" not in flow.request.headers
    assert flow.response is None
    assert flow.metadata[MEMBER]["identity"] == "oi_000000000001"
    assert flow.metadata[MEMBER]["subject"] == GITHUB_CLAIMS["sub"]
    assert good not in json.dumps(flow.metadata)
    flow = asyncio.run(run(expired))
    assert flow.response.status_code == 401 and flow.metadata[REFUSED] == "identity-auth"
    assert json.loads(flow.response.content)["error"]["check"] == "expired"
    assert expired.encode() not in flow.response.content
    assert "authorization" not in flow.request.headers
