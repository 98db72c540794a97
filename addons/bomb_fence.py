"""Keeps mitmproxy's own body readers (the HAR export, mitmweb's views) from expanding a
decompression bomb that went through."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any

from mitmproxy import ctx, http

from addons.body_decode import fence, needs_fence, parse_codings

logger = logging.getLogger(__name__)


class BombFence:
    """Fences every body that decodes past the decode limits, once its flow has ended.

    mitmproxy decodes a body whole, without limit, when its HAR export (``hardump``, set by
    ``--record``) writes a flow or when mitmweb shows one. In ``response`` / ``error`` (the
    message has crossed the wire, and mitmproxy's ``save`` and ``savehar``, default addons, have
    already taken the flow) a body past :class:`addons.body_decode.DecodeLimits` gets a
    ``Content-Encoding`` mitmproxy does not know (:func:`addons.body_decode.fence`), so those
    readers keep it as received. Only where such a reader exists (``hardump`` set, or mitmweb);
    compressed bodies over ``HEAVY_BYTES`` are checked on this addon's own thread, never on the
    event loop (checking decodes at most the limit).
    """

    #: Compressed bodies larger than this (bytes, as received) are checked off the event loop.
    HEAVY_BYTES = 64 * 1024

    def __init__(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def response(self, flow: http.HTTPFlow) -> Any:
        return self._check(flow)

    def error(self, flow: http.HTTPFlow) -> Any:
        return self._check(flow)

    def done(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _check(self, flow: http.HTTPFlow) -> Any:
        if not (getattr(ctx.options, "hardump", "") or "web_port" in ctx.options):
            return None
        encoded = [
            message
            for message in (flow.request, flow.response)
            if message is not None
            and message.raw_content
            and parse_codings(message.headers.get("content-encoding"))
        ]
        if not encoded:
            return None
        if any(len(message.raw_content or b"") > self.HEAVY_BYTES for message in encoded):
            return self._check_off_loop(encoded)
        self._fence_each(encoded, [needs_fence(message) for message in encoded])
        return None

    async def _check_off_loop(self, messages: list[Any]) -> None:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="bomb-fence"
            )
        verdicts = await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: [needs_fence(message) for message in messages]
        )
        self._fence_each(messages, verdicts)  # on the loop, where mitmproxy reads headers

    @staticmethod
    def _fence_each(messages: list[Any], verdicts: list[bool]) -> None:
        for message, verdict in zip(messages, verdicts, strict=True):
            if verdict:
                fence(message)
                logger.info("a body past the decode limit is kept as received in HAR/mitmweb")
