import base64
import concurrent.futures
import gzip
import json
import os
import stat

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils

from addons.common import ALLOWED, DUMP_SEQ
from addons.dumps import (
    DumpSink,
    DumpThread,
    DumpWriter,
    prepare_dump_dir,
    render_body_fields,
    render_document,
)
from tests.fake_upstream import compress_stream


@pytest.mark.parametrize(
    ("raw", "enc", "expected"),
    [
        (b'{"a": 1}', None, {"a": 1}),
        (b"[1,2]", None, [1, 2]),
        (b"data: {}\n\n", None, "data: {}\n\n"),
        (b"", None, ""),
        (b"\xff\xfeabc", None, "\ufffd\ufffdabc"),
        (gzip.compress(b'{"z": true}'), "gzip", {"z": True}),
        (zstandard.ZstdCompressor().compress(b'{"model":"m"}'), "zstd", {"model": "m"}),
        (b"not really gzip", "gzip", "not really gzip"),
    ],
)
def test_render_body(raw, enc, expected):
    assert render_body_fields(raw, enc)["body"] == expected


def test_encoded_bodies_are_marked_and_undecodable_ones_keep_their_bytes():
    fields = render_body_fields(gzip.compress(b'{"z": 1}'), "gzip")
    assert fields == {"body": {"z": 1}, "body_decoded_from": "gzip"}
    assert render_body_fields(b'{"z": 1}', None) == {"body": {"z": 1}}
    # A zstd stream cut before its frame ends (mitmproxy 12.3's decode raises on it): what
    # arrived is shown, the cut is said, the raw bytes are kept.
    events = [b"event: a\ndata: 1\n\n", b"event: b\ndata: 2\n\n"]
    cut = compress_stream(events, "zstd", finish=False)
    fields = render_body_fields(cut, "zstd")
    assert fields["body"] == "event: a\ndata: 1\n\nevent: b\ndata: 2\n\n"
    assert fields["body_decoded_from"] == "zstd"
    assert fields["body_decode_error"] == "zstd: the stream ends before its frame does (truncated)"
    assert base64.b64decode(fields["body_raw_base64"]) == cut
    bad = render_body_fields(b"not really gzip", "gzip")
    assert bad["body"] == "not really gzip" and bad["body_decode_error"].startswith("gzip:")


def test_render_document_format():
    text = render_document({"status": 200, "body": "é"}).decode()
    assert text == '{\n  "status": 200,\n  "body": "é"\n}\n'


def test_prepare_dump_dir_creates_private_dir(tmp_path):
    path = prepare_dump_dir(str(tmp_path / "a" / "dumps"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


def test_prepare_dump_dir_refuses_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"(?i)not a directory"):
        prepare_dump_dir(str(f / "sub"))
    with pytest.raises(ValueError):
        prepare_dump_dir(str(f))


def test_unusable_dump_dir_stops_configuration(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    addon = DumpWriter()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="codex_dump_dir"):
            tctx.configure(addon, codex_dump_dir=str(f))


def accepted_flow():
    f = tflow.tflow()
    f.request.method = "POST"
    f.request.path = "/v1/responses"
    f.request.headers.clear()
    f.request.headers["Host"] = "127.0.0.1:1"
    f.request.headers["Authorization"] = "Bearer client"
    f.request.headers["content-type"] = "application/json"
    f.request.raw_content = b'{"model": "m"}'
    f.metadata[ALLOWED] = True
    return f


def files(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


async def test_pair_written_with_reference_names_and_shapes(tmp_path):
    addon = DumpWriter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_dump_dir=str(tmp_path))
        f = accepted_flow()
        addon.requestheaders(f)
        f.request.headers["Authorization"] = "Bearer injected"  # forwarder's change, later
        await addon.request(f)
        f.response = tutils.tresp(
            status_code=201,
            headers=[(b"content-type", b"application/json"), (b"Set-Cookie", b"s=1")],
            content=b'{"ok": 1}',
        )
        await addon.response(f)
        addon.flush()
        names = files(tmp_path)
        assert len(names) == 2
        req, resp = (tmp_path / n for n in names)
        assert req.name.startswith("000001-") and req.name.endswith("-request.json")
        assert resp.name == req.name.replace("-request.json", "-response.json")
        assert f.metadata[DUMP_SEQ] == 1
        rdoc = json.loads(req.read_text())
        assert list(rdoc) == ["method", "url", "headers", "body"]
        assert rdoc["method"] == "POST" and rdoc["url"] == "/v1/responses"
        assert {"name": "Authorization", "value": "[REDACTED]"} in rdoc["headers"]
        assert rdoc["body"] == {"model": "m"}
        sdoc = json.loads(resp.read_text())
        assert list(sdoc) == ["status", "headers", "body"]
        assert sdoc["status"] == 201 and sdoc["body"] == {"ok": 1}
        assert {"name": "Set-Cookie", "value": "[REDACTED]"} in sdoc["headers"]
        for p in (req, resp):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600
            assert "injected" not in p.read_text() and "client" not in p.read_text()


async def test_refused_flows_are_not_dumped_and_use_no_sequence_number(tmp_path):
    addon = DumpWriter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_dump_dir=str(tmp_path))
        refused = accepted_flow()
        del refused.metadata[ALLOWED]
        addon.requestheaders(refused)
        await addon.request(refused)
        refused.response = tutils.tresp(status_code=403)
        await addon.response(refused)
        ok = accepted_flow()
        addon.requestheaders(ok)
        await addon.request(ok)
        ok.response = tutils.tresp()
        await addon.response(ok)
        addon.flush()
        assert [n[:6] for n in files(tmp_path)] == ["000001", "000001"]


