import io

import pytest

from addons import keyholder
from addons.keyholder import (
    MSG_CHARSET,
    MSG_EMPTY,
    MSG_TOO_LARGE,
    ApiKey,
    ApiKeyError,
    read_api_key,
)


@pytest.mark.parametrize(
    ("stdin", "key"),
    [
        (b"sk-abc_DEF-123\n", b"sk-abc_DEF-123"),
        (b"sk-abc\r\n", b"sk-abc"),
        (b"sk-abc", b"sk-abc"),
        (b"sk-abc\r", b"sk-abc"),
        (b"sk-abc\nsecond line ignored", b"sk-abc"),
        (b"a" * 1016 + b"\n", b"a" * 1016),
        (b"a" * 1015 + b"\r\n", b"a" * 1015),
        (b"a" * 1016, b"a" * 1016),
    ],
)
def test_valid_keys(stdin, key):
    assert read_api_key(io.BytesIO(stdin)) == bytearray(key)


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"", MSG_EMPTY),
        (b"\n", MSG_EMPTY),
        (b"\r\n", MSG_EMPTY),
        (b"bad key\n", MSG_CHARSET),
        (b"sk-\xc3\xa9\n", MSG_CHARSET),
        (b"sk-abc!\n", MSG_CHARSET),
        (b"sk abc", MSG_CHARSET),
        (b"\tsk\n", MSG_CHARSET),
        (b"a" * 1017, MSG_TOO_LARGE),
        (b"a" * 1017 + b"\n", MSG_TOO_LARGE),
        (b"a" * 1016 + b"\r\n", MSG_TOO_LARGE),
        (b"a" * 5000 + b"\n", MSG_TOO_LARGE),
    ],
)
def test_key_errors_use_the_reference_messages(stdin, message):
    with pytest.raises(ApiKeyError) as info:
        read_api_key(io.BytesIO(stdin))
    assert str(info.value) == message


def test_error_message_never_contains_the_input():
    with pytest.raises(ApiKeyError) as info:
        read_api_key(io.BytesIO(b"sk-secret!value\n"))
    assert "secret" not in str(info.value) and "secret" not in repr(info.value)


def test_reference_messages_verbatim():
    assert MSG_EMPTY == (
        "API key must be provided via stdin (e.g. printenv OPENAI_API_KEY | env -u "
        "OPENAI_API_KEY codex-responses-api-proxy)"
    )
    assert MSG_CHARSET == "API key may only contain ASCII letters, numbers, '-' or '_'"
    assert MSG_TOO_LARGE == "API key is too large to fit in the 1024-byte buffer"


def test_holder_redacts_and_zeroes_the_source():
    holder = ApiKey()
    assert not holder.is_set
    with pytest.raises(LookupError):
        holder.header_value()
    source = bytearray(b"sk-holdertest")
    holder.set_key(source)
    assert source == bytearray(len(b"sk-holdertest"))  # zeroed
    assert holder.header_value() == "Bearer sk-holdertest"
    assert "holdertest" not in repr(holder) and "holdertest" not in str(holder)
    assert "holdertest" not in f"{holder!r} {holder}"
    assert holder.matches("Bearer sk-holdertest")
    assert not holder.matches("Bearer sk-other")
    holder.clear()
    assert not holder.is_set and not holder.matches("Bearer sk-holdertest")


def test_load_from_path(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b"sk-fromfile\n")
    try:
        keyholder.load_from_path(str(path))
        assert keyholder.API_KEY.header_value() == "Bearer sk-fromfile"
    finally:
        keyholder.API_KEY.clear()
