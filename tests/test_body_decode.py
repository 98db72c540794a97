import gzip
import itertools
import zlib

import brotli
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from addons.body_decode import BodyDecoder, decode_body, parse_codings
from tests.fake_upstream import compress_stream

TEXT = b'event: response.output_text.delta\ndata: {"delta": "hi"}\n\n' * 40


def zstd_flushed(parts: list[bytes], finish: bool = True) -> bytes:
    return compress_stream(parts, "zstd", finish)


def gzip_flushed(parts: list[bytes], finish: bool = True) -> bytes:
    return compress_stream(parts, "gzip", finish)


ENCODERS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
}


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_each_coding_decodes_whole(coding):
    decoded = decode_body(ENCODERS[coding](TEXT), coding.upper())
    assert decoded.data == TEXT and decoded.error is None and decoded.codings == (coding,)


def test_plain_and_identity_bodies_pass_through():
    assert decode_body(TEXT, None).data == TEXT
    assert decode_body(TEXT, "identity") == decode_body(TEXT, None)
    assert decode_body(b"", "zstd").error is None


def test_raw_deflate_without_zlib_header():
    obj = zlib.compressobj(wbits=-15)
    raw = obj.compress(TEXT) + obj.flush()
    assert decode_body(raw, "deflate").data == TEXT


def test_chained_codings_are_undone_in_reverse():
    raw = brotli.compress(gzip.compress(TEXT))
    assert parse_codings("gzip, br") == ["gzip", "br"]
    assert decode_body(raw, "gzip, br").data == TEXT


def test_several_gzip_members_and_zstd_frames():
    assert decode_body(gzip.compress(b"a") + gzip.compress(b"b"), "gzip").data == b"ab"
    z = zstandard.ZstdCompressor()
    assert decode_body(z.compress(b"a") + z.compress(b"b"), "zstd").data == b"ab"


@pytest.mark.parametrize(("coding", "encode"), [("zstd", zstd_flushed), ("gzip", gzip_flushed)])
def test_truncated_stream_keeps_what_arrived_and_says_so(coding, encode):
    parts = [b"event: a\ndata: 1\n\n", b"event: b\ndata: 2\n\n"]
    cut = encode(parts, finish=False)
    decoded = decode_body(cut, coding)
    assert decoded.data == b"".join(parts)
    assert decoded.error == f"{coding}: the stream ends before its frame does (truncated)"
    assert decode_body(encode(parts), coding).error is None


def test_invalid_data_and_unknown_coding_are_errors_not_exceptions():
    bad = decode_body(b"not really gzip", "gzip")
    assert bad.data == b"" and bad.error is not None and bad.error.startswith("gzip: invalid")
    unknown = decode_body(b"abc", "compress")
    assert unknown.error == "unsupported content-encoding 'compress'" and unknown.data == b""


def test_output_before_invalid_data_is_kept():
    decoder = BodyDecoder("zstd")
    good = decoder.feed(zstd_flushed([b"first"], finish=False))
    assert good == b"first"
    assert decoder.feed(b"\x00garbage-that-is-no-zstd-block" * 4) == b""
    assert decoder.error is not None and decoder.error.startswith("zstd: invalid")
    assert decoder.feed(b"more") == b""


@given(
    parts=st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=10),
    coding=st.sampled_from(["zstd", "gzip"]),
)
def test_any_chunking_decodes_to_the_same_bytes(parts, cuts, coding):
    raw = (zstd_flushed if coding == "zstd" else gzip_flushed)(parts)
    bounds = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    decoder = BodyDecoder(coding)
    out = b"".join(decoder.feed(raw[a:b]) for a, b in itertools.pairwise(bounds))
    out += decoder.finish()
    assert out == b"".join(parts) and decoder.error is None


# -- limits: decompression bombs --------------------------------------------------------------

