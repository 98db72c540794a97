"""The versions this bundle is tested with, each named in one place.

- mitmproxy: the range in ``pyproject.toml`` (``mitmproxy>=12.3,<12.4``); see the README for why.
- The Codex CLI (a test client, and the Rust reference proxy the benchmark measures): the exact
  version of ``@openai/codex`` in ``package.json``'s ``devDependencies``. ``run.sh`` installs
  that one with ``npm install``; this module reads it for the tests, the benchmark and the docs
  checks, so a bump is one edit there plus ``npm install`` (which rewrites the lock file).
"""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_JSON = os.path.join(ROOT, "package.json")


def codex_cli_version(path: str = PACKAGE_JSON) -> str:
    """The pinned ``@openai/codex`` version, e.g. ``"0.171.0"``.

    Raises:
        ValueError: when the file names none, or a range instead of an exact version.
    """
    with open(path, encoding="utf-8") as f:
        deps = json.load(f).get("devDependencies", {})
    version = deps.get("@openai/codex")
    if not isinstance(version, str) or not version[:1].isdigit():
        raise ValueError(f"{path}: @openai/codex must be pinned to an exact version")
    return version
