"""Entry script for gateway mode: ``mitmdump -s addons/gateway.py`` (and ``./run.sh gateway
serve``).

Only lists the addons, in hook order: the strict proxy's shared addons and the gateway's own
(``addons/gateway_mode/``). State that must survive a hot reload (the upstream keys) lives in
``addons.gateway_mode.keypool``, an imported module.
"""

from addons.allowlist import Allowlist
from addons.body_decode import DecodeLimitOptions
from addons.bomb_fence import BombFence
from addons.bridge.addons import ChatBridge, ChatReplies
from addons.clean_stop import CleanStop
from addons.dumps import DumpWriter
from addons.error_replies import JsonErrorReplies
from addons.gateway_mode.accounting import UsageAccounting
from addons.gateway_mode.auth import MemberAuth
from addons.gateway_mode.codex_filter import CodexFilter
from addons.gateway_mode.codex_replies import CodexReplies
from addons.gateway_mode.connect import RetryingConnect
from addons.gateway_mode.cookies import NoCookies
from addons.gateway_mode.core import GatewayClose, GatewayCore, GatewayOptions, RequestFacts
from addons.gateway_mode.forward import PoolForwarder
from addons.gateway_mode.genai import ADMITTED, AUTHENTICATED, PhaseMark
from addons.gateway_mode.local_routes import LocalRoutes
from addons.gateway_mode.member_models import MemberCatalog, ModelGate, ModelsRoute
from addons.gateway_mode.quota import QuotaGate
from addons.gateway_mode.socket_bounds import SocketBounds
from addons.gateway_mode.tls import ListenTls
from addons.gateway_mode.websocket import WebSocketRoute, WebSocketTurns
from addons.guard import OptionGuard
from addons.recorder import Recorder
from addons.redaction import HeaderRedaction
from addons.server_info import ServerInfo
from addons.shutdown import HttpShutdown
from addons.socket_close import SocketClose
from addons.sse_stream import SseStreaming
from addons.telemetry import Telemetry
from addons.views import CodexContentviews
from addons.websocket_refusal import WebSocketRefusal

core = GatewayCore()
forwarder = PoolForwarder(core)

addons = [
    OptionGuard(),
    Telemetry(strict=False),  # OTLP export on/off; the accounting records the turns
    DecodeLimitOptions(),  # how far a body may expand when read (dumps, views, facts)
    ListenTls(),
    GatewayOptions(core),
    CodexContentviews(),
    JsonErrorReplies(),
    ServerInfo(),
    HttpShutdown(),
    WebSocketRoute(),  # --websockets: claims GET /v1/responses upgrades (else 426 below)
    WebSocketRefusal(),
    LocalRoutes(core),  # GET /health, GET /metrics
    # --chat-bridge: claims POST /v1/chat/completions; its request hook translates the body
    # before the Codex filter and the quota check read the model.
    ChatBridge(),
    ModelsRoute(),  # claims GET /v1/models for members (the bridge's bare one answered first)
    Allowlist(),  # POST /v1/responses (+ /v1/responses/compact via codex_extra_routes)
    MemberAuth(core),  # 401 unless a live member key; removes it from the flow
    MemberCatalog(core),  # answers GET /v1/models: the catalog entries the member may use
    PhaseMark(AUTHENTICATED),  # OpenTelemetry: the member-auth child span ends here
    NoCookies(),
    RequestFacts(core),  # request: model/service_tier off the loop; 413 bomb, 400 deep JSON
    CodexFilter(core),  # request: 403 for non-Codex clients
    ModelGate(core),  # request: 403 (400 to Codex) for a model the member may not use
    QuotaGate(core),  # request: 429/503 before anything goes upstream
    PhaseMark(ADMITTED),  # OpenTelemetry: the quota-check child span ends here
    forwarder,  # requestheaders: route; request: pick and inject an upstream key last
    # Member sockets bounded as bytes arrive (message size, frame rate, unread backlog);
    # before the turns' meter, whose ws_connections row takes the reason it closed one.
    SocketBounds(),
    SocketClose(),  # before the metering, which ends a closed socket's open turns itself
    # After the forwarder (restores the upgrade headers it strips); meters each socket turn.
    WebSocketTurns(core, forwarder),
    # After every refusal and the forwarder's retries: statuses Codex acts on, and the
    # member's windows in Codex's rate-limit headers (upstream x-codex-* removed).
    CodexReplies(core),
    SseStreaming(),
    HeaderRedaction(),
    ChatReplies(),  # after both: it wraps their stream callables; before accounting
    DumpWriter(),
    Recorder(),
    BombFence(),  # after Recorder: bodies past the decode limit stay as received in HAR/mitmweb
    UsageAccounting(core, forwarder),
    RetryingConnect(core),
    CleanStop(),  # closes what is still open once accounting has recorded it
    GatewayClose(core),  # last: its done() runs after accounting has queued the last rows
]
