from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from addons.credits import load_rate_card, parse_rate_card
from tests.conftest import ROOT

CARD = load_rate_card(str(ROOT / "config" / "codex-rate-card.yaml"))


def usage(inp: int, cached: int, out: int, reasoning: int = 0) -> dict[str, int]:
    return {
        "input": inp,
        "cached": cached,
        "output": out,
        "reasoning": reasoning,
        "total": inp + out,
    }


def test_shipped_card_is_the_shared_one():
    source = ROOT.parent / "shared" / "codex-rate-card.yaml"
    if not source.exists():  # CI and the sessions have it beside the checkout; a user may not
        pytest.skip("shared/ (the rate card's source) is not beside this checkout")
    shared = yaml.safe_load(source.read_text())
    ours = yaml.safe_load((ROOT / "config" / "codex-rate-card.yaml").read_text())
    assert ours["rates"] == shared["rates"]
    assert ours["usd_per_credit"] == shared["usd_per_credit"] == 0.04
    assert ours["fast_mode_multiplier"] == shared["fast_mode_multiplier"] == 2


def test_worked_example_cached_inside_input_reasoning_inside_output():
    # 1000 input of which 600 cached, 300 output of which 120 reasoning, on gpt-5.3-codex:
    # (400 * 43.75 + 600 * 4.375 + 300 * 350) / 1e6 = 0.125125 credits.
    charge = CARD.charge("gpt-5.3-codex", usage(1000, 600, 300, reasoning=120))
    assert charge is not None and charge.credits == Decimal("0.125125")
    assert charge.rate == "gpt-5.3-codex" and not charge.fast
    assert CARD.usd(charge.credits) == Decimal("0.0050")


def test_fast_mode_costs_twice():
    normal = CARD.charge("gpt-5.5", usage(2000, 0, 500))
    fast = CARD.charge("gpt-5.5", usage(2000, 0, 500), service_tier="priority")
    assert normal and fast and fast.credits == 2 * normal.credits and fast.fast
    assert CARD.charge("gpt-5.5", usage(2000, 0, 500), service_tier="flex") == normal


def test_prefix_matching_default_and_unknown():
    # Longest card name that is a prefix: gpt-5.1-codex-mini, not a shorter one.
    charge = CARD.charge("gpt-5.1-codex-mini-2026-01", usage(1_000_000, 0, 0))
    assert charge is not None and charge.rate == "gpt-5.1-codex-mini"
    assert charge.credits == Decimal("6.25")
    assert CARD.charge("gpt-5.3-codex-spark", usage(10, 0, 10)).credits == 0  # listed at 0
    assert CARD.charge("test-model", usage(1, 0, 1)) is None  # unpriced, never free
    with_default = parse_rate_card(
        {"rates": {"default": {"input": 1, "cached_input": 0.5, "output": 2}}}
    )
    assert with_default.charge("anything", usage(1_000_000, 0, 0)).rate == "default"
    assert CARD.charge("gpt-5.4", None) is None


RATE_55 = {"input": 125.0, "cached_input": 12.5, "output": 750.0}


def test_same_as_prices_a_model_with_another_entrys_rates():
    card = parse_rate_card({"rates": {"gpt-5.5": RATE_55, "gpt-6.2-sol": {"same_as": "gpt-5.5"}}})
    sol = card.charge("gpt-6.2-sol", usage(1000, 600, 300), "priority")
    ref = card.charge("gpt-5.5", usage(1000, 600, 300), "priority")
    assert sol is not None and ref is not None
    # (400 * 125 + 600 * 12.5 + 300 * 750) / 1e6 * 2 = 0.565 credits, on gpt-5.5's rates.
    assert sol.credits == ref.credits == Decimal("0.565") and sol.fast
    assert sol.rate == "gpt-6.2-sol" and card.same_as == {"gpt-6.2-sol": "gpt-5.5"}
    assert card.charge("gpt-6.2-sol-2027-01", usage(1, 0, 1)).rate == "gpt-6.2-sol"  # prefix
    assert card.charge("gpt-6.2-astra", usage(1, 0, 1)) is None  # still unpriced
    assert card.unpriced(["gpt-6.2-sol", "gpt-6.2-astra", "gpt-5.5"]) == ["gpt-6.2-astra"]


