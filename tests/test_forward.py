import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow, tutils

from addons import keyholder
from addons.common import ALLOWED, KEY_INJECTED
from addons.forward import UpstreamForwarder
from tests.conftest import TEST_KEY

BEARER = f"Bearer {TEST_KEY}"


def allowed_flow(**headers: str) -> http.HTTPFlow:
    f = tflow.tflow()
    f.request.method = "POST"
    f.request.path = "/v1/responses"
    f.request.headers.clear()
    f.request.headers["Host"] = "127.0.0.1:9999"
    for name, value in headers.items():
        f.request.headers.add(name.replace("_", "-"), value)
    f.metadata[ALLOWED] = True
    return f


def test_injects_exactly_one_key_and_routes(loaded_key):
    addon = UpstreamForwarder()
    with taddons.context(addon) as tctx:
        tctx.configure(
            addon, codex_upstream_url="https://up.example:8443/v1/responses?api-version=1"
        )
        f = allowed_flow(
            authorization="Bearer client-one",
            Authorization="Bearer client-two",
            proxy_authorization="Basic abc",
            content_type="application/json",
            x_custom="kept",
            connection="close",
            keep_alive="1",
            te="trailers",
        )
        addon.requestheaders(f)
        assert f.response is None
        assert f.request.headers.get_all("authorization") == [BEARER]
        assert "proxy-authorization" not in f.request.headers
        assert "keep-alive" not in f.request.headers and "te" not in f.request.headers
        assert "connection" not in f.request.headers
        assert f.request.headers["x-custom"] == "kept"
        assert f.request.headers["content-type"] == "application/json"
        assert f.request.url == "https://up.example:8443/v1/responses?api-version=1"
        assert f.request.host_header == "up.example:8443"
        assert f.request.headers.get_all("host") == ["up.example:8443"]
        assert f.metadata[KEY_INJECTED] is True


def test_unmarked_flow_is_refused_and_gets_no_key(loaded_key):
    addon = UpstreamForwarder()
    with taddons.context(addon):
        f = allowed_flow()
        del f.metadata[ALLOWED]
        addon.requestheaders(f)
        assert f.response.status_code == 403
        assert "authorization" not in f.request.headers


def test_missing_key_fails_closed_with_500():
    keyholder.API_KEY.clear()
    addon = UpstreamForwarder()
    with taddons.context(addon):
        f = allowed_flow()
        addon.requestheaders(f)
        assert f.response.status_code == 500
        assert ALLOWED not in f.metadata
        assert "authorization" not in f.request.headers


def test_start_up_without_a_key_logs_an_error(caplog):
    keyholder.API_KEY.clear()
    addon = UpstreamForwarder()
    with taddons.context(addon):
        addon.running()
    assert "no API key loaded" in caplog.text


def test_key_file_option_reads_with_reference_rules(tmp_path, monkeypatch):
    hardened = []
    monkeypatch.setattr("addons.forward.harden_process", lambda: hardened.append(1))
    keyholder.API_KEY.clear()
    bad = tmp_path / "bad"
    bad.write_bytes(b"not valid!\n")
    good = tmp_path / "good"
    good.write_bytes(TEST_KEY.encode() + b"\n")
    addon = UpstreamForwarder()
    try:
        with taddons.context(addon) as tctx:
            with pytest.raises(exceptions.OptionsError, match="may only contain"):
                tctx.configure(addon, codex_key_file=str(bad))
            tctx.configure(addon, codex_key_file=str(good))
            assert keyholder.API_KEY.header_value() == BEARER
            assert hardened  # hardening ran before the key was read
    finally:
        keyholder.API_KEY.clear()


def test_bad_upstream_url_stops_configuration(loaded_key):
    addon = UpstreamForwarder()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, codex_upstream_url="api.openai.com/v1/responses")


@pytest.mark.parametrize("hook", ["responseheaders", "response", "error"])
def test_key_is_scrubbed_from_the_flow_once_sent(loaded_key, hook):
    addon = UpstreamForwarder()
    with taddons.context(addon):
        f = allowed_flow()
        addon.requestheaders(f)
        assert f.request.headers["authorization"] == BEARER
        f.response = tutils.tresp()
        getattr(addon, hook)(f)
        assert f.request.headers["authorization"] == "[REDACTED]"


def test_key_is_scrubbed_from_open_flows_at_shutdown(loaded_key):
    addon = UpstreamForwarder()
    with taddons.context(addon):
        f = allowed_flow()
        addon.requestheaders(f)
        addon.done()
        assert TEST_KEY not in str(f.get_state())


def test_chunked_request_is_sent_with_content_length(loaded_key):
    addon = UpstreamForwarder()
    with taddons.context(addon):
        f = allowed_flow(transfer_encoding="chunked")
        f.request.raw_content = b'{"model":"m"}'
        addon.requestheaders(f)
        addon.request(f)
        assert "transfer-encoding" not in f.request.headers
        assert f.request.headers["content-length"] == "13"


def test_body_is_untouched(loaded_key):
    addon = UpstreamForwarder()
    body = bytes(range(256)) * 10
    with taddons.context(addon):
        f = allowed_flow(content_encoding="zstd")
        f.request.raw_content = body
        addon.requestheaders(f)
        addon.request(f)
        assert f.request.raw_content == body
        assert f.request.headers["content-encoding"] == "zstd"