async def test_error_writes_response_file_with_error_and_partial_body(tmp_path):
    addon = DumpWriter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_dump_dir=str(tmp_path))
        f = accepted_flow()
        addon.requestheaders(f)
        await addon.request(f)
        f.response = tutils.tresp(
            headers=[(b"content-type", b"text/event-stream")], content=b'data: {"a":1}\n\n'
        )
        f.error = tflow.terr("client disconnected")
        addon.error(f)
        addon.flush()
        resp = next(p for p in tmp_path.iterdir() if p.name.endswith("-response.json"))
        doc = json.loads(resp.read_text())
        assert doc["error"] == "client disconnected"
        assert doc["body"] == 'data: {"a":1}\n\n'


def test_upstream_down_writes_502_and_request(tmp_path):
    addon = DumpWriter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_dump_dir=str(tmp_path))
        f = accepted_flow()
        addon.requestheaders(f)
        f.error = tflow.terr("Connection refused")
        addon.error(f)  # before the request hook ever ran
        addon.flush()
        assert len(files(tmp_path)) == 2
        resp = next(p for p in tmp_path.iterdir() if p.name.endswith("-response.json"))
        assert json.loads(resp.read_text()) == {
            "status": 502,
            "headers": [],
            "body": "",
            "error": "Connection refused",
        }


def test_open_exchanges_are_closed_at_shutdown(tmp_path):
    addon = DumpWriter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_dump_dir=str(tmp_path))
        f = accepted_flow()
        addon.requestheaders(f)
        addon.done()
        assert len(files(tmp_path)) == 2


def _disk_full(*_args):
    raise OSError(28, "No space left on device")


async def test_write_failure_is_counted_not_raised(tmp_path, caplog, monkeypatch):
    addon = DumpWriter(workers="thread")
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_dump_dir=str(tmp_path))
        monkeypatch.setattr("addons.dumps.write_file_atomically", _disk_full)
        f = accepted_flow()
        addon.requestheaders(f)
        await addon.request(f)
        addon.flush()
        assert addon.lost == 1 and addon.written == 0
        assert "No space left" in caplog.text


async def test_no_partial_files_visible(tmp_path):
    addon = DumpWriter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_dump_dir=str(tmp_path))
        for _ in range(20):
            f = accepted_flow()
            f.request.raw_content = b"x" * 100_000
            addon.requestheaders(f)
            await addon.request(f)
            for p in tmp_path.iterdir():
                if not p.name.startswith("."):
                    json.loads(p.read_text())  # every visible file is complete
        addon.flush()
        assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 20


