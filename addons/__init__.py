"""codex-responses-api-proxy as mitmproxy addons.

- ``commands.py``: ``codex-proxy``, the one command for every mode (``./run.sh`` hands over).
- ``proxy.py``: the strict proxy's entry script (``mitmdump -s addons/proxy.py``); ``cli.py`` its
  launcher (``codex-proxy``, ``./run.sh``). ``web_ui.py`` / ``web.py``: the mitmweb front.
- ``gateway.py``: gateway mode's entry script; ``gateway_mode/``: what only the gateway has.
- ``bridge/``: the Chat Completions bridge; ``workers/``: ``--workers N`` for every mode.
- Everything else in this folder is shared by the modes: the addons (one concern per file) and
  the readers they share (``body_decode``, ``sse_events``, ``responses_turn``, ``credits``).
"""
