"""How a WebSocket's end reads in the log: a normal end of a Codex session is not an error.

Codex 0.171 ends a session on its socket (``serve --websockets``) by closing the TCP
connection without a WebSocket close frame, every time (checked: ``codex exec`` through the
gateway, the flow's ``closed_by_client`` true, no turn open). mitmproxy's WebSocket layer then
records close code 1006 (``ABNORMAL_CLOSURE``: RFC 6455 7.1.5, no close frame was received), and
its flow log (``Dumper``, ``flow_detail`` ≥ 1) printed ``Error in WebSocket connection to …:
WebSocket Error: ABNORMAL_CLOSURE`` in red at the end of every normal session.

:class:`SocketClose` says what such an end was, in the flow (``websocket_end`` runs in every
script addon before mitmproxy's flow log reads the code):

- the client closed without a close frame while none of the socket's turns was open: the
  client's normal end (the Responses socket protocol has no goodbye), recorded as 1000 with
  the reason ``client closed between turns without a close frame``;
- the proxy closed it on purpose (the gateway's metering, when a member key is revoked,
  :func:`mark_closed_by_proxy`): recorded as 1008 (policy violation, RFC 6455 7.4.1) with the
  metering's reason, e.g. ``member key revoked``: still an error line in the flow log, but
  one that says why;
- the proxy stopped with the socket open (its ``done`` has run; :mod:`addons.clean_stop` then
  closes the connection): recorded as 1001 (going away) with the reason ``the proxy stopped``;
- anything else stays as the wire said: a client gone mid-turn or an upstream that dropped
  the connection is still logged as the error it is, in one line.

Either way the code the wire gave is kept in ``flow.metadata`` (:data:`WIRE_CLOSE_CODE`). Open
turns are counted from the ``socket_turn_start`` / ``socket_turn_end`` events
(:mod:`addons.socket_turns`), so the gateway's metering needs no change; this addon goes before
it in the entry script (the metering ends a closed socket's open turns in its own
``websocket_end``).
"""

from __future__ import annotations

from mitmproxy import http

from addons.socket_turns import SocketTurn

#: ``flow.metadata``: the close code the WebSocket layer recorded, when this addon replaced it.
WIRE_CLOSE_CODE = "codex_socket.wire_close_code"
#: ``flow.metadata``: why the proxy itself closed the socket (:func:`mark_closed_by_proxy`).
CLOSED_BY_PROXY = "codex_socket.closed_by_proxy"
#: RFC 6455 7.4.1 status codes.
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
ABNORMAL_CLOSURE = 1006
POLICY_VIOLATION = 1008
#: The close reasons this addon records.
BETWEEN_TURNS = "client closed between turns without a close frame"
PROXY_STOPPED = "the proxy stopped"


def mark_closed_by_proxy(flow: http.HTTPFlow, reason: str) -> None:
    """Note that the proxy is closing ``flow``'s socket on purpose, and why (a short text)."""
    flow.metadata[CLOSED_BY_PROXY] = reason


def classify_close(
    close_code: int | None,
    closed_by_client: bool | None,
    open_turns: int,
    stopping: bool,
    closed_by_proxy: str | None = None,
) -> tuple[int, str] | None:
    """The ``(close code, reason)`` to record for a socket that ended with ``close_code``, or
    ``None`` to keep the wire's (see the module docstring for the cases)."""
    if close_code != ABNORMAL_CLOSURE:
        return None
    if closed_by_proxy:
        return POLICY_VIOLATION, closed_by_proxy
    if stopping:
        return GOING_AWAY, PROXY_STOPPED
    if closed_by_client and open_turns == 0:
        return NORMAL_CLOSURE, BETWEEN_TURNS
    return None


class SocketClose:
    """Records a normal end of a socket as one (see the module docstring)."""

    def __init__(self) -> None:
        #: Open turns per WebSocket flow id (only flows with a turn open or once opened).
        self.open_turns: dict[str, int] = {}
        self.stopping = False

    def socket_turn_start(self, flow: http.HTTPFlow, turn: SocketTurn) -> None:
        self.open_turns[flow.id] = self.open_turns.get(flow.id, 0) + 1

    def socket_turn_end(self, flow: http.HTTPFlow, turn: SocketTurn) -> None:
        if flow.id in self.open_turns:
            self.open_turns[flow.id] = max(0, self.open_turns[flow.id] - 1)

    def done(self) -> None:
        self.stopping = True

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        open_turns = self.open_turns.pop(flow.id, 0)
        ws = flow.websocket
        if ws is None:
            return
        by_proxy = flow.metadata.get(CLOSED_BY_PROXY)
        replaced = classify_close(
            ws.close_code,
            ws.closed_by_client,
            open_turns,
            self.stopping,
            by_proxy if isinstance(by_proxy, str) else None,
        )
        if replaced is not None:
            flow.metadata[WIRE_CLOSE_CODE] = ws.close_code
            ws.close_code, ws.close_reason = replaced
