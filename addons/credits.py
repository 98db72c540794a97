"""Codex credits: the token-based rate card and its charging rule, with exact arithmetic.

The card (``config/codex-rate-card.yaml``, copied from ``shared/codex-rate-card.yaml``: OpenAI
Help Center, "Codex rate card", token-based pricing, 2026) gives credits per 1 000 000 input,
cached-input and output tokens per model. The rule, with the Responses API's ``usage``
(``input_tokens`` INCLUDES ``cached_tokens``; ``output_tokens`` INCLUDES ``reasoning_tokens``)::

    credits = ((input - cached) * input_rate + cached * cached_input_rate
               + output * output_rate) / 1 000 000
    x fast_mode_multiplier when the request asked for "service_tier": "priority"

``accounting: message_average`` charges a fixed number of credits per request per model instead.
Credits are :class:`decimal.Decimal` (no float drift over many rows), quantized to 1e-6 credit.
A model is priced by its exact name, else by the longest card name that is a prefix of it, else
by the card's ``default`` entry if any; else it is unpriced (``None``), never silently free.

The shipped card holds only OpenAI's published rates. An operator prices a model the card does
not list by pointing it at another entry's rates, ``gpt-6.2-sol: {same_as: gpt-5.5}`` (in
``rates`` or ``message_average``), or by a ``default`` entry (rates of its own, or ``same_as``).
A ``same_as`` target must be an entry of the same table; chains are followed; an unknown target
or a cycle stops the config load with a message naming the entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml

MICRO = Decimal("0.000001")
MILLION = Decimal(1_000_000)
KINDS = ("input", "cached_input", "output")
FAST_TIER = "priority"


@dataclass(frozen=True)
class Rate:
    """Credits per 1M tokens of each kind."""

    input: Decimal
    cached_input: Decimal
    output: Decimal


@dataclass(frozen=True)
class Charge:
    """What one request cost: ``credits`` and the card entry (``rate``) used; ``fast`` when the
    fast-mode multiplier applied."""

    credits: Decimal
    rate: str
    fast: bool = False


@dataclass
class RateCard:
    """A parsed card: ``rates`` by model name, ``message_average`` credits per request by model
    (used when ``accounting`` is ``message_average``), ``fast_mode_multiplier``,
    ``usd_per_credit``; ``same_as``: each ``same_as`` entry of the priced table and the entry
    whose figures it took (chains resolved), for reports."""

    rates: dict[str, Rate] = field(default_factory=dict)
    accounting: str = "tokens"
    message_average: dict[str, Decimal] = field(default_factory=dict)
    fast_mode_multiplier: Decimal = Decimal(2)
    usd_per_credit: Decimal = Decimal("0.04")
    same_as: dict[str, str] = field(default_factory=dict)

    @property
    def table(self) -> dict[str, Any]:
        """The table that prices requests under this card's ``accounting``."""
        return self.message_average if self.accounting == "message_average" else self.rates

    @property
    def table_key(self) -> str:
        """The YAML key of :attr:`table` (``rates`` or ``message_average``)."""
        return "message_average" if self.accounting == "message_average" else "rates"

    def prices(self, model: str | None) -> bool:
        """Whether a request for ``model`` gets a charge (usage permitting)."""
        return self.entry(model, self.table) is not None

    def unpriced(self, models: Iterable[str]) -> list[str]:
        """Those of ``models`` (in their order) that this card cannot price."""
        return [m for m in models if not self.prices(m)]

    def entry(self, model: str | None, table: dict[str, Any]) -> str | None:
        """The card name pricing ``model`` in ``table``: exact, longest prefix, ``default``."""
        if not model:
            return "default" if "default" in table else None
        if model in table:
            return model
        prefixes = [name for name in table if name != "default" and model.startswith(name)]
        if prefixes:
            return max(prefixes, key=len)
        return "default" if "default" in table else None

    def charge(
        self, model: str | None, usage: dict[str, int] | None, service_tier: str | None = None
    ) -> Charge | None:
        """The charge of one request (``usage`` in :func:`addons.responses_turn.usage_of`'s
        shape), or ``None`` when the model is unpriced (or, for token accounting, there is no
        usage)."""
        fast = service_tier == FAST_TIER
        multiplier = self.fast_mode_multiplier if fast else Decimal(1)
        if self.accounting == "message_average":
            name = self.entry(model, self.message_average)
            if name is None:
                return None
            return Charge((self.message_average[name] * multiplier).quantize(MICRO), name, fast)
        name = self.entry(model, self.rates)
        if name is None or usage is None:
            return None
        rate = self.rates[name]
        cached = min(usage.get("cached", 0), usage.get("input", 0))
        tokens = (
            (usage.get("input", 0) - cached) * rate.input
            + cached * rate.cached_input
            + usage.get("output", 0) * rate.output
        )
        return Charge((tokens / MILLION * multiplier).quantize(MICRO), name, fast)

    def usd(self, credits: Decimal) -> Decimal:
        """Credits in US dollars (to the cent's hundredth)."""
        return (credits * self.usd_per_credit).quantize(Decimal("0.0001"))


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{where}: not a number: {value!r}")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{where}: not a number: {value!r}") from None
    if not number.is_finite() or number < 0:
        raise ValueError(f"{where}: must be a finite number >= 0")
    return number


