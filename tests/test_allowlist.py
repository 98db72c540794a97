import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils

from addons.allowlist import Allowlist, parse_routes, refusal_reason
from addons.common import ALLOWED, REFUSED


def make_flow(method="POST", path="/v1/responses", authority="", http_version="HTTP/1.1"):
    f = tflow.tflow()
    f.request.method = method
    f.request.path = path
    f.request.authority = authority
    f.request.http_version = http_version
    return f


# (method, target, authority, allowed)
SHAPES = [
    ("POST", "/v1/responses", "", True),
    ("GET", "/v1/responses", "", False),
    ("PUT", "/v1/responses", "", False),
    ("DELETE", "/v1/responses", "", False),
    ("OPTIONS", "/v1/responses", "", False),
    ("HEAD", "/v1/responses", "", False),
    ("post", "/v1/responses", "", False),
    ("POST", "/v1/responses?", "", False),
    ("POST", "/v1/responses?stream=true", "", False),
    ("POST", "/v1/responses/", "", False),
    ("POST", "/V1/responses", "", False),
    ("POST", "/v1/Responses", "", False),
    ("POST", "/v1/responses/compact", "", False),
    ("POST", "/v1/responses#frag", "", False),
    ("POST", "//v1/responses", "", False),
    ("POST", "/v1//responses", "", False),
    ("POST", "/v1/./responses", "", False),
    ("POST", "/v1/x/../responses", "", False),
    ("POST", "/v1/%72esponses", "", False),
    ("POST", "/v1/responses%3F", "", False),
    ("POST", "/v1/models", "", False),
    ("POST", "/", "", False),
    ("POST", "*", "", False),
    ("POST", "/v1/responses", "evil.example:80", False),  # absolute-form target
    ("GET", "/shutdown", "", False),
]


@pytest.mark.parametrize(("method", "target", "authority", "allowed"), SHAPES)
def test_request_shapes(method, target, authority, allowed):
    addon = Allowlist()
    with taddons.context(addon):
        f = make_flow(method, target, authority)
        addon.requestheaders(f)
        if allowed:
            assert f.response is None
            assert f.metadata[ALLOWED] is True
        else:
            assert f.response is not None and f.response.status_code == 403
            assert f.response.headers["content-type"] == "application/json"
            assert b'"forbidden"' in f.response.content
            assert ALLOWED not in f.metadata
            assert f.metadata[REFUSED] == "not-allowlisted"


def test_http2_authority_is_not_absolute_form():
    f = make_flow(authority="127.0.0.1:8080", http_version="HTTP/2.0")
    assert refusal_reason(f.request, parse_routes([])) is None


def test_connect_is_refused():
    addon = Allowlist()
    with taddons.context(addon):
        f = make_flow("CONNECT", "", "evil.example:443")
        addon.http_connect(f)
        assert f.response.status_code == 403
        assert ALLOWED not in f.metadata


def test_extra_routes_are_off_by_default_and_configurable():
    addon = Allowlist()
    with taddons.context(addon) as tctx:
        f = make_flow(path="/v1/responses/compact")
        addon.requestheaders(f)
        assert f.response.status_code == 403
        tctx.configure(addon, codex_extra_routes=["/v1/responses/compact"])
        f = make_flow(path="/v1/responses/compact")
        addon.requestheaders(f)
        assert f.response is None and f.metadata[ALLOWED]
        f = make_flow("GET", "/v1/responses/compact")
        addon.requestheaders(f)
        assert f.response.status_code == 403


@pytest.mark.parametrize(
    "route", ["v1/x", "/v1//x", "/v1/x?a=1", "/v1/x#f", "/v1/%20", "/v1/../x", "/v1/ x", "/a\x00"]
)
def test_bad_extra_routes_stop_configuration(route):
    addon = Allowlist()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(addon, codex_extra_routes=[route])


def test_already_answered_flows_are_left_alone():
    addon = Allowlist()
    with taddons.context(addon):
        f = make_flow("GET", "/x")
        f.response = tutils.tresp(status_code=200)
        addon.requestheaders(f)
        assert f.response.status_code == 200


async def test_cycle_refuses_before_upstream():
    addon = Allowlist()
    with taddons.context(addon) as tctx:
        f = make_flow("GET", "/v1/models")
        f.response = None
        await tctx.cycle(addon, f)
        assert f.response.status_code == 403
