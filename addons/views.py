"""Registration of every Codex content view: the Responses views (``addons/contentviews.py``)
and the Chat Completions bridge's (``addons/bridge/contentviews.py``).

It sits above both view modules, so neither imports the other: the bridge's views import the
shared rendering (``render_request``, ``render_turn``, ``stream_timeline``, the priority) down
from ``addons.contentviews``, and only this module knows the whole list.
"""

from __future__ import annotations

from mitmproxy import contentviews

from addons.bridge.contentviews import ChatRequestContentview, ChatStreamContentview
from addons.contentviews import (
    ResponsesRequestContentview,
    ResponsesSocketContentview,
    ResponsesStreamContentview,
)


def all_views() -> tuple[contentviews.Contentview, ...]:
    """The Responses views (HTTP and WebSocket) and the Chat Completions bridge's, in the
    order they register."""
    return (
        ResponsesRequestContentview(),
        ResponsesStreamContentview(),
        ResponsesSocketContentview(),
        ChatRequestContentview(),
        ChatStreamContentview(),
    )


class CodexContentviews:
    """Registers the Codex views with mitmproxy when the addon loads (so plain ``mitmdump -s
    addons/proxy.py``, ``--flow-detail 3``, the console and ``./run.sh web`` all get them).
    mitmproxy 12 has no way to unregister a view; registering again (a script reload)
    replaces it by name."""

    def load(self, loader) -> None:
        for view in all_views():
            contentviews.add(view)
