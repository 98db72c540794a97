"""Secrets in memory (``addons/secret_memory.py``): zeroing, mlock, the one REDACTED marker,
the bounded line reader."""

import io

import pytest

from addons import keyholder, redaction, secret_memory, workload_identity
from addons.gateway_mode import keypool
from addons.secret_memory import REDACTED, SecretTooLarge, mlock, read_secret_line, zero


def test_zero_overwrites_in_place():
    buf = bytearray(b"sk-secret")
    view = buf
    zero(buf)
    assert view is buf and buf == bytearray(len(b"sk-secret"))


def test_mlock_is_best_effort():
    assert mlock(bytearray()) is False
    assert isinstance(mlock(bytearray(b"x" * 64)), bool)


def test_one_marker_for_every_holder():
    assert REDACTED == "[REDACTED]"
    # The holders and the header redaction use this very object, not a copy of the text.
    for module in (keyholder, keypool, workload_identity, redaction):
        assert module.REDACTED is secret_memory.REDACTED
    holder = keyholder.ApiKey()
    holder.set_key(bytearray(b"sk-abc"))
    assert REDACTED in repr(holder) and "sk-abc" not in repr(holder)
    holder.clear()


@pytest.mark.parametrize(
    "stdin, line, rest",
    [
        (b"abc\nnext", b"abc", b"next"),  # stops after the first newline, reads no further
        (b"abc\r\n", b"abc", b""),
        (b"abc\r\r\n", b"abc", b""),
        (b"abc", b"abc", b""),  # end of input without a newline
        (b"abcdefg\n", b"abcdefg", b""),  # 8 bytes: the bound, ending in the newline
        (b"\n", b"", b""),
        (b"", b"", b""),
    ],
)
def test_read_secret_line(stdin, line, rest):
    stream = io.BytesIO(stdin)
    got = read_secret_line(stream, 8)
    assert isinstance(got, bytearray) and got == line
    assert stream.read() == rest


@pytest.mark.parametrize("stdin", [b"abcdefgh", b"abcdefgh\n", b"abcdefg\r\n"])
def test_read_secret_line_too_large_names_no_byte(stdin):
    with pytest.raises(SecretTooLarge) as e:
        read_secret_line(io.BytesIO(stdin), 8)
    assert "abc" not in str(e.value)
