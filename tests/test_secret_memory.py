"""Secrets in memory (``addons/secret_memory.py``): zeroing, mlock, the one REDACTED marker."""

from addons import keyholder, redaction, secret_memory, workload_identity
from addons.gateway_mode import keypool
from addons.secret_memory import REDACTED, mlock, zero


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