@pytest.mark.parametrize(
    "default",
    [{"same_as": "gpt-5.5"}, RATE_55, {"same_as": "sol"}],  # own figures, direct, a chain
)
def test_default_entry_prices_every_other_model(default):
    card = parse_rate_card(
        {"rates": {"gpt-5.5": RATE_55, "sol": {"same_as": "gpt-5.5"}, "default": default}}
    )
    charge = card.charge("gpt-6.2-astra", usage(1_000_000, 0, 0))
    assert charge is not None and charge.rate == "default" and charge.credits == 125
    assert card.charge(None, usage(1_000_000, 0, 0)).rate == "default"  # no model at all
    assert card.unpriced(["gpt-6.2-sol", "anything"]) == []


def test_shipped_card_has_no_default_and_misses_the_new_catalog():
    """The shipped card keeps only published rates: Codex 0.171's default model is unpriced
    until the operator maps it (the gateway names it at start-up)."""
    assert "default" not in CARD.rates and not CARD.same_as
    assert "gpt-6.2-sol" in CARD.unpriced(["gpt-6.2-sol", "gpt-5.5"])
    assert CARD.unpriced(["gpt-5.5"]) == []


def test_same_as_in_message_average_accounting():
    card = parse_rate_card(
        {
            "accounting": "message_average",
            "message_average": {"gpt-5.5": 4, "gpt-6-sol": {"same_as": "gpt-5.5"}},
        }
    )
    assert card.charge("gpt-6-sol", None).credits == 4 and card.same_as == {"gpt-6-sol": "gpt-5.5"}
    assert card.table_key == "message_average" and card.unpriced(["x", "gpt-6-sol"]) == ["x"]


@pytest.mark.parametrize(
    ("rates", "message"),
    [
        ({"a": {"same_as": "nowhere"}}, r"rates\.a: same_as 'nowhere' is not an entry"),
        ({"a": {"same_as": "b"}, "b": {"same_as": "a"}}, "same_as cycle: a -> b -> a"),
        ({"a": {"same_as": "a"}}, "same_as cycle: a -> a"),
        (
            {"a": {"same_as": "b"}, "b": {"same_as": "c"}, "c": {"same_as": "b"}},
            "same_as cycle: b -> c -> b",
        ),
        ({"a": {"same_as": "gpt-5.5", "input": 1}, "gpt-5.5": RATE_55}, "nothing beside it"),
        ({"a": {"same_as": 5}}, "one entry name"),
    ],
)
def test_same_as_errors_name_the_entry(rates, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_rate_card({"rates": rates}, "gateway.yaml: credits")
    assert str(e.value).startswith("gateway.yaml: credits: rates")


def test_message_average_accounting():
    card = parse_rate_card(
        {
            "accounting": "message_average",
            "message_average": {"gpt-5.3-codex": 5, "default": "1.5"},
            "fast_mode_multiplier": 2,
        }
    )
    assert card.charge("gpt-5.3-codex", None).credits == 5
    assert card.charge("gpt-5.3-codex-2026", usage(9, 0, 9), "priority").credits == 10
    assert card.charge("other", None).credits == Decimal("1.5")


@pytest.mark.parametrize(
    "bad",
    [
        {"rates": {"m": {"input": 1, "output": 2}}},
        {"rates": {"m": {"input": -1, "cached_input": 0, "output": 2}}},
        {"rates": {"m": {"input": "x", "cached_input": 0, "output": 2}}},
        {"accounting": "per_message"},
        {"ratez": {}},
        ["not", "a", "mapping"],
    ],
)
def test_bad_cards_are_refused(bad):
    with pytest.raises(ValueError):
        parse_rate_card(bad)


def test_unreadable_card(tmp_path: Path):
    with pytest.raises(ValueError, match="cannot read"):
        load_rate_card(str(tmp_path / "missing.yaml"))


ROWS = st.lists(
    st.tuples(
        st.sampled_from(sorted(CARD.rates)),
        st.integers(0, 2_000_000),
        st.integers(0, 2_000_000),
        st.integers(0, 200_000),
        st.booleans(),
    ),
    max_size=200,
)


@given(ROWS)
def test_no_drift_over_many_rows(rows):
    """The sum of many charges equals the exact rational sum (quantized once per row)."""
    total, exact = Decimal(0), Fraction(0)
    for model, inp, cached, out, fast in rows:
        cached = min(cached, inp)
        charge = CARD.charge(model, usage(inp, cached, out), "priority" if fast else None)
        assert charge is not None
        total += charge.credits
        r = CARD.rates[model]
        row = (
            (
                (inp - cached) * Fraction(r.input)
                + cached * Fraction(r.cached_input)
                + out * Fraction(r.output)
            )
            / 1_000_000
            * (2 if fast else 1)
        )
        assert abs(Fraction(charge.credits) - row) <= Fraction(1, 2_000_000)
        exact += Fraction(charge.credits)
    assert Fraction(total) == exact
