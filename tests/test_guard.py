import pytest
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.addons.tlsconfig import TlsConfig
from mitmproxy.test import taddons

from addons.guard import OptionGuard, is_loopback


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("", False),
        ("0.0.0.0", False),
        ("192.0.2.1", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host, ok):
    assert is_loopback(host) is ok


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        ("proxy_debug", "raw request bytes"),
        ("emudhra", "compromised CA key"),
        ("emudhra_old", "compromised CA key"),
    ],
)
def test_leaky_and_dangerous_options_are_refused(option, reason):
    addon = OptionGuard()
    with taddons.context(Proxyserver(), TlsConfig(), addon) as tctx:
        tctx.configure(addon, listen_host="127.0.0.1")
        with pytest.raises(exceptions.OptionsError, match=f"{option} is refused: .*{reason}"):
            tctx.configure(addon, **{option: True})
        tctx.configure(addon, **{option: False})


def test_non_loopback_needs_explicit_flag(caplog):
    addon = OptionGuard()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, listen_host="127.0.0.1")
        with pytest.raises(exceptions.OptionsError, match="not loopback"):
            tctx.configure(addon, listen_host="0.0.0.0")
        tctx.configure(addon, listen_host="0.0.0.0", codex_allow_remote=True)
        assert "non-loopback" in caplog.text
