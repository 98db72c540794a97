import pytest

from addons.config import DEFAULT_CONFIG_PATH, load_config, parse_config


def test_shipped_config_loads():
    config = load_config(DEFAULT_CONFIG_PATH)
    assert config.upstream_url == "https://api.openai.com/v1/responses"
    assert config.port is None and config.dump_dir is None and not config.http_shutdown
    assert config.extra_routes == []
    assert config.mitmproxy["connection_strategy"] == "lazy"


def test_empty_config_gives_defaults():
    config = parse_config("")
    assert config.upstream_url == "https://api.openai.com/v1/responses"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("api_key: sk-123", "only read from stdin"),
        ("uptream_url: http://x", "unknown key"),
        ("port: '80'", "wrong type"),
        ("port: true", "wrong type"),
        ("port: 70000", "out of range"),
        ("extra_routes: [1]", "list of strings"),
        ("- a", "mapping"),
        ("a: [", "not valid YAML"),
    ],
)
def test_bad_configs(text, message):
    with pytest.raises(ValueError, match=message):
        parse_config(text, "test.yaml")


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_config(str(tmp_path / "nope.yaml"))
