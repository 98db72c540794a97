"""``codex-proxy gateway [--config FILE] [--database URL] COMMAND`` (``./run.sh gateway``):
admin commands and ``serve``.

Admin commands talk to the database directly and print for people (``usage --json`` for
programs): one function per command, which its subparser names (``set_defaults(admin=...)``),
run by :func:`run_admin`. ``serve`` reads the upstream keys from stdin (before listening; they
never touch disk), then runs mitmproxy's ``mitmdump`` in this process with
``addons/gateway.py``.
Exit codes: 0 ok; 1 key or database errors at ``serve`` start; 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import yaml
from sqlalchemy.exc import SQLAlchemyError

from addons.codex_models import catalog
from addons.credits import RateCard
from addons.gateway_mode import audit, identities, keypool, team_cli, teams
from addons.gateway_mode.config import (
    DEFAULT_GATEWAY_CONFIG,
    GatewayConfig,
    load_gateway_config,
    rate_card_gap_lines,
    rate_card_gaps,
)
from addons.gateway_mode.database import Database, DatabaseError, now_ms
from addons.gateway_mode.ledger import IN_FLIGHT, KIND_ORDER
from addons.gateway_mode.lifetimes import expired, format_expiry, key_expiry
from addons.gateway_mode.model_policy import parse_patterns
from addons.gateway_mode.tls import listen_policy
from addons.gateway_mode.windows import MICRO, iso, overshoot_note, parse_since
from addons.hardening import harden_process
from addons.invocation import prog as invocation_prog
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
from addons.responses_turn import USAGE_KINDS
from addons.routing import parse_upstream_url

EXIT_ERROR, EXIT_USAGE = 1, 2
SCRIPT_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gateway.py"
)


#: The largest quota a member may have, in tokens or micro-credits: the ``BIGINT`` columns'
#: range (and far past any real use: 9.2e18 tokens, 9.2e12 credits).
MAX_AMOUNT = 2**63 - 1
#: The largest ``max_concurrent`` (an ``INTEGER`` column).
MAX_CONCURRENT = 1_000_000


def _whole(value: str, maximum: int) -> int:
    """A whole number ``0..maximum`` given in decimal digits (``1e3``, ``1.0``, ``inf`` are
    refused), for argparse (its error becomes exit 2 with the message)."""
    text = value.strip()
    if not text.isdigit() or not text.isascii():
        raise argparse.ArgumentTypeError(
            f"expected a whole number >= 0 (0 = unlimited), got {value[:40]!r}"
        )
    if len(text.lstrip("0")) > len(str(maximum)) or int(text, 10) > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value[:40]}")
    return int(text, 10)


def _count(value: str) -> int:
    """Tokens: a whole number ``0..MAX_AMOUNT``."""
    return _whole(value, MAX_AMOUNT)


def _concurrency(value: str) -> int:
    """Requests in flight: a whole number ``0..MAX_CONCURRENT``."""
    return _whole(value, MAX_CONCURRENT)


def _credits(value: str) -> int:
    """Credits as given (``12.5``) to integer micro-credits, ``0..MAX_AMOUNT``; ``NaN``,
    infinities, exponents past the range and more than 6 decimals are refused."""
    if len(value) > 64:
        raise argparse.ArgumentTypeError(f"expected a number of credits, got {value[:40]!r}...")
    try:
        number = Decimal(value.strip())
    except ArithmeticError:
        raise argparse.ArgumentTypeError(f"expected a number of credits, got {value!r}") from None
    if not number.is_finite() or number < 0:
        raise argparse.ArgumentTypeError("must be a finite number >= 0 (0 = unlimited)")
    if number.adjusted() > 18 or number * MICRO > MAX_AMOUNT:
        raise argparse.ArgumentTypeError(f"must be at most {Decimal(MAX_AMOUNT) / MICRO} credits")
    micro = number * MICRO
    if micro != micro.to_integral_value():
        raise argparse.ArgumentTypeError("credits have at most 6 decimals")
    return int(micro)


def _models(value: str) -> str:
    """A ``--models`` value, checked (:func:`addons.gateway_mode.model_policy.parse_patterns`)
    and normalised; ``""`` for every model."""
    try:
        return ",".join(parse_patterns(value))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _member_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--five-hour-quota",
        type=_count,
        metavar="TOKENS",
        help="tokens per rolling 5 hours (0 = unlimited)",
    )
    parser.add_argument(
        "--weekly-quota",
        type=_count,
        metavar="TOKENS",
        help="tokens per rolling 7 days (0 = unlimited)",
    )
    parser.add_argument(
        "--five-hour-credits",
        type=_credits,
        metavar="C",
        help="Codex credits per rolling 5 hours (0 = unlimited)",
    )
    parser.add_argument(
        "--weekly-credits",
        type=_credits,
        metavar="C",
        help="Codex credits per rolling 7 days (0 = unlimited)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=_concurrency,
        metavar="N",
        help="requests in flight at once (0 = unlimited)",
    )
    parser.add_argument(
        "--models",
        type=_models,
        metavar="PATTERN[,PATTERN...]",
        help="the models the member (or the team's members) may use (a * matches any run "
        "of characters, e.g. 'gpt-5.6-luna,gpt-6*'); empty ('') = every model",
    )


def build_parser() -> argparse.ArgumentParser:
    """The gateway's command line (names fixed by issue 8: scripts drive them)."""
    from addons.invocation import prog

    parser = argparse.ArgumentParser(
        prog=prog("gateway"),
        description="Codex gateway: member keys, usage and quotas in tokens and credits, and an "
        "upstream key pool, in front of the OpenAI Responses API.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=DEFAULT_GATEWAY_CONFIG,
        help="YAML config (default: the shipped config/gateway.yaml)",
    )
    parser.add_argument(
        "--database",
        metavar="URL",
        help="sqlite:///path.db (relative to the current directory; sqlite:////abs/path.db) or "
        "postgresql://user@host/db; default: the config's, else gateway.db in the data "
        "directory (beside your own --config; with the shipped one, "
        "$XDG_DATA_HOME/codex-proxy or ~/.local/share/codex-proxy)",
    )
    parser.add_argument(
        "--actor",
        metavar="NAME",
        help="who makes an admin change, for the audit log (default: the OS user)",
    )
    # Each admin command's subparser names its function (``ns.admin``, run by run_admin);
    # serve is main's own.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    init = sub.add_parser("init", help="create or migrate the schema (idempotent)")
    init.set_defaults(admin=init_schema)
    add = sub.add_parser("add-member", help="add a member")
    add.set_defaults(admin=add_member)
    add.add_argument("name")
    _member_options(add)
    team_cli.team_option(add)
    setm = sub.add_parser("set-member", help="change a member's limits (0 = unlimited)")
    setm.set_defaults(admin=set_member)
    setm.add_argument("name")
    _member_options(setm)
    team_cli.team_option(setm)
    team_cli.add_parsers(sub, _member_options, member_settings, _table)
    lm = sub.add_parser("list-members", help="members and their limits")
    lm.set_defaults(admin=list_members)
    key = sub.add_parser("add-key", help="a new member key, printed once as stdout's last line")
    key.set_defaults(admin=add_key)
    key.add_argument("name")
    key.add_argument(
        "--expires",
        metavar="WHEN",
        help="when the key stops working: a lifetime (12h, 7d, 30d), a date (2027-01-31: the end "
        "of that day, UTC), an ISO-8601 time, or never (default: the YAML default_key_lifetime)",
    )
    lk = sub.add_parser("list-keys", help="key ids, members, created, last used, expiry, revoked")
    lk.set_defaults(admin=list_keys)
    lk.add_argument("name", nargs="?")
    rk = sub.add_parser("revoke-key", help="revoke a member key by id")
    rk.set_defaults(admin=revoke_key)
    rk.add_argument("key_id")
    au = sub.add_parser("audit", help="the audit log of admin changes (who, what, when)")
    au.set_defaults(admin=audit_log)
    au.add_argument("--since", help="5h, 7d, 30m or an ISO-8601 time (default: the whole log)")
    au.add_argument("--json", action="store_true", help="one JSON object per line")
    identities.add_parsers(sub)  # add-identity, list-identities, remove-identity (issue 31)
    us = sub.add_parser("usage", help="tokens, credits and USD per member")
    us.set_defaults(admin=usage)
    us.add_argument("--member", metavar="NAME")
    us.add_argument(
        "--by",
        choices=("member", "team"),
        default="member",
        help="a row per member (default) or per team (the team each request was spent under)",
    )
    us.add_argument("--since", default="7d", help="5h, 7d, 30m or an ISO-8601 time (default 7d)")
    us.add_argument("--json", action="store_true", help="machine-readable output")
    us.add_argument(
        "--unpriced",
        action="store_true",
        help="also list every Codex catalog model the rate card cannot price, with its YAML key",
    )
    serve = sub.add_parser(
        "serve", help="run the gateway (upstream keys on stdin: NAME KEY or KEY per line)"
    )
    serve.add_argument("--port", type=port_number)
    serve.add_argument("--server-info", metavar="FILE")
    serve.add_argument("--http-shutdown", action="store_true", default=None)
    serve.add_argument("--upstream-url", metavar="URL")
    serve.add_argument("--dump-dir", metavar="DIR")
    serve.add_argument("--record", metavar="DIR")
    serve.add_argument("--listen-host", metavar="HOST")
    serve.add_argument(
        "--metrics-token-file",
        metavar="FILE",
        help="token that unlocks GET /metrics and /health's detail (YAML metrics_token_file)",
    )
    serve.add_argument(
        "--workers",
        metavar="N",
        default="1",
        help="worker processes sharing the port (a number or auto; default 1)",
    )
    serve.add_argument(
        "--insecure-listen",
        action="store_true",
        default=None,
        help="allow a non-loopback listen host without TLS",
    )
    serve.add_argument(
        "--websockets",
        action="store_true",
        default=None,
        help="kept for old scripts: the WebSocket routes are served by default",
    )
    serve.add_argument(
        "--no-websockets",
        action="store_true",
        default=None,
        help="refuse WebSocket upgrades (426 for Codex, which then uses HTTP; 403 for "
        "/v1/realtime); YAML websockets: false",
    )
    serve.add_argument(
        "--chat-bridge",
        action="store_true",
        default=None,
        help="serve POST /v1/chat/completions to members, translated to the Responses "
        "upstream (YAML chat_bridge: true)",
    )
    serve.add_argument(
        "--set",
        dest="setoptions",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        type=set_spec,
    )
    return parser


