import ast
from pathlib import Path

from mitmproxy import contentviews
from mitmproxy.test import taddons

from addons.views import CodexContentviews, all_views

ROOT = Path(__file__).resolve().parent.parent
NAMES = [
    "Responses request",
    "Responses stream",
    "Responses socket message",
    "Chat Completions request",
    "Chat Completions stream",
]


def test_loading_the_addon_registers_every_codex_view():
    assert [view.name for view in all_views()] == NAMES
    with taddons.context(CodexContentviews()):
        for name in NAMES:
            assert contentviews.registry.get(name.lower()).name == name


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_neither_view_module_imports_the_other_or_the_registration():
    responses = imported_modules(ROOT / "addons" / "contentviews.py")
    bridge = imported_modules(ROOT / "addons" / "bridge" / "contentviews.py")
    assert not {m for m in responses if m.startswith("addons.bridge")}
    assert "addons.views" not in responses | bridge
    assert "addons.contentviews" in bridge  # the shared rendering, imported down
