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
