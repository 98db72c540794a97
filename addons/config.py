"""The launcher's YAML configuration (``config/proxy.yaml``): reading and validation."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from addons.defaults import default_file

DEFAULT_CONFIG_PATH = default_file("proxy.yaml")

_KEYS = {
    "upstream_url": (str, type(None)),
    "port": (int, type(None)),
    "server_info": (str, type(None)),
    "http_shutdown": (bool,),
    "dump_dir": (str, type(None)),
    "dump_required": (bool,),
    "extra_routes": (list,),
    "redact_headers": (list,),
    "rate_card": (str, type(None)),
    "chat_bridge": (bool,),
    "chat_bridge_models": (dict, type(None)),
    "chat_bridge_reasoning_content": (bool,),
    "mitmproxy": (dict, type(None)),
}


@dataclass
class ProxyConfig:
    """Launcher settings. ``mitmproxy`` maps mitmproxy option names to values as ``--set``
    would take them (scalars, or lists for sequence options)."""

    upstream_url: str = "https://api.openai.com/v1/responses"
    port: int | None = None
    server_info: str | None = None
    http_shutdown: bool = False
    dump_dir: str | None = None
    dump_required: bool = False
    #: Set by ``--record DIR`` only (not a YAML key).
    record_dir: str | None = None
    extra_routes: list[str] = field(default_factory=list)
    redact_headers: list[str] = field(default_factory=list)
    #: A Codex rate card pricing a recording's requests in credits (a path; relative paths
    #: are read beside the config file).
    rate_card: str | None = None
    #: The Chat Completions bridge (``--chat-bridge``), off by default.
    chat_bridge: bool = False
    #: ``{model: {"efforts": [...], "default": effort|null}}``; empty: the built-in table.
    chat_bridge_models: dict[str, Any] = field(default_factory=dict)
    chat_bridge_reasoning_content: bool = False
    mitmproxy: dict[str, Any] = field(default_factory=dict)


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types)


def parse_config(text: str, source: str = "<config>") -> ProxyConfig:
    """Parse the YAML text of a launcher config.

    Unknown keys and wrong types are errors (a typo must stop start-up, not be ignored).
    Keys holding secrets are refused: the key only comes on stdin.

    Raises:
        ValueError: naming ``source`` and the problem.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the top level must be a mapping")
    config = ProxyConfig()
    for key, value in data.items():
        if key not in _KEYS:
            hint = " (the API key is only read from stdin)" if "key" in str(key).lower() else ""
            raise ValueError(f"{source}: unknown key {key!r}{hint}")
        if not _has_type(value, _KEYS[key]) or (key == "port" and isinstance(value, bool)):
            raise ValueError(f"{source}: {key} has the wrong type ({type(value).__name__})")
        if key in ("extra_routes", "redact_headers") and not all(isinstance(v, str) for v in value):
            raise ValueError(f"{source}: {key} must be a list of strings")
        if key == "port" and value is not None and not 0 <= value <= 65535:
            raise ValueError(f"{source}: port {value} is out of range")
        if key == "mitmproxy":
            value = dict(value or {})
            for name in value:
                if not isinstance(name, str):
                    raise ValueError(f"{source}: mitmproxy option names must be strings")
        if key == "upstream_url" and value is None:
            continue
        if key == "chat_bridge_models":
            from addons.bridge.efforts import parse_models

            value = dict(value or {})
            try:
                parse_models(value)
            except ValueError as e:
                raise ValueError(f"{source}: chat_bridge_models: {e}") from None
        setattr(config, key, value)
    return config


def load_config(path: str) -> ProxyConfig:
    """Read and parse a config file.

    Raises:
        ValueError: when the file cannot be read or does not parse (see :func:`parse_config`).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read config: {e.strerror}") from None
    config = parse_config(text, path)
    if config.rate_card:
        config.rate_card = os.path.join(os.path.dirname(os.path.abspath(path)), config.rate_card)
    return config
