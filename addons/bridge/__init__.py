"""The Chat Completions bridge (``--chat-bridge``): tools that only speak
``/v1/chat/completions`` use Codex models through the proxy's Responses upstream.

Off by default: the strict proxy then answers ``/v1/chat/completions`` with 403, as the
reference does. Pieces: :mod:`.efforts` (reasoning-effort resolution per model),
:mod:`.translate` (request and whole-reply translation), :mod:`.stream` (SSE event by event),
:mod:`.addons` (the two mitmproxy addons that place them in the flow).
"""
