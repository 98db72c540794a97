import itertools
import json

from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.test import tutils

from addons.sse_events import (
    SseDecoder,
    SseEvent,
    SseParser,
    completed_response,
    decode_sse,
    parse_sse_text,
    stream_completed,
    timeline,
)
from tests.fake_upstream import (
    StreamCompressor,
    compress_stream,
    encode_event,
    responses_sse_events,
)


def pairs(events: list[SseEvent]) -> list[tuple[str, str]]:
    return [(e.event, e.data) for e in events]


def test_parse_rules():
    text = 'event: a\ndata: {"x":1}\n\n: comment\ndata: line1\ndata: line2\n\nevent: empty\n\n'
    assert pairs(parse_sse_text(text)) == [("a", '{"x":1}'), ("message", "line1\nline2")]
    tail = parse_sse_text("data: tail-without-blank-line")
    assert pairs(tail) == [("message", "tail-without-blank-line")] and not tail[0].complete
    assert pairs(parse_sse_text("\ufeffdata:no-space\r\n\r\ndata: x\r\r")) == [
        ("message", "no-space"),
        ("message", "x"),
    ]


def test_crlf_and_utf8_split_across_chunks():
    parser = SseParser()
    raw = "data: é\r\n\r\n".encode()
    events = []
    for i in range(len(raw)):
        events += parser.feed(raw[i : i + 1])
    events += parser.finish()
    assert pairs(events) == [("message", "é")] and events[0].complete


def test_type_and_payload():
    ev = parse_sse_text('event: x\ndata: {"type": "response.created"}\n\n')[0]
    assert ev.type == "response.created" and ev.payload == {"type": "response.created"}
    plain = parse_sse_text("event: ping\ndata: not json\n\n")[0]
    assert plain.type == "ping" and plain.payload is None


def stream_bytes() -> bytes:
    return b"".join(encode_event(k, p) for k, p in responses_sse_events("a b", "m"))


def test_completed_response_carries_usage():
    events, error = decode_sse(stream_bytes())
    assert error is None and completed_response(events)["usage"]["total_tokens"] == 59
    assert completed_response(events[:-1]) is None


def test_compressed_and_cut_streams():
    raw = stream_bytes()
    events = [encode_event(k, p) for k, p in responses_sse_events("a b", "m")]
    for coding in ("zstd", "gzip"):
        got, error = decode_sse(compress_stream(events, coding), coding)
        assert error is None and pairs(got) == pairs(decode_sse(raw)[0])
        # Cut after the completed event but before the frame's end: all events, and the error.
        got, error = decode_sse(compress_stream(events, coding, finish=False), coding)
        assert completed_response(got) is not None and error is not None and coding in error


def test_stream_completed_on_a_flow_response():
    compressor = StreamCompressor("zstd")
    events = [encode_event(k, p) for k, p in responses_sse_events("a b", "m")]
    raw = b"".join(compressor.event(e) for e in events)  # no end(): cut as Codex often does
    headers = [(b"content-type", b"text/event-stream"), (b"content-encoding", b"zstd")]
    resp = tutils.tresp(headers=headers, content=b"")
    resp.raw_content = raw
    assert stream_completed(resp)
    resp.raw_content = b"".join(compressor.event(e) for e in events[:3])
    assert not stream_completed(resp)
    json_resp = tutils.tresp(headers=[(b"content-type", b"application/json")], content=b"{}")
    assert not stream_completed(json_resp)


def test_timeline_counts_decoded_bytes_per_chunk():
    parts = [encode_event(k, p) for k, p in responses_sse_events("a b", "m")]
    compressor = StreamCompressor("gzip")
    wire = [compressor.event(p) for p in parts]
    wire[-1] += compressor.end()
    timing, size = [], 0
    for i, chunk in enumerate(wire):
        size += len(chunk)
        timing.append([i * 10, size])
    line = timeline(b"".join(wire), "gzip", timing)
    assert line.error is None
    decoded = 0
    for (ms, total), part, i in zip(line.decoded_timing, parts, range(len(parts)), strict=True):
        decoded += len(part)
        assert (ms, total) == (i * 10, decoded)
    assert [ms for ms, _ in line.events] == [i * 10 for i in range(len(parts))]
    assert line.events[-1][1].type == "response.completed"


@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_chunking_gives_the_same_events(cuts):
    raw = stream_bytes().replace(b"\n", b"\r\n")
    wire = compress_stream([raw[i : i + 50] for i in range(0, len(raw), 50)], "zstd")
    bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    decoder = SseDecoder("zstd")
    events = []
    for a, b in itertools.pairwise(bounds):
        events += decoder.feed(wire[a:b])
    events += decoder.finish()
    assert decoder.error is None
    assert [json.loads(e.data)["sequence_number"] for e in events] == list(range(len(events)))
    assert pairs(events) == pairs(decode_sse(stream_bytes())[0])
