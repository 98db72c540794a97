import json
import os

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addons.server_info import ServerInfo, server_info_line, write_atomically


def test_line_format_matches_reference():
    assert server_info_line(8080, 123) == '{"port":8080,"pid":123}\n'


def test_write_atomically_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "info.json"
    write_atomically(str(path), "abc\n")
    write_atomically(str(path), '{"port":1,"pid":2}\n')
    assert path.read_text() == '{"port":1,"pid":2}\n'
    assert os.listdir(tmp_path) == ["info.json"]


def test_unwritable_directory_stops_configuration(tmp_path):
    addon = ServerInfo()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="codex_server_info"):
            tctx.configure(addon, codex_server_info=str(tmp_path / "missing" / "info.json"))


def test_running_writes_real_port_and_pid(tmp_path):
    class FakeProxyserver:
        def listen_addrs(self):
            return [("127.0.0.1", 43210)]

    addon = ServerInfo()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_server_info=str(tmp_path / "info.json"))
        tctx.master.addons.lookup["proxyserver"] = FakeProxyserver()
        addon.running()
    assert json.loads((tmp_path / "info.json").read_text()) == {"port": 43210, "pid": os.getpid()}