def member_settings(ns: argparse.Namespace) -> dict[str, int | None]:
    """``add-member`` / ``set-member`` flags as member columns (absent flags: ``None``)."""
    return {
        "five_hour_quota": ns.five_hour_quota,
        "weekly_quota": ns.weekly_quota,
        "five_hour_credits_micro": ns.five_hour_credits,
        "weekly_credits_micro": ns.weekly_credits,
        "max_concurrent": ns.max_concurrent,
    }


def _credits_text(micro: int) -> str:
    return f"{(Decimal(micro) / MICRO).normalize():f}" if micro else "0"


def summarize_usage(
    rows: list[dict[str, Any]],
    card: RateCard,
    connections: list[dict[str, Any]] | None = None,
    refusals: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Per member and total, from ``usage`` rows: ``requests`` (forwarded and ended, warm-ups
    not included), ``warmups`` (Codex's socket ``"generate": false``), ``errors`` (requests
    that ended with an error or a status >= 400: the row's ``error`` column is the judge, also
    for a reply whose usage could not be read), token kinds (warm-ups' included), ``credits``
    and ``usd`` (exact sums of the priced rows; ``None`` when every row with tokens was
    unpriced, never 0), ``unpriced`` (rows with tokens and no credits: the card had no entry
    for their model when they ran), ``credits_complete`` (no unpriced row), ``in_flight``
    (forwarded, no end recorded: still running, or the gateway was killed). From
    ``connections`` (``ws_connections`` rows): ``ws_connections``, ``ws_open`` (no close
    recorded), ``ws_client_messages`` / ``ws_upstream_messages``. From ``refusals``
    (``refusals`` rows): ``refused`` and ``refusals`` by kind
    (:data:`addons.gateway_mode.ledger.KIND_ORDER`). Refusals with no member (unknown or
    missing member key) are ``without_member``, and in ``total``."""

    def empty() -> dict[str, Any]:
        return {
            "requests": 0,
            "warmups": 0,
            "errors": 0,
            "refused": 0,
            "refusals": dict.fromkeys(KIND_ORDER, 0),
            "input_tokens": 0,
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "output_tokens": 0,
            "reasoning_tokens": 0,
            "total_tokens": 0,
            "credits_micro": 0,
            "priced": 0,
            "unpriced": 0,
            "in_flight": 0,
            "ws_connections": 0,
            "ws_open": 0,
            "ws_client_messages": 0,
            "ws_upstream_messages": 0,
        }

    per: dict[str, dict[str, Any]] = {}
    total = empty()
    without_member = empty()
    for row in rows:
        buckets = (per.setdefault(row["member"], empty()), total)
        if row.get("duration_ms") is None and row.get("error") == IN_FLIGHT:
            # Forwarded, no end recorded yet: running now, or the gateway was killed.
            for bucket in buckets:
                bucket["in_flight"] += 1
            continue
        for bucket in buckets:
            if row.get("warmup"):
                bucket["warmups"] += 1
            else:
                bucket["requests"] += 1
                bucket["errors"] += 1 if row["error"] or (row["status"] or 0) >= 400 else 0
            for kind in USAGE_KINDS:
                bucket[f"{kind}_tokens"] += row[f"{kind}_tokens"]
            if row["credits_micro"] is not None:
                bucket["priced"] += 1
                bucket["credits_micro"] += row["credits_micro"]
            elif row["total_tokens"]:
                bucket["unpriced"] += 1

    for conn in connections or []:
        for bucket in (per.setdefault(conn["member"], empty()), total):
            bucket["ws_connections"] += 1
            bucket["ws_open"] += 1 if conn["closed_ms"] is None else 0
            bucket["ws_client_messages"] += conn["client_messages"]
            bucket["ws_upstream_messages"] += conn["upstream_messages"]

    for refusal in refusals or []:
        owner = (
            per.setdefault(refusal["member"], empty())
            if refusal["member"] is not None
            else without_member
        )
        kind = refusal["kind"] if refusal["kind"] in KIND_ORDER else "gateway"
        for bucket in (owner, total):
            bucket["refused"] += refusal["count"]
            bucket["refusals"][kind] += refusal["count"]

    def finish(bucket: dict[str, Any]) -> dict[str, Any]:
        credits = Decimal(bucket.pop("credits_micro")) / MICRO
        priced = bucket.pop("priced")
        shown = not bucket["unpriced"] or priced
        bucket["credits"] = float(credits) if shown else None
        bucket["usd"] = float(card.usd(credits)) if shown else None
        bucket["credits_complete"] = not bucket["unpriced"]
        return bucket

    summary = {
        "members": [{"member": name, **finish(b)} for name, b in sorted(per.items())],
        "total": finish(total),
    }
    summary["without_member"] = {
        "refused": without_member["refused"],
        "refusals": without_member["refusals"],
    }
    return summary


def _table(rows: list[list[str]], out: Any) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write(
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() + "\n"
        )


#: An admin command: runs on the open database, writes for people to ``out``. Raises
#: ``ValueError`` / :class:`DatabaseError` / SQLAlchemy errors for :func:`main` to report.
AdminCommand = Callable[[Database, argparse.Namespace, GatewayConfig, Any], None]


def init_schema(db: Database, ns: argparse.Namespace, config: GatewayConfig, out: Any) -> None:
    """``init``: create or migrate the schema (idempotent)."""
    revision = db.migrate(actor=ns.actor)
    out.write(f"database ready (schema {revision}): {db.location}\n")


def add_member(db: Database, ns: argparse.Namespace, config: GatewayConfig, out: Any) -> None:
    """``add-member NAME [limits]``; with a credit quota, a warning on stderr when the rate
    card cannot price Codex's default model (every default Codex turn would be refused)."""
    if getattr(ns, "team", None):
        teams.require_team(db, ns.team)
    settings = {k: v for k, v in member_settings(ns).items() if v is not None}
    db.add_member(ns.name, ns.models or None, actor=ns.actor, **settings)
    team_cli.member_team(db, ns)
    out.write(f"member {ns.name} added\n")
    note = overshoot_note(member_settings(ns), config.quota_max_concurrent)
    if note:
        sys.stderr.write(note + "\n")
    _warn_unpriced_default(ns, config)


def set_member(db: Database, ns: argparse.Namespace, config: GatewayConfig, out: Any) -> None:
    """``set-member NAME limits``: at least one limit, else ``ValueError``; warns as
    ``add-member`` does when it sets a credit quota."""
    changes = {k: v for k, v in member_settings(ns).items() if v is not None}
    if not changes and ns.models is None and getattr(ns, "team", None) is None:
        raise ValueError("set-member: give at least one limit (or --models, --team) to change")
    if changes or ns.models is not None:
        models = ... if ns.models is None else ns.models or None
        db.set_member(ns.name, models, actor=ns.actor, **changes)
    team_cli.member_team(db, ns)
    out.write(f"member {ns.name} updated\n")
    _warn_unpriced_default(ns, config)


def _warn_unpriced_default(ns: argparse.Namespace, config: GatewayConfig) -> None:
    """One warning (stderr) when ``ns`` gives a credit quota and the rate card cannot price
    the model Codex sends when its config names none."""
    if not (ns.five_hour_credits or ns.weekly_credits):
        return
    card = config.rate_card()
    default = catalog().default_model
    if card.prices(default):
        return
    sys.stderr.write(
        f"warning: member {ns.name} has a credit quota, and the rate card in {config.path} "
        f"cannot price {default}, the model Codex uses by default: every such request of "
        f"{ns.name} will be refused (unpriced_model). Set credits.{card.table_key}.{default} "
        "(e.g. {same_as: gpt-5.5}, an estimate you own); gateway usage --unpriced lists the "
        "others\n"
    )


def list_members(db: Database, ns: argparse.Namespace, config: GatewayConfig, out: Any) -> None:
    """``list-members``: a table of the members and their limits (``-``: unlimited), and a
    ``team`` column once any member is in a team."""
    rows = [
        [
            "member",
            "5h tokens",
            "weekly tokens",
            "5h credits",
            "weekly credits",
            "max concurrent",
            "models",
        ]
    ]
    everyone = db.members()
    names = teams.team_names(db) if any(m.get("team_id") for m in everyone) else {}
    if names:
        rows[0].append("team")
    for m in everyone:
        rows.append(
            [
                m["name"],
                str(m["five_hour_quota"] or "-"),
                str(m["weekly_quota"] or "-"),
                _credits_text(m["five_hour_credits_micro"])
                if m["five_hour_credits_micro"]
                else "-",
                _credits_text(m["weekly_credits_micro"]) if m["weekly_credits_micro"] else "-",
                str(m["max_concurrent"] or "-"),
                m.get("models") or "all",
            ]
        )
        if names:
            rows[-1].append(names.get(m["team_id"], "-") if m.get("team_id") else "-")
    _table(rows, out)


def add_key(db: Database, ns: argparse.Namespace, config: GatewayConfig, out: Any) -> None:
    """``add-key NAME [--expires WHEN]``: the new member key alone on stdout's last line, its
    id and expiry on stderr."""
    expires = key_expiry(ns.expires, config.default_key_lifetime, now_ms())
    key_id, key = db.add_key(ns.name, expires, actor=ns.actor)
    until = f"expires {format_expiry(expires)}" if expires is not None else "never expires"
    sys.stderr.write(
        f"member key {key_id} for {ns.name} ({until}); shown once, on the next line of stdout:\n"
    )
    sys.stderr.flush()
    out.write(key + "\n")


def list_keys(db: Database, ns: argparse.Namespace, config: GatewayConfig, out: Any) -> None:
    """``list-keys [NAME]``: key ids, members, created, last used, expiry (``expired``
    once past), revoked."""
    now = now_ms()
    rows = [["id", "member", "created", "last used", "expires", "revoked"]]
    for k in db.list_keys(ns.name):
        expires = iso(k["expires_ms"]) or "never"
        if expired(k["expires_ms"], now):
            expires += " (expired)"
        rows.append(
            [
                k["id"],
                k["member"],
                iso(k["created_ms"]) or "-",
                iso(k["last_used_ms"]) or "never",
                expires,
                iso(k["revoked_ms"]) or "no",
            ]
        )
    _table(rows, out)


def revoke_key(db: Database, ns: argparse.Namespace, config: GatewayConfig, out: Any) -> None:
    """``revoke-key KEY_ID``."""
    db.revoke_key(ns.key_id, actor=ns.actor)
    out.write(f"key {ns.key_id} revoked (the gateway refuses it within a second)\n")


def audit_log(db: Database, ns: argparse.Namespace, config: GatewayConfig, out: Any) -> None:
    """``audit [--since WHEN] [--json]``: the audit log, oldest first: a table (time, actor,
    host, action, target, what changed) or one JSON object per line
    (:func:`addons.gateway_mode.audit.json_line`)."""
    since = parse_since(ns.since, now_ms()) if ns.since else 0
    entries = db.audit_rows(since)
    if ns.json:
        for entry in entries:
            out.write(audit.json_line(entry) + "\n")
        return
    rows = [["time", "actor", "host", "action", "target", "change"]]
    for e in entries:
        rows.append(
            [
                iso(e["ts_ms"]) or "-",
                e["actor"],
                e["host"] or "-",
                e["action"],
                e["target"],
                audit.describe(e["before"], e["after"]),
            ]
        )
    if len(rows) == 1:
        out.write("no admin changes recorded" + (f" since {iso(since)}" if since else "") + "\n")
        return
    _table(rows, out)


def usage(db: Database, ns: argparse.Namespace, config: GatewayConfig, out: Any) -> None:
    """``usage [--member NAME] [--since WHEN] [--json] [--unpriced]``: :func:`summarize_usage`
    of the ledger since ``--since``, as JSON or as tables with their notes; the rate card's
    gaps in one line (every model with ``--unpriced``; always all of them in ``--json``)."""
    now = now_ms()
    since = parse_since(ns.since, now)
    card = config.rate_card()
    rows = db.usage_rows(since, ns.member)
    connections, refused = (
        db.ws_connection_rows(since, ns.member),
        db.refusal_rows(since, ns.member),
    )
    by = getattr(ns, "by", "member")
    grouped = (rows, connections, refused)
    if by == "team":
        grouped = team_cli.by_team(db, rows, connections, refused)
    summary = summarize_usage(grouped[0], card, grouped[1], grouped[2])
    if by == "team":
        summary["teams"] = [{"team": m.pop("member"), **m} for m in summary.pop("members")]
    gaps = rate_card_gaps(card)
    # Rows charged through a same_as entry of today's card (the shipped ESTIMATES among them):
    # the operator's estimate, not a published rate.
    estimated: dict[str, int] = {}
    for row in rows:
        if row["credits_micro"] is not None and row["rate"] in card.same_as:
            estimated[row["rate"]] = estimated.get(row["rate"], 0) + 1
    if ns.json:
        doc = {
            "since": iso(since),
            "until": iso(now),
            **summary,
            "priced_by_same_as": estimated,
            "unpriced_models": gaps,
            "identities": identities.identity_usage(db, rows),
        }
        out.write(json.dumps(doc, indent=2) + "\n")
        return
    out.write(f"usage since {iso(since)}\n")
    _usage_table(summary, out, by)
    _refusal_table(summary, out, by)
    for entry in identities.identity_usage(db, rows):  # members without static keys
        subjects = ", ".join(f"{sub} ({n})" for sub, n in sorted(entry["subjects"].items()))
        out.write(
            f"identity {entry['identity']} ({entry['member']}, {entry['issuer']}): "
            f"{entry['requests']} request(s), {entry['total_tokens']} tokens; subjects: "
            f"{subjects}\n"
        )
    total = summary["total"]
    if total["warmups"]:
        out.write(
            f"{total['warmups']} warm-up(s): Codex's WebSocket warm-up (generate: false), "
            "not a request; its tokens and credits are counted\n"
        )
    if total["in_flight"]:
        out.write(
            f"{total['in_flight']} request(s) forwarded with no end "
            "recorded: still running, or the gateway was killed while they ran\n"
        )
    if total["ws_open"]:
        out.write(
            f"{total['ws_open']} WebSocket connection(s) with no close recorded: still "
            "open, or the gateway was killed while they were\n"
        )
    if total["unpriced"]:
        out.write(
            f"{total['unpriced']} request(s) unpriced: their model had no rate-card entry "
            f"(credits.{card.table_key}) when they ran; their credits are unknown, not 0 "
            '("unpriced": none priced; ">=": the priced ones only)\n'
        )
    if estimated:
        entries = ", ".join(f"{rate} ({n})" for rate, n in sorted(estimated.items()))
        out.write(
            f"{sum(estimated.values())} request(s) charged through same_as entries, an "
            f"estimate the operator owns (not a published rate): {entries}\n"
        )
    for line in rate_card_gap_lines(gaps, config.path, card, full=ns.unpriced):
        out.write(line + "\n")


def _money(bucket: dict[str, Any], key: str, digits: int) -> str:
    """``credits`` / ``usd`` for the table: ``unpriced`` when nothing was priced, ``>=`` before
    a sum that leaves unpriced requests out."""
    value = bucket[key]
    if value is None:
        return "unpriced"
    text = f"{value:.{digits}f}"
    if key == "credits":
        text = text.rstrip("0").rstrip(".")
    return text if bucket["credits_complete"] else f">={text}"


def _usage_table(summary: dict[str, Any], out: Any, by: str = "member") -> None:
    """The ``usage`` table: a row per member (``by="team"``: per team), then ``TOTAL``."""
    rows = [
        [
            by,
            "requests",
            "warmups",
            "errors",
            "refused",
            "input",
            "cached",
            "cache writes",
            "output",
            "reasoning",
            "total",
            "credits",
            "USD",
            "unpriced",
            "ws conns",
            "ws msgs in/out",
        ]
    ]
    for m in [*summary[f"{by}s"], {by: "TOTAL", **summary["total"]}]:
        rows.append(
            [
                m[by],
                str(m["requests"]),
                str(m["warmups"]),
                str(m["errors"]),
                str(m["refused"]),
                str(m["input_tokens"]),
                str(m["cached_tokens"]),
                str(m["cache_write_tokens"]),
                str(m["output_tokens"]),
                str(m["reasoning_tokens"]),
                str(m["total_tokens"]),
                _money(m, "credits", 6),
                _money(m, "usd", 4),
                str(m["unpriced"]),
                str(m["ws_connections"]),
                f"{m['ws_client_messages']}/{m['ws_upstream_messages']}",
            ]
        )
    _table(rows, out)


def _refusal_table(summary: dict[str, Any], out: Any, by: str = "member") -> None:
    """Refusals by kind, a row per member (``by="team"``: per team) that had any (and one
    for refusals with no member), then ``TOTAL``; nothing when there were none."""
    if not summary["total"]["refused"]:
        return
    out.write("refused requests by kind (answered by the gateway, never forwarded):\n")
    rows = [[by, *KIND_ORDER]]
    entries = [m for m in summary[f"{by}s"] if m["refused"]]
    if summary["without_member"]["refused"]:
        entries.append({by: "(no member key)", **summary["without_member"]})
    for m in [*entries, {by: "TOTAL", **summary["total"]}]:
        rows.append([m[by], *(str(m["refusals"][kind]) for kind in KIND_ORDER)])
    _table(rows, out)


def run_admin(ns: argparse.Namespace, config: GatewayConfig, out: Any) -> int:
    """Run one admin command: the function its subparser set as ``ns.admin``, on the
    database, whose schema must be current (except for ``init``, which makes it so).
    Returns 0. Raises ``ValueError`` / :class:`DatabaseError` / SQLAlchemy errors for
    :func:`main` to report."""
    command: AdminCommand = ns.admin
    ns.actor = audit.actor_name(ns.actor)  # ValueError: a bad --actor, before any change
    db = Database(ns.database or config.database_url())
    try:
        if command is not init_schema:
            db.check_schema()
        command(db, ns, config, out)
        return 0
    finally:
        db.dispose()


def serve_args(ns: argparse.Namespace, config: GatewayConfig, database_url: str) -> list[str]:
    """Arguments for ``mitmdump``: reverse mode to the upstream's origin, our script, options."""
    upstream = parse_upstream_url(config.upstream_url)
    options = OptionSpecs()
    put = options.put

    put("listen_host", config.listen_host)
    put("listen_port", config.port if config.port is not None else 0)
    put("keep_host_header", True)
    for name, value in config.mitmproxy.items():
        put(name, value)
    put("codex_upstream_url", upstream.url)
    put("codex_extra_routes", ["/v1/responses/compact"])
    put("codex_gateway_config", config.path)
    put("codex_gateway_database", database_url)
    put("codex_http_shutdown", config.http_shutdown)
    put("codex_redact_headers", config.redact_headers)
    put("codex_gateway_insecure_listen", config.insecure_listen)
    put("codex_gateway_websockets", config.websockets)
    put("codex_chat_bridge", config.chat_bridge)
    if (
        listen_policy(
            config.listen_host, list(config.mitmproxy.get("certs") or []), config.insecure_listen
        )
        != "loopback"
    ):
        put("codex_allow_remote", True)
    metrics_token = config.metrics_token_path()
    if metrics_token:
        put("codex_gateway_metrics_token_file", metrics_token)
    if config.server_info:
        put("codex_server_info", os.path.abspath(config.server_info))
    if config.dump_dir:
        put("codex_dump_dir", os.path.abspath(config.dump_dir))
    if config.record_dir:
        for name, value in record_options(config.record_dir).items():
            put(name, value)
        # The recording prices its requests with the gateway's own card (the config's
        # `credits:` section, no secrets), kept beside the recording.
        card_path = os.path.join(os.path.abspath(config.record_dir), "rate-card.yaml")
        with open(card_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config.credits, f, sort_keys=False)
        put("codex_rate_card", card_path)
    args = reverse_mode(upstream.host, upstream.port, SCRIPT_PATH)
    for spec in options.specs(ns.setoptions):
        args += ["--set", spec]
    return args


def apply_serve_flags(ns: argparse.Namespace, config: GatewayConfig) -> None:
    """Flags over the YAML config."""
    for flag, attr in (
        ("port", "port"),
        ("server_info", "server_info"),
        ("upstream_url", "upstream_url"),
        ("dump_dir", "dump_dir"),
        ("listen_host", "listen_host"),
    ):
        value = getattr(ns, flag)
        if value is not None:
            setattr(config, attr, value)
    if ns.metrics_token_file is not None:  # a flag's relative path is the shell's
        config.metrics_token_file = os.path.abspath(ns.metrics_token_file)
    if ns.http_shutdown:
        config.http_shutdown = True
    if ns.insecure_listen:
        config.insecure_listen = True
    if ns.websockets and ns.no_websockets:
        raise ValueError("serve: --websockets and --no-websockets contradict each other")
    if ns.websockets:
        config.websockets = True  # the default since issue 29; kept so old scripts run
    if ns.no_websockets:
        config.websockets = False
    if ns.chat_bridge:
        config.chat_bridge = True
    if ns.record is not None:
        config.record_dir = ns.record
        if config.dump_dir is None:
            config.dump_dir = os.path.join(ns.record, "dumps")


def upstream_keys_hint(stream: Any, err: Any) -> None:
    """When ``stream`` is a terminal, one line on ``err`` saying that ``serve`` waits for the
    upstream keys there, with the piped form (the strict proxy's hint, :func:`addons.cli.
    stdin_hint`); silent for a pipe or a file. Never raises."""
    try:
        if not os.isatty(stream.fileno()):
            return
    except (AttributeError, OSError, ValueError):
        return
    prog = invocation_prog("gateway serve")
    err.write(
        f"{prog}: waiting for the upstream keys on stdin, NAME KEY per line, then Ctrl-D "
        f"(typing shows them; pipe them: printf 'main %s\\n' \"$KEY1\" | {prog} ...)\n"
    )
    err.flush()


def serve(
    ns: argparse.Namespace,
    config: GatewayConfig,
    stdin: Any,
    harden: Callable[[], None],
    err: Any,
) -> int:
    """Check the database, read the upstream keys, run mitmdump. Returns the exit code."""
    apply_serve_flags(ns, config)
    database_url = ns.database or config.database_url()
    parse_upstream_url(config.upstream_url)
    workers = worker_count(ns.workers)
    listen_policy(
        config.listen_host, list(config.mitmproxy.get("certs") or []), config.insecure_listen
    )
    db = Database(database_url)
    try:
        db.check_schema()
    finally:
        db.dispose()
    spool = config.spool_path()
    os.makedirs(os.path.dirname(spool), exist_ok=True)  # the data directory, maybe new
    keys: list[keypool.UpstreamKey] = []

    def load() -> None:
        upstream_keys_hint(stdin, err)
        keys.extend(keypool.read_upstream_keys(stdin))
        keypool.POOL.set_keys(keys)
        err.write(f"gateway: {len(keys)} upstream key(s): {', '.join(k.name for k in keys)}\n")

    def take() -> bytearray:
        secret = bytearray().join(key.line() for key in keys)
        keypool.POOL.clear()
        return secret

    return launch(
        Secret(
            load=load,
            take=take,
            clear=keypool.POOL.clear,
            worker_load=keypool.load_from_fd,
            per_worker=lambda i: {"codex_gateway_spool": f"{spool}.{i}"},
        ),
        lambda: serve_args(ns, config, database_url),
        workers,
        harden,
        err,
    )


def main(
    argv: Sequence[str] | None = None,
    stdin: Any = None,
    out: Any = None,
    harden: Callable[[], None] = harden_process,
) -> int:
    """Run one gateway command; returns the exit code (see the module docstring)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    out = out or sys.stdout
    try:
        config = load_gateway_config(ns.config)
        if ns.command == "serve":
            return serve(
                ns, config, stdin if stdin is not None else sys.stdin.buffer, harden, sys.stderr
            )
        return run_admin(ns, config, out)
    except (ValueError, DatabaseError) as e:
        sys.stderr.write(f"{parser.prog}: error: {e}\n")
        return EXIT_USAGE
    except SQLAlchemyError as e:
        where = Database(ns.database or config.database_url(), create=False).location
        sys.stderr.write(
            f"{parser.prog}: database error in {where}: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}\n"
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
