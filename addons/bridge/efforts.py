"""Reasoning effort for bridged requests: resolved from the request, clamped per model.

The rule of the Go codex-proxy's README (``shared/seeds/codex-proxy.md``): an effort comes from
``reasoning_effort``, else ``reasoning.effort``, else a ``-minimal`` / ``-low`` / ``-medium`` /
``-high`` / ``-xhigh`` / ``-max`` / ``-ultra`` suffix on the model name (stripped from it);
``none`` counts as ``low``; the value is then clamped to the model's allowed range, and a
model's default applies when none was given. The per-model table is configuration
(``chat_bridge_models``), not code; without one, the built-in table is the pinned Codex's
catalog (``config/codex-models.yaml``, :mod:`addons.codex_models`: each model's supported
reasoning levels and default, ``max`` and ``ultra`` included) followed by the Go bridge's table
for the older API models Codex's catalog no longer lists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from addons.codex_models import Catalog, catalog

#: Efforts from least to most (``max`` and ``ultra``: Codex 0.171's catalog).
ORDER = ("minimal", "low", "medium", "high", "xhigh", "max", "ultra")
ALIASES = {"none": "low"}


@dataclass(frozen=True)
class ModelEfforts:
    """A model's allowed efforts (a contiguous range of :data:`ORDER`) and its default (``None``:
    send none and let the upstream decide); ``listed``: ``GET /v1/models`` shows it (a model
    the catalog hides still resolves and clamps)."""

    allowed: tuple[str, ...]
    default: str | None = None
    listed: bool = True

    def clamp(self, effort: str) -> str:
        """``effort`` moved into the allowed range (below it: the lowest; above: the highest)."""
        if effort in self.allowed:
            return effort
        rank = ORDER.index(effort)
        ranks = [ORDER.index(e) for e in self.allowed]
        return ORDER[min(ranks)] if rank < min(ranks) else ORDER[max(ranks)]


#: The Go bridge's table (older API models), after the catalog's in the built-in table.
GO_BRIDGE_MODELS: dict[str, ModelEfforts] = {
    "gpt-5": ModelEfforts(("minimal", "low", "medium", "high")),
    "gpt-5-codex": ModelEfforts(("minimal", "low", "medium", "high")),
    "gpt-5.1": ModelEfforts(("low", "medium", "high"), "low"),
    "gpt-5.1-codex": ModelEfforts(("low", "medium", "high"), "low"),
    "gpt-5.1-codex-max": ModelEfforts(("low", "medium", "high", "xhigh"), "low"),
    "gpt-5-codex-mini": ModelEfforts(("medium", "high"), "medium"),
    "gpt-5.1-codex-mini": ModelEfforts(("medium", "high"), "medium"),
}


def catalog_models(snapshot: Catalog) -> dict[str, ModelEfforts]:
    """The catalog's models (in its order) as effort specs: the supported reasoning levels that
    are efforts of :data:`ORDER`, its default level, listed unless the catalog hides it.

    Raises:
        ValueError: when a model's levels are no contiguous range of :data:`ORDER` (a catalog
            this module must learn first).
    """
    out = {}
    for m in snapshot.models:
        levels = [e for e in m.supported_reasoning_levels if e in ORDER]
        if not levels:
            continue
        ranks = sorted(ORDER.index(e) for e in levels)
        if ranks != list(range(ranks[0], ranks[-1] + 1)):
            raise ValueError(f"{m.slug}: catalog efforts {levels} are not a contiguous range")
        default = m.default_reasoning_level if m.default_reasoning_level in levels else None
        out[m.slug] = ModelEfforts(tuple(ORDER[r] for r in ranks), default, m.listed)
    return out


#: The built-in table: the pinned Codex's catalog, then the Go bridge's older models.
DEFAULT_MODELS: dict[str, ModelEfforts] = {
    **catalog_models(catalog()),
    **{k: v for k, v in GO_BRIDGE_MODELS.items() if k not in catalog().slugs()},
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

    A suffix is stripped only when the whole name is no configured model and what remains is
    one (``gpt-6.2-sol-max`` -> ``gpt-6.2-sol`` + ``max``; ``gpt-5.1-codex-max`` stays a model
    of its own); an unknown model keeps its name and any explicit effort, unclamped.

    Raises:
        ValueError: for a missing model or an invalid effort.
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError("model: required (a string)")
    suffix = None
    base, _, tail = model.rpartition("-")
    if model not in models and tail in ORDER and base in models:
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
    """What ``GET /v1/models`` lists: each listed model, then its ``-effort`` variants."""
    ids = []
    for name, spec in models.items():
        if not spec.listed:
            continue
        ids.append(name)
        ids += [f"{name}-{e}" for e in spec.allowed]
    return ids