async def test_dump_required_refuses_the_request_when_its_dump_fails(tmp_path, monkeypatch):
    addon = DumpWriter(workers="thread")
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_dump_dir=str(tmp_path), codex_dump_required=True)
        monkeypatch.setattr("addons.dumps.write_file_atomically", _disk_full)
        f = accepted_flow()
        addon.requestheaders(f)
        await addon.request(f)
        assert f.response.status_code == 503
        assert ALLOWED not in f.metadata


async def test_dump_required_kills_the_reply_when_its_dump_fails(tmp_path, monkeypatch):
    addon = DumpWriter(workers="thread")
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_dump_dir=str(tmp_path), codex_dump_required=True)
        f = accepted_flow()
        addon.requestheaders(f)
        await addon.request(f)
        assert f.response is None
        monkeypatch.setattr("addons.dumps.write_file_atomically", _disk_full)
        f.response = tutils.tresp()
        await addon.response(f)
        assert f.error is not None and not f.live


async def test_without_dump_required_a_failed_dump_does_not_stop_the_flow(tmp_path, monkeypatch):
    addon = DumpWriter(workers="thread")
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_dump_dir=str(tmp_path))
        monkeypatch.setattr("addons.dumps.write_file_atomically", _disk_full)
        f = accepted_flow()
        addon.requestheaders(f)
        await addon.request(f)
        f.response = tutils.tresp()
        await addon.response(f)
        addon.flush()
        assert f.response.status_code == 200 and f.error is None and addon.lost == 2


def test_dump_thread_writes_in_order_and_reports_each_outcome(tmp_path, monkeypatch):
    outcomes = []
    thread = DumpThread(lambda name, error: outcomes.append((name, error)))
    doc = {"method": "POST", "url": "/v1/responses", "headers": [], "body": (b"{}", None)}
    for i in range(50):
        thread.put(str(tmp_path), f"{i:06d}-request.json", doc)
    assert thread.drain(10)
    assert [name for name, _ in outcomes] == [f"{i:06d}-request.json" for i in range(50)]
    assert all(error is None for _, error in outcomes)
    assert json.loads((tmp_path / "000049-request.json").read_text())["body"] == {}

    # A failure reaches the waiting caller's future, and the thread keeps going.
    monkeypatch.setattr("addons.dumps.write_file_atomically", _disk_full)
    failed: concurrent.futures.Future = concurrent.futures.Future()
    thread.put(str(tmp_path), "x-request.json", doc, failed)
    assert "No space left" in failed.result(10)
    monkeypatch.undo()
    ok: concurrent.futures.Future = concurrent.futures.Future()
    thread.put(str(tmp_path), "y-request.json", doc, ok)
    assert ok.result(10) is None
    thread.stop(10)
    assert not thread._thread.is_alive()


def test_unknown_worker_kind_is_refused():
    with pytest.raises(ValueError, match="workers"):
        DumpWriter(workers="process")


async def test_large_bodies_are_rendered_in_a_worker_process(tmp_path):
    import concurrent.futures

    addon = DumpWriter()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_dump_dir=str(tmp_path))
        f = accepted_flow()
        f.request.raw_content = json.dumps({"model": "m", "input": "z" * 400_000}).encode()
        addon.requestheaders(f)
        await addon.request(f)
        assert isinstance(addon.sink._large_executor, concurrent.futures.ProcessPoolExecutor)
        addon.done()
    (req,) = [p for p in tmp_path.iterdir() if p.name.endswith("-request.json")]
    assert json.loads(req.read_text())["body"]["input"] == "z" * 400_000
    assert addon.written == 2 and addon.lost == 0


def json_values(floats: bool):
    scalars = st.none() | st.booleans() | st.integers() | st.text()
    if floats:
        scalars = scalars | st.floats(allow_nan=False, allow_infinity=False)
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=20,
    )


JSON_VALUES = json_values(floats=True)


