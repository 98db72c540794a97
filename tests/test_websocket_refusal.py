import pytest
from mitmproxy.test import taddons, tflow

from addons.common import ALLOWED, REFUSED
from addons.websocket_refusal import WebSocketRefusal


@pytest.mark.parametrize(
    ("path", "upgrade", "status"),
    [
        ("/v1/responses", "websocket", 426),
        ("/v1/responses", "WebSocket", 426),
        ("/v1/responses", "h2c, websocket", 426),
        ("/v1/responses?x=1", "websocket", 426),
        ("/v1/responses", "h2c", None),
        ("/v1/models", "websocket", None),
        ("/v1/responses", None, None),
    ],
)
def test_websocket_upgrades_get_426(path, upgrade, status):
    addon = WebSocketRefusal()
    with taddons.context(addon):
        f = tflow.tflow()
        f.request.method = "GET"
        f.request.path = path
        if upgrade:
            f.request.headers["Upgrade"] = upgrade
            f.request.headers["Connection"] = "Upgrade"
        f.metadata[ALLOWED] = True
        addon.requestheaders(f)
        if status is None:
            assert f.response is None
        else:
            assert f.response.status_code == 426
            assert f.metadata[REFUSED] == "websocket" and ALLOWED not in f.metadata
            assert b"supports_websockets = false" in f.response.content
