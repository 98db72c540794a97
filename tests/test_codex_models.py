"""The model snapshot (config/codex-models.yaml) against the pinned Codex CLI's own catalog."""

from pathlib import Path

import pytest

from addons import codex_models
from addons.versions import codex_cli_version


def test_snapshot_is_of_the_pinned_codex_and_parses():
    snap = codex_models.catalog()
    assert snap.codex_version == codex_cli_version(), "run ./run.sh refresh-models"
    assert snap.default_model in snap.slugs(listed_only=True)
    for m in snap.models:
        assert m.default_reasoning_level in m.supported_reasoning_levels, m.slug
        assert m.context_window and m.context_window > 0, m.slug


@pytest.mark.codex
def test_snapshot_matches_the_installed_codex(codex):
    """Fails while the snapshot and `codex debug models` disagree (a moved pin, a hand edit)."""
    fresh = codex_models.read_codex_catalog(codex)
    assert codex_models.read_snapshot_file() == fresh, (
        "config/codex-models.yaml is stale: run ./run.sh refresh-models"
    )


@pytest.mark.codex
def test_refresh_writes_what_check_accepts(codex, tmp_path):
    out, full = tmp_path / "models.yaml", tmp_path / "models.json"
    out.write_text("models: []\n")
    paths = ["--codex", codex, "--output", str(out), "--full-output", str(full)]
    assert codex_models.main([*paths, "--check"]) == 1
    assert codex_models.main(paths) == 0
    assert codex_models.main([*paths, "--check"]) == 0
    assert out.read_text().startswith("# The model catalog")
    assert codex_models.parse(codex_models.read_snapshot_file(str(out))) == codex_models.catalog()
    assert full.read_text() == Path(codex_models.FULL_SNAPSHOT).read_text()
    full.write_text(full.read_text().replace("GPT-6.2-Sol", "GPT-6.2-Sol edited"))
    assert codex_models.main([*paths, "--check"]) == 1


def test_the_full_catalog_is_the_snapshot_untrimmed():
    version, entries = codex_models.full_catalog()
    snap = codex_models.catalog()
    assert version == snap.codex_version
    assert [e["slug"] for e in entries] == snap.slugs()
    trimmed = codex_models.trim({"models": list(entries)}, version)
    assert codex_models.parse(trimmed) == snap
    assert all(e["base_instructions"] for e in entries)  # what Codex needs of an entry


RAW = {
    "models": [
        {
            "slug": "b-hidden",
            "visibility": "hide",
            "priority": 0,
            "default_reasoning_level": "medium",
            "supported_reasoning_levels": [{"effort": "low"}, {"effort": "medium"}],
            "service_tiers": [],
            "context_window": 1000,
            "base_instructions": "long prompt text, not kept",
        },
        {
            "slug": "a-second",
            "display_name": "A",
            "visibility": "list",
            "priority": 5,
            "default_reasoning_level": "low",
            "supported_reasoning_levels": [{"effort": "low"}, {"effort": "max"}],
            "service_tiers": [{"id": "priority", "name": "Fast"}],
            "default_service_tier": "priority",
            "context_window": 2000,
        },
        {"slug": "c-first", "visibility": "list", "priority": 2},
    ]
}


def test_trim_keeps_the_fields_and_picks_the_default_model():
    snap = codex_models.trim(RAW, "9.9.9")
    assert snap["codex_version"] == "9.9.9"
    # The lowest priority among listed models, never a hidden one.
    assert snap["default_model"] == "c-first"
    assert [m["slug"] for m in snap["models"]] == ["b-hidden", "a-second", "c-first"]
    assert snap["models"][1] == {
        "slug": "a-second",
        "display_name": "A",
        "visibility": "list",
        "default_reasoning_level": "low",
        "supported_reasoning_levels": ["low", "max"],
        "service_tiers": ["priority"],
        "default_service_tier": "priority",
        "context_window": 2000,
    }
    assert "base_instructions" not in codex_models.render(snap)
    parsed = codex_models.parse(snap)
    assert parsed.slugs(listed_only=True) == ["a-second", "c-first"]


@pytest.mark.parametrize("bad", [{}, {"models": "x"}, {"models": [{"name": "no slug"}]}])
def test_trim_refuses_what_is_no_catalog(bad):
    with pytest.raises(ValueError, match="catalog"):
        codex_models.trim(bad, "1")


def test_parse_names_a_broken_snapshot():
    with pytest.raises(ValueError, match="bad model entry"):
        codex_models.parse({"models": [{"slug": "x"}]}, "snap.yaml")
