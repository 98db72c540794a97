"""OIDC identities that name members (issue 31, "members without static keys"): their rules,
their queries and their admin commands (``add-identity``, ``list-identities``,
``remove-identity``).

An identity is an issuer (an ``https://`` URL, compared exactly with a token's ``iss``), an
audience (one of the token's ``aud``) and claim patterns (``{name: pattern}``, every one must
match; ``*`` in a pattern matches any run of characters, everything else is literal). The
gateway's side of the check is :mod:`addons.gateway_mode.oidc`.

GitHub Actions' issuer (:data:`GITHUB_ISSUER`) signs a token for every job of every
repository on github.com: an identity for it that names no owner would let any repository in
the world be the member. :func:`check_identity` therefore refuses it unless it pins
``repository_owner`` / ``repository_owner_id`` (no ``*``) or ``repository`` (an owner with no
``*``, then ``/``), docs/gateway.md "Members without static keys".
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import urllib.parse
from typing import Any

import sqlalchemy as sa

from addons.gateway_mode import audit
from addons.gateway_mode.database import MEMBER_SETTINGS, Database, DatabaseError, now_ms
from addons.gateway_mode.lifetimes import format_expiry, key_expiry
from addons.gateway_mode.schema import member_identities, members
from addons.gateway_mode.windows import iso

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
#: Claim names an identity may pin (JWT claim names in practice: letters, digits, ``_ . : -``).
CLAIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,99}")
#: Claims checked by the verifier itself, never by a pattern.
RESERVED_CLAIMS = frozenset({"iss", "aud", "exp", "nbf", "iat", "jti"})
MAX_PATTERN = 500
MAX_CLAIMS = 20
#: The first ``len(ID_PREFIX) + 12`` characters of an identity id (public, in ``usage``).
ID_PREFIX = "oi_"


def new_identity_id() -> str:
    """A public identity id: ``oi_`` and 12 hex digits."""
    return ID_PREFIX + secrets.token_hex(6)


def check_issuer(issuer: str) -> str:
    """An issuer URL as given: ``https://host[:port][/path]``, no user info, query or fragment,
    at most 500 characters.

    Raises:
        ValueError: naming the rule.
    """
    if not isinstance(issuer, str) or len(issuer) > 500:
        raise ValueError("--issuer: an https:// URL of at most 500 characters")
    parts = urllib.parse.urlsplit(issuer)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"--issuer must be an https:// URL (got {issuer[:80]!r})")
    if parts.username or parts.password or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError("--issuer must carry no user info, query or fragment")
    return issuer


def parse_claim(spec: str) -> tuple[str, str]:
    """``NAME=VALUE`` of ``--claim`` as ``(name, pattern)``.

    Raises:
        ValueError: no ``=``, a bad or reserved name, an empty or too long value.
    """
    name, sep, pattern = spec.partition("=")
    if not sep or CLAIM_NAME.fullmatch(name) is None:
        raise ValueError(f"--claim: expected NAME=VALUE, got {spec[:80]!r}")
    if name in RESERVED_CLAIMS:
        raise ValueError(
            f"--claim {name}: checked by the gateway itself (--issuer, --audience, the token's "
            "times); not a pattern"
        )
    if not pattern or len(pattern) > MAX_PATTERN:
        raise ValueError(f"--claim {name}: a value of 1-{MAX_PATTERN} characters")
    return name, pattern


def check_identity(issuer: str, audience: str, claims: dict[str, str]) -> None:
    """The rules of ``add-identity`` beyond each part's shape: an audience of 1-500
    characters, at most :data:`MAX_CLAIMS` claims, and GitHub's safe rule (module docstring).

    Raises:
        ValueError: naming the rule.
    """
    check_issuer(issuer)
    if not audience or len(audience) > 500:
        raise ValueError("--audience: 1-500 characters")
    if len(claims) > MAX_CLAIMS:
        raise ValueError(f"at most {MAX_CLAIMS} --claim")
    if issuer.rstrip("/") == GITHUB_ISSUER:
        owner = claims.get("repository_owner") or claims.get("repository_owner_id")
        repository = claims.get("repository", "")
        repo_owner, slash, _ = repository.partition("/")
        pinned = (owner is not None and "*" not in owner) or (
            bool(slash) and bool(repo_owner) and "*" not in repo_owner
        )
        if not pinned:
            raise ValueError(
                "GitHub Actions signs tokens for every repository on github.com: give "
                "--claim repository_owner=ORG (or repository_owner_id=ID), or --claim "
                "repository=ORG/REPO, with no * in the owner"
            )


def claim_matches(pattern: str, value: Any) -> bool:
    """Whether a token's claim ``value`` matches ``pattern`` (``*``: any run of characters,
    the rest literal, the whole value). A string is matched as is, a number or boolean as its
    JSON text (``true``, ``42``), a list when any of its items matches; anything else never."""
    if isinstance(value, list):
        return any(claim_matches(pattern, item) for item in value[:100])
    if isinstance(value, bool | int | float):
        value = json.dumps(value)
    if not isinstance(value, str):
        return False
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, value, re.DOTALL) is not None


def claims_match(patterns: dict[str, str], claims: dict[str, Any]) -> bool:
    """Whether every pattern matches its claim (a missing claim never matches)."""
    return all(name in claims and claim_matches(p, claims[name]) for name, p in patterns.items())


# -- queries -----------------------------------------------------------------------------------


def add_identity(
    db: Database,
    name: str,
    issuer: str,
    audience: str,
    claims: dict[str, str],
    expires_ms: int | None = None,
    *,
    actor: str | None = None,
) -> str:
    """Insert an identity for member ``name`` after :func:`check_identity`, good until
    ``expires_ms`` (epoch ms; ``None``: never). Returns its id. Audited (``add-identity``, by
    ``actor``; default the OS user) in the same transaction.

    Raises:
        ValueError: a rule of :func:`check_identity`.
        DatabaseError: unknown member.
    """
    check_identity(issuer, audience, claims)
    identity_id = new_identity_id()
    with db.engine.begin() as conn:
        member_id = conn.execute(sa.select(members.c.id).where(members.c.name == name)).scalar()
        if member_id is None:
            raise DatabaseError(f"no member named {name!r}")
        conn.execute(
            member_identities.insert().values(
                id=identity_id,
                member_id=member_id,
                issuer=issuer,
                audience=audience,
                claims=json.dumps(claims, sort_keys=True),
                created_ms=now_ms(),
                expires_ms=expires_ms,
            )
        )
        after: dict[str, Any] = {
            "member": name,
            "issuer": issuer,
            "audience": audience,
            "claims": claims,
        }
        if expires_ms is not None:
            after["expires_at"] = iso(expires_ms)
        audit.record(conn, actor or audit.default_actor(), "add-identity", identity_id, None, after)
    return identity_id


def list_identities(db: Database, name: str | None = None) -> list[dict[str, Any]]:
    """Identity rows (``id, member, issuer, audience, claims`` (a dict), ``created_ms,
    removed_ms``), by member and creation.

    Raises:
        DatabaseError: ``name`` given and unknown.
    """
    query = (
        sa.select(member_identities, members.c.name.label("member"))
        .join(members, members.c.id == member_identities.c.member_id)
        .order_by(members.c.name, member_identities.c.created_ms)
    )
    with db.engine.connect() as conn:
        if name is not None:
            if conn.execute(sa.select(members.c.id).where(members.c.name == name)).first() is None:
                raise DatabaseError(f"no member named {name!r}")
            query = query.where(members.c.name == name)
        rows = [dict(r._mapping) for r in conn.execute(query).all()]
    for row in rows:
        row["claims"] = json.loads(row["claims"])
    return rows


def remove_identity(db: Database, identity_id: str, *, actor: str | None = None) -> None:
    """Remove an identity by id (kept, marked removed, so old ``usage`` rows still name it;
    idempotent). Audited (``remove-identity``) in the same transaction when it was live.

    Raises:
        DatabaseError: unknown id.
    """
    with db.engine.begin() as conn:
        row = conn.execute(
            sa.select(member_identities.c.removed_ms, members.c.name)
            .join(members, members.c.id == member_identities.c.member_id)
            .where(member_identities.c.id == identity_id)
        ).first()
        if row is None:
            raise DatabaseError(f"no identity with id {identity_id!r}")
        if row.removed_ms is None:
            conn.execute(
                member_identities.update()
                .where(member_identities.c.id == identity_id)
                .values(removed_ms=now_ms())
            )
            audit.record(
                conn, actor or audit.default_actor(), "remove-identity", identity_id,
                {"member": row.name, "removed_at": None}, {"member": row.name, "removed_at": "now"},
            )  # fmt: skip


def directory_rows(db: Database) -> list[dict[str, Any]]:
    """Every identity not removed, as member directory entries: ``key_id`` (the identity's
    id), ``member_id``, ``member``, :data:`MEMBER_SETTINGS`, ``models``, ``expires_ms``, and
    ``issuer``, ``audience``, ``claims`` (a dict), oldest first (the order identities are
    tried in)."""
    query = (
        sa.select(
            member_identities.c.id.label("key_id"),
            member_identities.c.issuer,
            member_identities.c.audience,
            member_identities.c.claims,
            member_identities.c.expires_ms,
            members.c.id.label("member_id"),
            members.c.name.label("member"),
            *(members.c[column] for column in MEMBER_SETTINGS),
            members.c.models,
        )
        .join(members, members.c.id == member_identities.c.member_id)
        .where(member_identities.c.removed_ms.is_(None))
        .order_by(member_identities.c.created_ms, member_identities.c.id)
    )
    with db.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query).all()]
    for row in rows:
        row["claims"] = json.loads(row["claims"])
    return rows


# -- admin commands ----------------------------------------------------------------------------


def add_parsers(sub: Any) -> None:
    """Add ``add-identity``, ``list-identities`` and ``remove-identity`` to the gateway's
    subparsers (each names its function, as the other admin commands do)."""
    add = sub.add_parser(
        "add-identity",
        help="let an OIDC identity (GitHub Actions, the team's IdP) be a member, no key needed",
    )
    add.set_defaults(admin=add_identity_command)
    add.add_argument("name", metavar="MEMBER")
    add.add_argument("--issuer", required=True, metavar="URL", help="https:// issuer (iss)")
    add.add_argument("--audience", required=True, metavar="AUD", help="one of the token's aud")
    add.add_argument(
        "--expires",
        metavar="WHEN",
        help="when the identity stops naming the member, as add-key's --expires (default: the "
        "YAML default_key_lifetime)",
    )
    add.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a claim that must match (repeatable; * matches any run of characters)",
    )
    lst = sub.add_parser("list-identities", help="identity ids, members, issuers, claims")
    lst.set_defaults(admin=list_identities_command)
    lst.add_argument("name", nargs="?", metavar="MEMBER")
    rm = sub.add_parser("remove-identity", help="remove an identity by id")
    rm.set_defaults(admin=remove_identity_command)
    rm.add_argument("identity_id", metavar="ID")


def add_identity_command(db: Database, ns: argparse.Namespace, config: Any, out: Any) -> None:
    """``add-identity MEMBER --issuer URL --audience AUD [--claim NAME=VALUE]...``."""
    claims: dict[str, str] = {}
    for spec in ns.claim:
        name, pattern = parse_claim(spec)
        if name in claims:
            raise ValueError(f"--claim {name} given twice")
        claims[name] = pattern
    expires = key_expiry(ns.expires, getattr(config, "default_key_lifetime", None), now_ms())
    actor = getattr(ns, "actor", None)
    identity_id = add_identity(db, ns.name, ns.issuer, ns.audience, claims, expires, actor=actor)
    until = f"expires {format_expiry(expires)}" if expires is not None else "never expires"
    out.write(f"identity {identity_id} for {ns.name} added ({until})\n")


def list_identities_command(db: Database, ns: argparse.Namespace, config: Any, out: Any) -> None:
    """``list-identities [MEMBER]``: one line per identity."""

    rows = list_identities(db, ns.name)
    if not rows:
        out.write("no identities\n")
        return
    for row in rows:
        claims = " ".join(f"{k}={v}" for k, v in sorted(row["claims"].items())) or "-"
        removed = f" removed {iso(row['removed_ms'])}" if row["removed_ms"] else ""
        if row.get("expires_ms") is not None:
            removed = f" expires {iso(row['expires_ms'])}{removed}"
        out.write(
            f"{row['id']}  {row['member']}  issuer={row['issuer']}  "
            f"audience={row['audience']}  claims: {claims}  created {iso(row['created_ms'])}"
            f"{removed}\n"
        )


def remove_identity_command(db: Database, ns: argparse.Namespace, config: Any, out: Any) -> None:
    """``remove-identity ID``."""
    remove_identity(db, ns.identity_id, actor=getattr(ns, "actor", None))
    out.write(f"identity {ns.identity_id} removed (the gateway refuses it within a second)\n")


def identity_usage(db: Database, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where the identity members' requests came from, for ``usage``: from ``usage`` rows
    (finished, warm-ups included), one entry per identity id that has rows (``identity``,
    ``member``, ``issuer``, ``requests``, ``total_tokens``, ``subjects``: ``{sub: requests}``),
    by member then id. Member-key rows are left out."""
    per: dict[str, dict[str, Any]] = {}
    for row in rows:
        key_id = row.get("key_id") or ""
        if not key_id.startswith(ID_PREFIX) or row.get("duration_ms") is None:
            continue
        entry = per.setdefault(
            key_id,
            {"identity": key_id, "member": row["member"], "requests": 0, "total_tokens": 0},
        )
        entry["requests"] += 1
        entry["total_tokens"] += row["total_tokens"]
        subjects = entry.setdefault("subjects", {})
        subject = row.get("subject") or "-"
        subjects[subject] = subjects.get(subject, 0) + 1
    if not per:
        return []
    issuers = {r["id"]: r["issuer"] for r in list_identities(db)}
    for entry in per.values():
        entry["issuer"] = issuers.get(entry["identity"])
    return sorted(per.values(), key=lambda e: (e["member"], e["identity"]))
