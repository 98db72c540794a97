"""Reasoning effort for bridged requests: resolved from the request, clamped per model.

The rule of the Go codex-proxy's README (``shared/seeds/codex-proxy.md``): an effort comes from
``reasoning_effort``, else ``reasoning.effort``, else a ``-minimal`` / ``-low`` / ``-medium`` /
``-high`` / ``-xhigh`` suffix on the model name (stripped from it); ``none`` counts as ``low``;
the value is then clamped to the model's allowed range, and a model's default applies when none
was given. The per-model table is configuration (``chat_bridge_models``), not code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

#: Efforts from least to most.
ORDER = ("minimal", "low", "medium", "high", "xhigh")
ALIASES = {"none": "low"}


@dataclass(frozen=True)
class ModelEfforts:
    """A model's allowed efforts (a contiguous range of :data:`ORDER`) and its default (``None``:
    send none and let the upstream decide)."""

    allowed: tuple[str, ...]
    default: str | None = None

    def clamp(self, effort: str) -> str:
        """``effort`` moved into the allowed range (below it: the lowest; above: the highest)."""
        if effort in self.allowed:
            return effort
        rank = ORDER.index(effort)
        ranks = [ORDER.index(e) for e in self.allowed]
        return ORDER[min(ranks)] if rank < min(ranks) else ORDER[max(ranks)]


#: The Go bridge's table, used when the configuration names none.
DEFAULT_MODELS: dict[str, ModelEfforts] = {
    "gpt-5": ModelEfforts(("minimal", "low", "medium", "high")),
    "gpt-5-codex": ModelEfforts(("minimal", "low", "medium", "high")),
    "gpt-5.1": ModelEfforts(("low", "medium", "high"), "low"),
    "gpt-5.1-codex": ModelEfforts(("low", "medium", "high"), "low"),
    "gpt-5.1-codex-max": ModelEfforts(("low", "medium", "high", "xhigh"), "low"),
    "gpt-5-codex-mini": ModelEfforts(("medium", "high"), "medium"),
    "gpt-5.1-codex-mini": ModelEfforts(("medium", "high"), "medium"),
}


def parse_models(value: Any) -> dict[str, ModelEfforts]:
    """The ``chat_bridge_models`` table: ``{model: {"efforts": [...], "default": effort|null}}``
    (a mapping, or its JSON text as the ``codex_chat_bridge_models`` option holds it). Empty:
    :data:`DEFAULT_MODELS`.

    Raises:
        ValueError: for an unknown effort, a gap in the range, or a default outside it.
    """
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    if not value:
        return dict(DEFAULT_MODELS)
    if not isinstance(value, dict):
        raise ValueError("chat_bridge_models must map model names to {efforts, default}")
    out = {}
    for name, spec in value.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("efforts"), list):
            raise ValueError(f"{name}: needs an 'efforts' list")
        efforts = tuple(spec["efforts"])
        if not efforts or any(e not in ORDER for e in efforts):
            raise ValueError(f"{name}: efforts must be some of {', '.join(ORDER)}")
        ranks = sorted(ORDER.index(e) for e in efforts)
        if ranks != list(range(ranks[0], ranks[-1] + 1)):
            raise ValueError(f"{name}: efforts must be a contiguous range of {', '.join(ORDER)}")
        default = spec.get("default")
        if default is not None and default not in efforts:
            raise ValueError(f"{name}: default {default!r} is not among its efforts")
        out[str(name)] = ModelEfforts(tuple(ORDER[r] for r in ranks), default)
    return out


def normalize(effort: Any, field: str) -> str:
    """One effort value, lower-cased, ``none`` as ``low``.

    Raises:
        ValueError: naming ``field`` when it is no effort.
    """
    value = ALIASES.get(str(effort).lower(), str(effort).lower())
    if not isinstance(effort, str) or value not in ORDER:
        raise ValueError(f"{field}: {effort!r} is not one of {', '.join(ORDER)} (or none)")
    return value


def resolve(body: dict[str, Any], models: dict[str, ModelEfforts]) -> tuple[str, str | None]:
    """``(model to send upstream, effort or None)`` for a Chat Completions body.

    A suffix is stripped only when what remains is a configured model (``gpt-5.1-codex-high``
    -> ``gpt-5.1-codex`` + ``high``); an unknown model keeps its name and any explicit effort,
    unclamped.

    Raises:
        ValueError: for a missing model or an invalid effort.
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError("model: required (a string)")
    suffix = None
    base, _, tail = model.rpartition("-")
    if tail in ORDER and base in models:
        model, suffix = base, tail
    effort = None
    if body.get("reasoning_effort") is not None:
        effort = normalize(body["reasoning_effort"], "reasoning_effort")
    elif isinstance(body.get("reasoning"), dict) and body["reasoning"].get("effort") is not None:
        effort = normalize(body["reasoning"]["effort"], "reasoning.effort")
    elif suffix is not None:
        effort = suffix
    spec = models.get(model)
    if spec is None:
        return model, effort
    return model, spec.clamp(effort) if effort is not None else spec.default


def model_ids(models: dict[str, ModelEfforts]) -> list[str]:
    """What ``GET /v1/models`` lists: each model, then its ``-effort`` variants."""
    ids = []
    for name, spec in models.items():
        ids.append(name)
        ids += [f"{name}-{e}" for e in spec.allowed]
    return ids
