from mitmproxy.test import taddons, tflow

from addons.shutdown import HttpShutdown


class RecordingShutdown(HttpShutdown):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def shutdown(self):
        self.calls += 1


def get_flow(method="GET", path="/shutdown"):
    f = tflow.tflow()
    f.request.method = method
    f.request.path = path
    return f


def test_shutdown_answers_200_then_stops_when_client_is_gone():
    addon = RecordingShutdown()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_http_shutdown=True)
        f = get_flow()
        addon.requestheaders(f)
        assert f.response.status_code == 200 and f.response.content == b""
        assert f.response.headers["connection"] == "close"
        assert addon.calls == 0
        addon.client_disconnected(f.client_conn)
        assert addon.calls == 1


def test_without_the_flag_shutdown_is_not_special():
    addon = RecordingShutdown()
    with taddons.context(addon):
        f = get_flow()
        addon.requestheaders(f)
        assert f.response is None
        addon.client_disconnected(f.client_conn)
        assert addon.calls == 0


def test_only_exact_get_shutdown():
    addon = RecordingShutdown()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_http_shutdown=True)
        for method, path in [
            ("POST", "/shutdown"),
            ("GET", "/shutdown?x"),
            ("GET", "/shutdown/"),
            ("get", "/shutdown"),
        ]:
            f = get_flow(method, path)
            addon.requestheaders(f)
            assert f.response is None, (method, path)
