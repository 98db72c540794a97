"""README.md and the guides in docs/: every relative link and anchor resolves, and the README
stays a short front page that leads to every guide (issue 21).

The files are read with markdown-it-py, a CommonMark parser, so a link inside a code span or a
fenced block is not a link and a ``#`` line in a shell block is not a heading, as on GitHub.
Anchors follow GitHub's heading ids (its ``github-slugger``): the heading's text, lower-cased,
every character that is not a letter, digit, ``_``, ``-`` or space removed, each space turned
into ``-``; a repeated id gets ``-1``, ``-2``, ... in order.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

from tests.conftest import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
#: The README's budget (issue 21: "README ≤ 250 lines").
README_MAX_LINES = 250

_md = MarkdownIt("commonmark").enable("table")


def slug(text: str) -> str:
    """GitHub's id for a heading whose rendered text is ``text`` (before de-duplication)."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _text(inline: Token) -> str:
    """The rendered text of an inline token: text and code spans, without markup."""
    return "".join(
        child.content for child in inline.children or [] if child.type in ("text", "code_inline")
    )


@cache
def tokens(path: Path) -> list[Token]:
    return _md.parse(path.read_text())


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading id of a Markdown file, de-duplicated as GitHub does."""
    seen: dict[str, int] = {}
    ids = set()
    toks = tokens(path)
    for i, tok in enumerate(toks):
        if tok.type != "heading_open":
            continue
        base = slug(_text(toks[i + 1]))
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.add(base if n == 0 else f"{base}-{n}")
    return frozenset(ids)


def links(path: Path) -> list[str]:
    """Every link and image target in ``path``, in order."""
    out = []
    for tok in tokens(path):
        for child in tok.children or []:
            target = child.attrs.get("href") or child.attrs.get("src")
            if child.type in ("link_open", "image") and isinstance(target, str):
                out.append(target)
    return out


def relative_links(path: Path) -> list[str]:
    return [t for t in links(path) if not urlsplit(t).scheme and not t.startswith("//")]


def check_link(page: Path, target: str) -> str | None:
    """Why ``target``, linked from ``page``, does not resolve; None when it does."""
    parts = urlsplit(target)
    dest = (page.parent / unquote(parts.path)).resolve() if parts.path else page
    if not dest.is_relative_to(ROOT):
        return f"{target}: leaves the repository"
    if not dest.exists():
        return f"{target}: no such file {dest.relative_to(ROOT)}"
    if parts.fragment:
        if dest.suffix != ".md":
            return f"{target}: an anchor into a file that is not Markdown"
        if unquote(parts.fragment) not in anchors(dest):
            return f"{target}: no heading with id #{parts.fragment} in {dest.relative_to(ROOT)}"
    return None


def test_the_guides_exist():
    names = {p.name for p in DOCS}
    for mode in ("proxy", "gateway", "bridge", "inspection", "recording", "keyless", "workers"):
        assert f"{mode}.md" in names
    for topic in ("performance", "security", "development"):
        assert f"{topic}.md" in names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path):
    found = relative_links(page)
    assert found, f"{page.name} links nowhere"
    broken = [why for why in (check_link(page, t) for t in found) if why]
    assert broken == []


def test_the_checker_catches_a_broken_link_and_anchor(tmp_path: Path):
    """The check itself: a missing file, a missing anchor, a link in a code span (not a
    link), a duplicate heading's -1 id, a heading's code span in its id."""
    page = ROOT / "docs" / "x.md"  # only a name to resolve from; never written
    assert check_link(page, "../README.md") is None
    assert check_link(page, "../README.md#real-use") is None
    assert check_link(page, "nope.md") is not None
    assert check_link(page, "../README.md#no-such-heading") is not None
    assert check_link(page, "../../outside.md") is not None
    assert check_link(page, "../run.sh#x") is not None
    md = tmp_path / "t.md"
    md.write_text(
        "# Several cores: `--workers N`\n\n## Notes\n\n## Notes\n\n"
        "`[not](a-link.md)` [yes](#notes-1)\n\n```sh\n# not a heading\n```\n"
    )
    assert anchors(md) == {"several-cores---workers-n", "notes", "notes-1"}
    assert links(md) == ["#notes-1"]


def test_readme_is_a_short_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    # The two set-up commands come first, as they always have: the main job, then the tests.
    assert lines[2] == "```sh" and lines[5] == "```"
    assert lines[3].startswith(
        "./run.sh demo    # the proxy in front of a local Responses stand-in"
    )
    assert lines[4].startswith("./run.sh test    # the whole test suite")


def test_readme_leads_to_every_guide_from_its_modes_table():
    """Every guide is linked from the README, and the modes table (its first table) names
    each mode's guide, so the first screen says where a reader's mode is documented."""
    linked = {(README.parent / urlsplit(t).path).resolve() for t in relative_links(README)}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []
    toks = tokens(README)
    start = next(i for i, t in enumerate(toks) if t.type == "table_open")
    end = next(i for i, t in enumerate(toks) if t.type == "table_close")
    table_links = {
        c.attrs["href"] for t in toks[start:end] for c in t.children or [] if c.type == "link_open"
    }
    for mode in ("proxy", "inspection", "recording", "keyless", "gateway", "bridge", "workers"):
        assert f"docs/{mode}.md" in table_links, mode