ZEROS = 64 * 1024 * 1024


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_a_bomb_stops_at_the_limit_without_expanding(coding):
    from addons.body_decode import DecodeLimits

    raw = ENCODERS[coding](bytes(ZEROS))
    limits = DecodeLimits(max_bytes=8 * 1024 * 1024, max_ratio=100, floor=1024 * 1024)
    decoded = decode_body(raw, coding, limits)
    assert decoded.over_limit and decoded.data == b""
    assert decoded.error is not None and decoded.error.startswith("decoding stopped at the limit")
    # Incrementally: never more than the limit handed out, whatever the chunking.
    decoder = BodyDecoder(coding, limits)
    out = sum(len(decoder.feed(raw[i : i + 4096])) for i in range(0, len(raw), 4096))
    assert out <= limits.for_wire(len(raw)) and decoder.over_limit


def test_the_ratio_limit_names_itself_and_small_bodies_pass():
    from addons.body_decode import DecodeLimits

    limits = DecodeLimits(max_bytes=32 * 1024 * 1024, max_ratio=10, floor=1024 * 1024)
    raw = gzip.compress(bytes(4 * 1024 * 1024))  # ~4 KB -> 4 MiB: past max(1 MiB, 10 x 4 KB)
    decoded = decode_body(raw, "gzip", limits)
    assert decoded.over_limit and "codex_decode_max_ratio" in (decoded.error or "")
    fine = gzip.compress(bytes(1024 * 1024))  # exactly the floor: decodes
    assert decode_body(fine, "gzip", limits).data == bytes(1024 * 1024)
    assert limits.for_wire(10) == 1024 * 1024 and limits.for_wire(10**9) == 32 * 1024 * 1024


def test_chained_bomb_stops_too():
    from addons.body_decode import DecodeLimits

    raw = brotli.compress(gzip.compress(bytes(ZEROS)))
    decoded = decode_body(raw, "gzip, br", DecodeLimits(max_bytes=1024 * 1024))
    assert decoded.over_limit and decoded.data == b""


@pytest.mark.parametrize(("mib", "ratio"), [(0, 100), (5000, 100), (32, 0), (32, 10**6)])
def test_limit_options_are_range_checked(mib, ratio):
    from addons.body_decode import parse_limits

    with pytest.raises(ValueError):
        parse_limits(mib, ratio)


def test_json_depth_limit_is_an_error_not_a_recursion():
    from addons.body_decode import JsonTooDeep, loads_json

    for deep in (b"[" * 100_000, b'{"a":' * 100_000, "[" * 1025 + "]" * 1025):
        with pytest.raises(JsonTooDeep, match="1024 levels"):
            loads_json(deep)
        if len(deep) > 10_000:  # exact: the json module's own limit, far past 1024
            with pytest.raises(JsonTooDeep, match="recursion limit"):
                loads_json(deep, exact=True)
    with pytest.raises(JsonTooDeep):  # orjson refuses NaN first, json goes too deep
        loads_json(b"[NaN, " + b"[" * 100_000, exact=True, parse_constant=float)
    assert loads_json(b"[" * 500 + b"]" * 500) is not None
    assert loads_json(b"[123456789012345678901234567890]", exact=True) == [
        123456789012345678901234567890
    ]
    with pytest.raises(ValueError):
        loads_json(b"not json")


def test_a_bomb_is_fenced_so_mitmproxy_keeps_it_as_received():
    from mitmproxy.test import tutils

    from addons.body_decode import DecodeLimits, fence, needs_fence

    bomb = gzip.compress(bytes(MIB), 9) * 64  # 64 MiB in ~67 KB
    request = tutils.treq(content=b"")
    request.headers["content-encoding"] = "gzip"
    request.raw_content = bomb
    limits = DecodeLimits(max_bytes=8 * MIB)
    assert needs_fence(request, limits)
    fence(request)
    assert request.headers["content-encoding"].startswith("x-codex-undecoded (gzip;")
    # mitmproxy's own readers (HAR export, mitmweb) now keep the bytes as received.
    assert request.get_content(strict=False) == bomb
    assert not needs_fence(request, limits)  # once
    small = tutils.treq(content=b"")
    small.headers["content-encoding"] = "gzip"
    small.raw_content = gzip.compress(b'{"model": "m"}')
    assert not needs_fence(small, limits)


MIB = 1024 * 1024
