"""The tests' name for the local Responses stand-in, which is product code now
(``addons/standin.py``: ``./run.sh demo`` runs it too). Kept so tests import it as before:
``from tests.fake_upstream import FakeUpstream``."""

from addons.standin import (
    CREATED_AT,
    DEFAULT_TEXT,
    RecordedRequest,
    StreamCompressor,
    compress_stream,
    encode_event,
    main,
    response_object,
    responses_sse_events,
    usage_block,
)
from addons.standin import ResponsesStandIn as FakeUpstream

__all__ = [
    "CREATED_AT",
    "DEFAULT_TEXT",
    "FakeUpstream",
    "RecordedRequest",
    "StreamCompressor",
    "compress_stream",
    "encode_event",
    "main",
    "response_object",
    "responses_sse_events",
    "usage_block",
]

if __name__ == "__main__":
    main()
