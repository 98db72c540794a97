"""Header redaction: one rule for every artifact the bundle writes or shows.

The rule (the reference proxy's for its dumps, plus ours): ``authorization``,
``proxy-authorization``, any header whose name contains ``cookie``, and the names in
``codex_redact_headers`` (default ``api-key``, ``x-api-key``, ``openai-api-key``), in requests
and in responses. Dumps apply it to their copy (:func:`redact_fields`); :class:`HeaderRedaction`
applies it to the flow objects that mitmproxy records or shows (``-w`` / ``save_stream_file``
flow files, ``hardump`` HAR, ``flow_detail`` output, mitmweb's UI, JSON API and exports), once
the headers have gone on the wire, so the upstream and the client still get them unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mitmproxy import ctx, http

from addons.common import fail_closed
from addons.secret_memory import REDACTED
from addons.sse_stream import Tee, restore_teed_body

ALWAYS_REDACTED = frozenset({"authorization", "proxy-authorization"})
#: ``codex_redact_headers``' default (also in ``config/proxy.yaml``).
DEFAULT_EXTRA = ("api-key", "x-api-key", "openai-api-key")


def extra_names(names: Iterable[str]) -> frozenset[str]:
    """The configured extra names, lower-cased for :func:`should_redact`."""
    return frozenset(n.strip().lower() for n in names if n.strip())


def should_redact(name: str, extra: frozenset[str] = frozenset()) -> bool:
    """Whether a header's value is replaced by ``"[REDACTED]"``.

    Rule of the reference proxy's dumps: ``authorization`` or any name containing ``cookie``
    (any case); we add ``proxy-authorization`` and the configured ``extra`` names (lower-case,
    exact, see :func:`extra_names`).
    """
    lower = name.lower()
    return lower in ALWAYS_REDACTED or "cookie" in lower or lower in extra


def redact_fields(
    fields: Iterable[tuple[bytes, bytes]], extra: frozenset[str] = frozenset()
) -> list[dict[str, str]]:
    """Raw header fields (as mitmproxy keeps them: original case and order) to a dump's
    ``[{"name": ..., "value": ...}]`` list, redacted by :func:`should_redact`."""
    out = []
    for raw_name, raw_value in fields:
        name = raw_name.decode("utf-8", "replace")
        value = REDACTED if should_redact(name, extra) else raw_value.decode("utf-8", "replace")
        out.append({"name": name, "value": value})
    return out


def redact_in_place(headers: http.Headers, extra: frozenset[str] = frozenset()) -> bool:
    """Replace the values :func:`should_redact` names by ``[REDACTED]`` in a flow's headers,
    keeping names, order and duplicates. Returns whether anything changed."""
    redacted = REDACTED.encode()
    fields = tuple(
        (name, redacted if should_redact(name.decode("latin-1"), extra) else value)
        for name, value in headers.fields
    )
    if fields == headers.fields:
        return False
    headers.fields = fields
    return True


def has_redacted(headers: http.Headers, extra: frozenset[str] = frozenset()) -> bool:
    """Whether any header is one :func:`should_redact` names (with a value not yet redacted)."""
    return any(
        should_redact(name.decode("latin-1"), extra) and value != REDACTED.encode()
        for name, value in headers.fields
    )


class HeaderRedaction:
    """Redacts secret-bearing headers in flow objects after they went on the wire.

    mitmproxy's recorders read the flow object: ``Save`` writes it in ``response`` / ``error``,
    ``SaveHar`` renders at ``done``, ``Dumper`` prints in ``response`` / ``error``, mitmweb pushes
    it after every hook. Script addons run before all of those for each hook (``ScriptLoader``
    precedes them in mitmproxy's addon chain), so redacting in our own hooks is in time:

    - the request's headers: in ``responseheaders`` (the request head has gone upstream),
      ``response`` (also a local reply: it never left), ``error`` and ``done``;
    - the response's headers: a response head is sent to the client only after the
      ``response`` hook unless the body is streamed. So a reply whose head carries a header to
      redact is streamed (a :class:`Tee` keeps its body, as for SSE), and its headers are
      redacted when the first chunk passes (the head went out just before) or, at the latest,
      in ``response`` / ``error`` / ``done`` once streaming started. A reply with no body at all
      (mitmproxy sends it whole after the ``response`` hook) is the one case left unredacted.

    In the flow object, in flight (between ``requestheaders`` and the reply's head), the
    client's headers are as sent; that is what mitmweb shows until the reply starts.
    """

    def __init__(self) -> None:
        self.extra: frozenset[str] = frozenset(DEFAULT_EXTRA)
        self._tees: dict[str, Tee] = {}
        self._head_sent: set[str] = set()
        self._live: dict[str, http.HTTPFlow] = {}

    def load(self, loader) -> None:
        loader.add_option(
            "codex_redact_headers",
            Sequence[str],
            list(DEFAULT_EXTRA),
            "Extra header names (case-insensitive) whose values are [REDACTED] in dumps, flow "
            "files, HAR, flow_detail output and mitmweb, besides authorization, "
            "proxy-authorization and any name containing 'cookie'.",
        )

    def configure(self, updated: set[str]) -> None:
        if "codex_redact_headers" in updated:
            self.extra = extra_names(ctx.options.codex_redact_headers)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._live[flow.id] = flow

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        redact_in_place(flow.request.headers, self.extra)
        response = flow.response
        if response is None or not has_redacted(response.headers, self.extra):
            return
        inner = response.stream
        if not inner:
            tee = Tee()
            self._tees[flow.id] = tee
            inner = tee

        def stream(chunk: bytes) -> bytes | Iterable[bytes]:
            if flow.id not in self._head_sent:
                # mitmproxy sent the head right after responseheaders, before any chunk.
                self._head_sent.add(flow.id)
                redact_in_place(response.headers, self.extra)
            return inner(chunk) if callable(inner) else chunk

        response.stream = stream

    def response(self, flow: http.HTTPFlow) -> None:
        # Only a streamed head has gone to the client already; a whole reply goes after this.
        self._finish(flow, head_gone=flow.id in self._head_sent)

    def error(self, flow: http.HTTPFlow) -> None:
        # Sent, or never to be sent: mitmproxy answers a failed flow with its own error reply.
        self._finish(flow, head_gone=True)

    def done(self) -> None:
        for flow in list(self._live.values()):
            self._finish(flow, head_gone=True)

    def _finish(self, flow: http.HTTPFlow, head_gone: bool) -> None:
        self._live.pop(flow.id, None)
        self._head_sent.discard(flow.id)
        redact_in_place(flow.request.headers, self.extra)
        tee = self._tees.pop(flow.id, None)
        if tee is not None:
            restore_teed_body(flow, tee)
        if head_gone and flow.response is not None:
            redact_in_place(flow.response.headers, self.extra)
