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
"""

from __future__ import annotations

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
    ``usd_per_credit``."""

    rates: dict[str, Rate] = field(default_factory=dict)
    accounting: str = "tokens"
    message_average: dict[str, Decimal] = field(default_factory=dict)
    fast_mode_multiplier: Decimal = Decimal(2)
    usd_per_credit: Decimal = Decimal("0.04")

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


def parse_rate_card(data: Any, source: str = "<rate card>") -> RateCard:
    """A card from its YAML mapping (the ``shared/codex-rate-card.yaml`` keys: ``rates``,
    ``fast_mode_multiplier``, ``usd_per_credit``; plus ``accounting`` and
    ``message_average``).

    Raises:
        ValueError: naming ``source`` and the problem (unknown keys, bad numbers).
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
    for name, rate in (data.get("rates") or {}).items():
        if not isinstance(rate, dict) or set(rate) != set(KINDS):
            raise ValueError(f"{source}: rates.{name} needs exactly {', '.join(KINDS)}")
        card.rates[str(name)] = Rate(
            *(_decimal(rate[k], f"{source}: rates.{name}.{k}") for k in KINDS)
        )
    for name, credits in (data.get("message_average") or {}).items():
        card.message_average[str(name)] = _decimal(credits, f"{source}: message_average.{name}")
    accounting = data.get("accounting", "tokens")
    if accounting not in ("tokens", "message_average"):
        raise ValueError(f"{source}: accounting must be tokens or message_average")
    card.accounting = accounting
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
