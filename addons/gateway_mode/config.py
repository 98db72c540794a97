"""``config/gateway.yaml``: the gateway's settings and its Codex rate card (no secrets).

Flags of ``codex-proxy gateway`` override the file. The gateway's data (the SQLite database,
``gateway.db``, and the spool) lives in its *data directory* (:func:`data_directory`): beside
the config file when the config is the operator's own, else (the shipped default config, inside
the installed package or a checkout's ``config/``) ``$XDG_DATA_HOME/codex-proxy``, by default
``~/.local/share/codex-proxy`` (the XDG Base Directory rule; never inside the package). A
relative ``database: sqlite:///x.db``, ``spool:`` or ``metrics_token_file:`` in the YAML is
read in that directory; a relative ``--database sqlite:///x.db`` flag, like any path on a
command line, in the current one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from addons.codex_models import Catalog, catalog
from addons.credits import RateCard, parse_rate_card
from addons.defaults import DEFAULTS_DIR, default_file
from addons.gateway_mode.lifetimes import parse_lifetime

DEFAULT_GATEWAY_CONFIG = default_file("gateway.yaml")
#: The data directory's name under ``$XDG_DATA_HOME`` (``~/.local/share``).
DATA_DIR_NAME = "codex-proxy"


def user_data_directory() -> str:
    """``$XDG_DATA_HOME/codex-proxy`` when that variable is an absolute path (the XDG Base
    Directory spec ignores a relative one), else ``~/.local/share/codex-proxy``."""
    base = os.environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, DATA_DIR_NAME)


def data_directory(config_path: str) -> str:
    """Where the gateway configured by ``config_path`` keeps its data: beside that file, unless
    it is one of the shipped defaults (then :func:`user_data_directory`: user data never goes
    inside the installed package)."""
    directory = os.path.dirname(os.path.abspath(config_path))
    if os.path.realpath(directory) == os.path.realpath(DEFAULTS_DIR):
        return user_data_directory()
    return directory


_KEYS: dict[str, tuple[type, ...]] = {
    "database": (str, type(None)),
    "upstream_url": (str,),
    "listen_host": (str,),
    "port": (int, type(None)),
    "server_info": (str, type(None)),
    "http_shutdown": (bool,),
    "dump_dir": (str, type(None)),
    "insecure_listen": (bool,),
    "require_codex_client": (bool,),
    "websockets": (bool,),
    "chat_bridge": (bool,),
    "max_attempts": (int,),
    "cooldown_seconds": (int,),
    "lease_seconds": (int,),
    "quota_max_concurrent": (int,),
    "spool": (str, type(None)),
    "metrics_token_file": (str, type(None)),
    "default_key_lifetime": (str, type(None)),
    "redact_headers": (list,),
    "credits": (dict,),
    "mitmproxy": (dict, type(None)),
}


@dataclass
class GatewayConfig:
    """The gateway's settings (see ``config/gateway.yaml`` for each key's meaning)."""

    path: str = DEFAULT_GATEWAY_CONFIG
    database: str | None = None
    upstream_url: str = "https://api.openai.com/v1/responses"
    listen_host: str = "127.0.0.1"
    port: int | None = None
    server_info: str | None = None
    http_shutdown: bool = False
    dump_dir: str | None = None
    record_dir: str | None = None
    insecure_listen: bool = False
    require_codex_client: bool = True
    websockets: bool = True
    chat_bridge: bool = False
    max_attempts: int = 3
    cooldown_seconds: int = 30
    lease_seconds: int = 60
    #: Concurrency slots of a member with a quota and max_concurrent 0 (0: unlimited).
    quota_max_concurrent: int = 4
    spool: str | None = None
    metrics_token_file: str | None = None
    #: Lifetime of a key made by ``add-key`` without ``--expires`` (``30d``; ``None``: never).
    default_key_lifetime: str | None = None
    redact_headers: list[str] = field(default_factory=lambda: ["api-key", "x-api-key"])
    credits: dict[str, Any] = field(default_factory=dict)
    mitmproxy: dict[str, Any] = field(default_factory=dict)

    @property
    def directory(self) -> str:
        """The data directory (:func:`data_directory`)."""
        return data_directory(self.path)

    def database_url(self) -> str:
        """``database``, a relative SQLite path made absolute in :attr:`directory`; without
        one, ``sqlite:///`` + ``gateway.db`` there."""
        if not self.database:
            return "sqlite:///" + os.path.join(self.directory, "gateway.db")
        for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
            rest = self.database.removeprefix(prefix)
            if rest != self.database and rest and not rest.startswith(("/", ":memory:", "file:")):
                return prefix + os.path.join(self.directory, rest)
        return self.database

    def spool_path(self) -> str:
        """Where rows the database could not take are kept across a restart."""
        return os.path.join(self.directory, self.spool or "gateway-spool.jsonl")

    def metrics_token_path(self) -> str | None:
        """``metrics_token_file`` (read beside the config file when relative), or ``None``."""
        if not self.metrics_token_file:
            return None
        return os.path.join(self.directory, os.path.expanduser(self.metrics_token_file))

    def rate_card(self) -> RateCard:
        """The parsed ``credits`` section. Raises ``ValueError`` naming the file."""
        return parse_rate_card(self.credits, f"{self.path}: credits")


