"""Member keys and member names: how keys look, how they are stored, what names may be.

A member key is ``sk-codex-gw-`` followed by 43 URL-safe base64 characters (32 random bytes
from :mod:`secrets`). The database keeps only its SHA-256 (hex): a key has 256 bits of
entropy, so a fast hash cannot be reversed by guessing, and a stolen database holds no usable
key. A presented key is hashed once and looked up by that hash; the match is then confirmed
with :func:`hmac.compare_digest` (constant time). Timing of the lookup itself depends only on
the hash of what the client sent, which tells it nothing about stored keys.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_PREFIX = "sk-codex-gw-"
_KEY_BODY_CHARS = 43
KEY_PATTERN = re.compile(r"sk-codex-gw-[A-Za-z0-9_-]{43}")
#: Member names: what a person or CI job is called; safe in logs, metrics labels and shells.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def new_member_key() -> str:
    """A fresh member key (58 characters)."""
    body = secrets.token_urlsafe(32)
    assert len(body) == _KEY_BODY_CHARS
    return KEY_PREFIX + body


def new_key_id() -> str:
    """A public key id for ``list-keys`` / ``revoke-key``: ``mk_`` and 12 hex digits."""
    return "mk_" + secrets.token_hex(6)


def key_hash(key: str) -> str:
    """SHA-256 of the key's ASCII text, 64 lowercase hex digits."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def same_hash(a: str, b: str) -> bool:
    """Constant-time comparison of two hex digests."""
    return hmac.compare_digest(a.encode("ascii"), b.encode("ascii"))


def bearer_member_key(value: str | None) -> str | None:
    """The member key in an ``Authorization`` value (``Bearer sk-codex-gw-...``), or ``None``
    when the value is missing or not of that exact shape (no other scheme, no padding, no
    second token). Never raises; never echoes the value."""
    if not value or len(value) > 200:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or KEY_PATTERN.fullmatch(token) is None:
        return None
    return token


def check_name(name: str) -> str:
    """Validate a member name (1-64 of ``A-Z a-z 0-9 . _ @ -``, starting alphanumeric).

    Raises:
        ValueError: naming the rule (not echoing more than 64 characters of the input).
    """
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        shown = name[:64] if isinstance(name, str) else type(name).__name__
        raise ValueError(
            f"invalid member name {shown!r}: 1-64 characters of A-Z a-z 0-9 . _ @ -, "
            "starting with a letter or digit"
        )
    return name
