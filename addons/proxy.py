"""Entry script for ``mitmdump -s addons/proxy.py`` (and for the launcher).

Only lists the addons, in hook order. State that must survive a hot reload of this script (the
key, the workload identity) lives in ``addons.keyholder`` / ``addons.workload_identity``,
imported modules.
"""

from addons.allowlist import Allowlist
from addons.body_decode import DecodeLimitOptions
from addons.bomb_fence import BombFence
from addons.bridge.addons import ChatBridge, ChatReplies
from addons.clean_stop import CleanStop
from addons.dumps import DumpWriter
from addons.error_replies import JsonErrorReplies
from addons.forward import UpstreamForwarder
from addons.guard import OptionGuard
from addons.recorder import Recorder
from addons.redaction import HeaderRedaction
from addons.request_stream import RequestStreaming
from addons.server_info import ServerInfo
from addons.shutdown import HttpShutdown
from addons.sse_stream import SseStreaming
from addons.telemetry import Telemetry
from addons.upstream_connect import UpstreamConnect
from addons.views import CodexContentviews
from addons.websocket_refusal import WebSocketRefusal
from addons.workload_identity import WorkloadIdentityRenewal

addons = [
    OptionGuard(),
    DecodeLimitOptions(),  # how far a body may expand when read (dumps, views, facts)
    CodexContentviews(),
    JsonErrorReplies(),
    ServerInfo(),
    HttpShutdown(),
    WebSocketRefusal(),
    ChatBridge(),  # before Allowlist: claims POST /v1/chat/completions when --chat-bridge
    Allowlist(),
    SseStreaming(),
    HeaderRedaction(),  # after SseStreaming: it wraps the SSE tee
    ChatReplies(),  # after both: it wraps their stream callables
    RequestStreaming(),
    DumpWriter(),
    Recorder(),
    BombFence(),  # after Recorder: bodies past the decode limit stay as received in HAR/mitmweb
    WorkloadIdentityRenewal(),  # before the forwarder: the keyless mode's token it injects
    UpstreamForwarder(),
    UpstreamConnect(),
    # OTLP export when an OTEL_EXPORTER_OTLP_*ENDPOINT is set: one GenAI span per forwarded
    # request; after the SSE tee and the bridge restored the reply it reads.
    Telemetry(),
    CleanStop(),  # last: closes what is still open once the others have recorded it
]
