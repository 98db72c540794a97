"""Which models a member may use: patterns, the rule that judges a model, and the refusal.

A member's ``models`` setting (``add-member`` / ``set-member --models PATTERN[,PATTERN...]``,
the ``members.models`` column) is a list of patterns; a ``*`` in a pattern matches any run of
characters (none included), every other character only itself, case-sensitively, as model
names are. An empty list allows every model. A model is judged by its base model too: the
``-effort`` suffix of a Chat Completions model name (``gpt-5.6-luna-high``) is stripped by the
bridge's own rule (:func:`addons.bridge.efforts.resolve`: only when the whole name is no known
model, so ``gpt-5.1-codex-max`` stays a model of its own). Codex's reasoning-effort and fast
mode variants carry the same slug (``reasoning.effort``, ``service_tier: priority`` in the
body; CODEX.md), so they pass whenever their model does.

:func:`allowed` takes any number of pattern lists (the member's; a team's, later) and allows a
model only when every non-empty list does; :func:`allowed_entries` filters a catalog the same
way (``GET /v1/models``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cache
from typing import Any

from addons.bridge.efforts import DEFAULT_MODELS, ORDER

#: What a pattern may hold: model-name characters and ``*`` (no comma, no space).
_PATTERN = re.compile(r"[A-Za-z0-9._:/@+*-]{1,100}")
#: At most this many patterns per list, and characters in the stored text (the column's size).
MAX_PATTERNS = 50
MAX_TEXT = 2000


def parse_patterns(text: str | None) -> tuple[str, ...]:
    """The patterns of a ``--models`` value or a stored ``models`` column: comma-separated,
    blanks around each ignored; ``None`` or empty text (or only commas) is ``()``, every model.

    Raises:
        ValueError: naming the bad pattern (characters other than ``A-Z a-z 0-9 . _ : / @ + - *``,
            longer than 100), or past :data:`MAX_PATTERNS` / :data:`MAX_TEXT`.
    """
    if not text:
        return ()
    patterns = []
    for raw in text.split(","):
        pattern = raw.strip()
        if not pattern:
            continue
        if not _PATTERN.fullmatch(pattern):
            raise ValueError(
                f"model pattern {pattern[:100]!r}: only letters, digits, . _ : / @ + - and * "
                "(any run of characters), at most 100"
            )
        if pattern not in patterns:
            patterns.append(pattern)
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"at most {MAX_PATTERNS} model patterns")
    if len(",".join(patterns)) > MAX_TEXT:
        raise ValueError(f"model patterns: at most {MAX_TEXT} characters in all")
    return tuple(patterns)


def patterns_text(patterns: Sequence[str]) -> str | None:
    """The stored form of a pattern list: comma-joined, ``None`` for every model."""
    return ",".join(patterns) or None


@cache
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def matches(model: str, pattern: str) -> bool:
    """Whether ``model`` matches ``pattern`` as a whole (``*``: any run of characters)."""
    return _regex(pattern).fullmatch(model) is not None


def base_model(model: str, known: Iterable[str] | None = None) -> str:
    """``model`` without a Chat Completions ``-effort`` suffix (``gpt-6.2-sol-max`` →
    ``gpt-6.2-sol``), stripped only when ``model`` is no ``known`` model and what remains is
    one (default: the bridge's built-in table, Codex's catalog first); else ``model``."""
    names = DEFAULT_MODELS if known is None else set(known)
    base, _, tail = model.rpartition("-")
    if model not in names and tail in ORDER and base in names:
        return base
    return model


def allowed(model: str | None, *pattern_lists: Sequence[str]) -> bool:
    """Whether ``model`` may be used under every non-empty list of ``pattern_lists`` (an empty
    list: every model). A model matches a list when it, or its :func:`base_model`, matches one
    of its patterns. ``None`` (a request naming no model) is allowed only when no list
    restricts."""
    lists = [patterns for patterns in pattern_lists if patterns]
    if not lists:
        return True
    if not model:
        return False
    names = {model, base_model(model)}
    return all(any(matches(n, p) for n in names for p in patterns) for patterns in lists)


def allowed_entries(
    entries: Iterable[Mapping[str, Any]], *pattern_lists: Sequence[str]
) -> Iterator[Mapping[str, Any]]:
    """The catalog ``entries`` (mappings with a ``slug``) whose slug :func:`allowed` allows,
    in their order."""
    for entry in entries:
        slug = entry.get("slug")
        if isinstance(slug, str) and allowed(slug, *pattern_lists):
            yield entry


def refusal_message(
    model: str | None, member: str, patterns: Sequence[str], *, team: str | None = None
) -> str:
    """What a member reads when its request names a model it may not use: the model, what it
    (or its ``team``, when the team's list refuses) may use, and how to pick one in Codex
    (``-m`` / ``model`` in config.toml)."""
    may = ", ".join(patterns)
    asked = f"model {model!r}" if model else "a request that names no model"
    example = next((p for p in patterns if "*" not in p), None)
    hint = f' (e.g. codex -m {example}, or model = "{example}" in config.toml)' if example else ""
    return (
        f"{asked} is not allowed for member {member!r}"
        f"{f' (its team {team!r})' if team else ''} on this gateway; it may use: {may}"
        f"{hint}; ask the gateway's operator for more"
    )
