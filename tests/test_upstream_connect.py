import socket

from mitmproxy import connection
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow

from addons.upstream_connect import UpstreamConnect
from addons.web import free_port


def hook_data(port: int) -> server_hooks.ServerConnectionHookData:
    server = connection.Server(address=("127.0.0.1", port))
    return server_hooks.ServerConnectionHookData(server=server, client=tflow.tclient_conn())


def listening_socket(backlog: int) -> socket.socket:
    """A socket listening on an ephemeral 127.0.0.1 port (the caller closes it)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(backlog)
    return listener


def drain_accepted(listener: socket.socket) -> int:
    """Accept and close every connection waiting on ``listener``; how many there were."""
    listener.setblocking(False)
    accepted = 0
    try:
        while True:
            conn, _ = listener.accept()
            conn.close()
            accepted += 1
    except BlockingIOError:
        pass
    return accepted


async def test_refused_upstream_names_the_cause():
    port = free_port()  # nothing listens there
    addon = UpstreamConnect()
    with taddons.context(addon):
        data = hook_data(port)
        await addon.server_connect(data)
        assert (
            data.server.error == f"cannot connect to upstream 127.0.0.1:{port}: Connection refused"
        )


async def test_reachable_upstream_is_probed_once_per_burst():
    listener = listening_socket(16)
    port = listener.getsockname()[1]
    addon = UpstreamConnect()
    try:
        with taddons.context(addon):
            for _ in range(3):
                data = hook_data(port)
                await addon.server_connect(data)
                assert data.server.error is None
            accepted = drain_accepted(listener)
            assert accepted == 1
    finally:
        listener.close()


async def test_zero_disables_the_probe():
    addon = UpstreamConnect()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_connect_timeout_ms=0)
        data = hook_data(1)
        await addon.server_connect(data)
        assert data.server.error is None


async def test_simultaneous_connects_share_one_probe():
    import asyncio

    listener = listening_socket(256)
    port = listener.getsockname()[1]
    addon = UpstreamConnect()
    try:
        with taddons.context(addon):
            burst = [hook_data(port) for _ in range(50)]
            await asyncio.gather(*(addon.server_connect(d) for d in burst))
            assert all(d.server.error is None for d in burst)
            accepted = drain_accepted(listener)
            assert accepted == 1  # before: one probe per connect of the burst
    finally:
        listener.close()


async def test_simultaneous_connects_to_a_dead_upstream_all_get_the_cause():
    import asyncio

    port = free_port()  # nothing listens there
    addon = UpstreamConnect()
    with taddons.context(addon):
        burst = [hook_data(port) for _ in range(5)]
        await asyncio.gather(*(addon.server_connect(d) for d in burst))
        assert all("Connection refused" in (d.server.error or "") for d in burst)