def parse_gateway_config(text: str, path: str) -> GatewayConfig:
    """Parse the YAML text of a gateway config read from ``path``.

    Unknown keys and wrong types are errors; a key named like a secret gets a hint (upstream
    keys come on stdin only; database passwords belong in ``~/.pgpass``).

    Raises:
        ValueError: naming ``path`` and the problem.
    """
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    config = GatewayConfig(path=path)
    value: Any
    for key, value in data.items():
        if key not in _KEYS:
            hint = " (upstream keys are only read from stdin)" if "key" in str(key) else ""
            raise ValueError(f"{path}: unknown key {key!r}{hint}")
        if type(value) not in _KEYS[key]:  # exact: a bool is not an int here
            raise ValueError(f"{path}: {key} has the wrong type ({type(value).__name__})")
        if key in ("max_attempts", "cooldown_seconds", "lease_seconds") and value < 1:
            raise ValueError(f"{path}: {key} must be >= 1")
        if key == "quota_max_concurrent" and not 0 <= value <= 10_000:
            raise ValueError(f"{path}: quota_max_concurrent must be between 0 and 10000")
        if key == "port" and value is not None and not 0 <= value <= 65535:
            raise ValueError(f"{path}: port {value} is out of range")
        if key == "mitmproxy":
            value = dict(value or {})
        if key == "default_key_lifetime" and value is not None:
            try:
                parse_lifetime(value)
            except ValueError as e:
                raise ValueError(f"{path}: default_key_lifetime: {e}") from None
        setattr(config, key, value)
    config.rate_card()  # a bad card stops start-up (and every admin command)
    return config


def load_gateway_config(path: str) -> GatewayConfig:
    """Read and parse a gateway config file.

    Raises:
        ValueError: unreadable or invalid.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read config: {e.strerror}") from None
    return parse_gateway_config(text, os.path.abspath(path))


def rate_card_gaps(card: RateCard, snapshot: Catalog | None = None) -> list[dict[str, Any]]:
    """The pinned Codex's catalog models (``config/codex-models.yaml``, in catalog order, hidden
    ones included: Codex may send them) that ``card`` cannot price, each as ``{"model",
    "yaml_key" (e.g. ``credits.rates.gpt-6.2-sol``), "codex_default" (bool)}``."""
    snapshot = snapshot or catalog()
    return [
        {
            "model": model,
            "yaml_key": f"credits.{card.table_key}.{model}",
            "codex_default": model == snapshot.default_model,
        }
        for model in card.unpriced(snapshot.slugs())
    ]


def rate_card_gap_lines(
    gaps: list[dict[str, Any]], path: str, card: RateCard, full: bool = False
) -> list[str]:
    """What the gateway says about ``gaps`` (:func:`rate_card_gaps`): one line at start-up and
    under ``usage`` (how many catalog models are unpriced, whether Codex's default is one, and
    where the list is); with ``full`` (``usage --unpriced``), every model with the YAML key to
    set and an example. Nothing when there is no gap."""
    if not gaps:
        return []
    version = catalog().codex_version
    default = next((g["model"] for g in gaps if g["codex_default"]), None)
    if not full:
        which = f", Codex's default {default} among them" if default else ""
        return [
            f"the rate card cannot price {len(gaps)} model(s) of Codex {version}'s catalog"
            f"{which}: unpriced, and refused to members with a credit quota; list and fix: "
            "gateway usage --unpriced"
        ]
    example = default or gaps[0]["model"]
    target = next((name for name in card.table if name not in card.same_as), None)
    mapping = f"{{same_as: {target}}}" if target else "{input: ..., cached_input: ..., output: ...}"
    lines = [
        f"the rate card cannot price {len(gaps)} model(s) of Codex {version}'s catalog: their "
        "requests are unpriced, and refused to members with a credit quota. Set in "
        f"{path}:",
    ]
    for gap in gaps:
        note = "  (Codex's default model)" if gap["codex_default"] else ""
        lines.append(f"  {gap['yaml_key']}{note}")
    lines.append(
        f"  e.g. credits.{card.table_key}.{example}: {mapping} (another entry's rates, an "
        f"estimate you own), or credits.{card.table_key}.default: {mapping} for every model "
        "the card lacks"
    )
    return lines