def _alias(value: Any, where: str, aliases: dict[str, str], name: str) -> bool:
    """Record ``{same_as: target}`` in ``aliases``; ``False`` for any other value."""
    if not isinstance(value, dict) or "same_as" not in value:
        return False
    if set(value) != {"same_as"} or not isinstance(value["same_as"], str):
        raise ValueError(f"{where}: same_as takes one entry name and nothing beside it")
    aliases[name] = value["same_as"]
    return True


def _resolve_aliases(table: dict[str, Any], aliases: dict[str, str], where: str) -> dict[str, str]:
    """Give each ``same_as`` entry its target's figures (chains followed) in ``table``; returns
    ``{entry: final target}``.

    Raises:
        ValueError: naming the entry, for a target that is no entry of ``table`` or a cycle.
    """
    same_as: dict[str, str] = {}
    for name in aliases:
        chain = [name]
        target = aliases[name]
        while target in aliases:
            if target in chain:
                cycle = " -> ".join([*chain[chain.index(target) :], target])
                raise ValueError(f"{where}: same_as cycle: {cycle}")
            chain.append(target)
            target = aliases[target]
        if target not in table:
            known = ", ".join(sorted(table)) or "none"
            raise ValueError(
                f"{where}.{chain[-1]}: same_as {target!r} is not an entry of this table "
                f"(entries with their own figures: {known})"
            )
        same_as[name] = target
    for name, target in same_as.items():
        table[name] = table[target]
    return same_as


def parse_rate_card(data: Any, source: str = "<rate card>") -> RateCard:
    """A card from its YAML mapping (the ``shared/codex-rate-card.yaml`` keys: ``rates``,
    ``fast_mode_multiplier``, ``usd_per_credit``; plus ``accounting`` and
    ``message_average``). An entry of ``rates`` or ``message_average`` may be
    ``{same_as: <entry>}`` instead of figures (the module docstring).

    Raises:
        ValueError: naming ``source`` and the problem (unknown keys, bad numbers, a ``same_as``
            to no entry of its table, a ``same_as`` cycle).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the rate card must be a mapping")
    unknown = set(data) - {
        "rates",
        "fast_mode_multiplier",
        "usd_per_credit",
        "accounting",
        "message_average",
    }
    if unknown:
        raise ValueError(f"{source}: unknown rate card key(s): {', '.join(sorted(unknown))}")
    card = RateCard()
    aliases: dict[str, str] = {}
    rates = data.get("rates") or {}
    if not isinstance(rates, dict):
        raise ValueError(f"{source}: rates must map model names to rates")
    for name, rate in rates.items():
        if _alias(rate, f"{source}: rates.{name}", aliases, str(name)):
            continue
        if not isinstance(rate, dict) or set(rate) != set(KINDS):
            raise ValueError(
                f"{source}: rates.{name} needs exactly {', '.join(KINDS)} (or same_as: <entry>)"
            )
        card.rates[str(name)] = Rate(
            *(_decimal(rate[k], f"{source}: rates.{name}.{k}") for k in KINDS)
        )
    rate_aliases = _resolve_aliases(card.rates, aliases, f"{source}: rates")
    averages = data.get("message_average") or {}
    if not isinstance(averages, dict):
        raise ValueError(f"{source}: message_average must map model names to credits")
    aliases = {}
    for name, credits in averages.items():
        if _alias(credits, f"{source}: message_average.{name}", aliases, str(name)):
            continue
        card.message_average[str(name)] = _decimal(credits, f"{source}: message_average.{name}")
    average_aliases = _resolve_aliases(card.message_average, aliases, f"{source}: message_average")
    accounting = data.get("accounting", "tokens")
    if accounting not in ("tokens", "message_average"):
        raise ValueError(f"{source}: accounting must be tokens or message_average")
    card.accounting = accounting
    card.same_as = average_aliases if accounting == "message_average" else rate_aliases
    if "fast_mode_multiplier" in data:
        card.fast_mode_multiplier = _decimal(data["fast_mode_multiplier"], f"{source}: fast")
    if "usd_per_credit" in data:
        card.usd_per_credit = _decimal(data["usd_per_credit"], f"{source}: usd_per_credit")
    return card


def load_rate_card(path: str) -> RateCard:
    """Read and parse a rate card file.

    Raises:
        ValueError: when it cannot be read or parsed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the rate card: {e}") from None
    return parse_rate_card(data, path)
