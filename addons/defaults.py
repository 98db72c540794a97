"""Where the bundle's YAML defaults are: ``config/*.yaml`` (the strict proxy's ``proxy.yaml``,
the gateway's ``gateway.yaml``, the Codex rate card, the pinned Codex's model catalog).

They ship inside the package as ``addons/default_config/``: in a checkout that is a symlink to
``../config`` (so ``run.sh``, the tests and the README keep naming ``config/``, and a path
relative to a default file, such as ``proxy.yaml``'s ``rate_card``, resolves there as before);
in an installed wheel it is a plain directory of package data (``pyproject.toml``'s
``[tool.setuptools.package-data]``).
"""

from __future__ import annotations

import os

_SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_config")

#: The directory of the defaults: ``<checkout>/config`` in a checkout (the symlink's target,
#: with the checkout's own path kept as it is), ``<site-packages>/addons/default_config`` once
#: installed.
DEFAULTS_DIR = (
    os.path.normpath(os.path.join(os.path.dirname(_SHIPPED), os.readlink(_SHIPPED)))
    if os.path.islink(_SHIPPED)
    else _SHIPPED
)


def default_file(name: str) -> str:
    """The absolute path of the shipped default ``name`` (e.g. ``"proxy.yaml"``); the file is
    not opened here (a missing one is the reader's error, as for any path)."""
    return os.path.join(DEFAULTS_DIR, name)