@settings(max_examples=300, deadline=None)
@given(json_values(floats=False))
def test_render_document_is_byte_identical_to_the_json_module(value):
    doc = {"status": 200, "headers": [], "body": value}
    expected = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    assert render_document(doc) == expected


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_render_document_keeps_every_value(value):
    # Floats may be spelt differently (orjson writes 1e-05 as 0.00001): same value.
    doc = {"status": 200, "headers": [], "body": value}
    assert json.loads(render_document(doc)) == doc


def test_non_finite_numbers_and_huge_integers_survive_a_dump():
    fields = render_body_fields(
        b'{"a": NaN, "b": Infinity, "c": -Infinity, "d": 1180591620717411303424}', None
    )
    assert render_document(fields) == (
        b'{\n  "body": {\n    "a": NaN,\n    "b": Infinity,\n    "c": -Infinity,\n'
        b'    "d": 1180591620717411303424\n  }\n}\n'
    )


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_render_body_parses_like_the_json_module(value):
    raw = json.dumps(value, ensure_ascii=False).encode("utf-8")
    rendered = render_body_fields(raw, None)["body"]
    assert json.dumps(rendered) == json.dumps(json.loads(raw.decode()))


async def test_idle_large_body_worker_exits(tmp_path, monkeypatch):
    addon = DumpWriter()
    monkeypatch.setattr(DumpSink, "LARGE_WORKER_IDLE_S", 0.0)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_dump_dir=str(tmp_path))
        big = accepted_flow()
        big.request.raw_content = json.dumps({"input": "z" * 400_000}).encode()
        addon.requestheaders(big)
        await addon.request(big)
        addon.flush()
        assert addon.sink._large_executor is not None
        small = accepted_flow()
        addon.requestheaders(small)
        await addon.request(small)  # a small document: the idle worker is retired
        assert addon.sink._large_executor is None
        addon.done()
    assert addon.written == 4 and addon.lost == 0  # two pairs, closed at shutdown


# -- hostile bodies: decompression bombs and deep JSON ----------------------------------------


@pytest.mark.parametrize("workers", ["auto", "thread"])
async def test_a_bomb_is_dumped_as_received_with_a_note(tmp_path, workers):
    bomb = gzip.compress(bytes(256 * 1024 * 1024), compresslevel=9)  # ~255 KB -> 256 MiB
    addon = DumpWriter(workers)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_dump_dir=str(tmp_path))
        f = accepted_flow()
        f.request.headers["content-encoding"] = "gzip"
        # One gzip member stays under LARGE_BODY (the thread); two go to the worker process.
        f.request.raw_content = bomb if workers == "thread" else bomb * 2
        raw = f.request.raw_content
        addon.requestheaders(f)
        await addon.request(f)
        f.response = tutils.tresp(content=b'{"ok": 1}')
        await addon.response(f)
        addon.done()
    (req,) = [p for p in tmp_path.iterdir() if p.name.endswith("-request.json")]
    assert len([p for p in tmp_path.iterdir() if p.name.endswith("-response.json")]) == 1
    doc = json.loads(req.read_text())
    assert doc["body"] is None and doc["body_content_encoding"] == "gzip"
    assert doc["body_decode_error"].startswith("decoding stopped at the limit of")
    assert base64.b64decode(doc["body_raw_base64"]) == raw
    # The stated bound (docs/security.md): a body's dump is at most 6 x the decode limit + 4/3 x
    # the wire bytes + 4 KiB; past the limit, only the base64 of what was received.
    assert req.stat().st_size <= len(raw) * 4 // 3 + 4096
    assert addon.lost == 0


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b"[" * 1000 + b"]" * 1000],
    ids=["unclosed", "deep", "deep-for-the-renderer"],
)
async def test_deep_json_is_dumped_as_text(tmp_path, body):
    addon = DumpWriter("thread")
    with taddons.context(addon) as tctx:
        tctx.configure(addon, codex_dump_dir=str(tmp_path))
        f = accepted_flow()
        f.request.raw_content = body
        addon.requestheaders(f)
        await addon.request(f)
        f.response = tutils.tresp(content=body)
        await addon.response(f)
        addon.done()
    docs = [json.loads(p.read_text()) for p in sorted(tmp_path.iterdir())]
    assert len(docs) == 2 and addon.lost == 0
    for doc in docs:
        assert doc["body"] == body.decode()
