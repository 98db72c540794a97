"""Chat Completions <-> Responses, for the request and for a whole (non-streamed) reply.

Where the two APIs differ, a clear 400 naming the field (:class:`BridgeError`) rather than a
silent drop: ``n > 1``, ``logprobs``, ``stop``, audio, penalties and any field this bridge does
not know.
"""

from __future__ import annotations

import json
import time
from typing import Any

from addons.body_decode import loads_json
from addons.bridge.efforts import ModelEfforts, resolve
from addons.responses_turn import usage_of

#: Chat Completions fields passed through under the same name.
SAME_NAME = ("temperature", "top_p", "parallel_tool_calls", "user", "metadata", "store")
#: Fields handled below; anything else is refused.
KNOWN = frozenset(
    {
        *SAME_NAME,
        "model",
        "messages",
        "stream",
        "stream_options",
        "tools",
        "tool_choice",
        "response_format",
        "max_tokens",
        "max_completion_tokens",
        "reasoning_effort",
        "reasoning",
        "n",
        "service_tier",
    }
)
#: Known Chat Completions fields the Responses API cannot honour, with the reason given.
UNSUPPORTED = {
    "logprobs": "the Responses API streams no per-token logprobs for this bridge",
    "top_logprobs": "the Responses API streams no per-token logprobs for this bridge",
    "stop": "the Responses API has no stop sequences",
    "audio": "audio output is not bridged",
    "modalities": "only text output is bridged",
    "frequency_penalty": "the Responses API has no frequency penalty",
    "presence_penalty": "the Responses API has no presence penalty",
    "logit_bias": "the Responses API has no logit bias",
    "seed": "the Responses API has no seed",
    "functions": "legacy 'functions' are not bridged; use 'tools'",
    "function_call": "legacy 'function_call' is not bridged; use 'tool_choice'",
    "prediction": "predicted outputs are not bridged",
    "web_search_options": "web search options are not bridged",
}


class BridgeError(ValueError):
    """A request the bridge refuses: answered ``400`` with ``param`` (the field) named."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _text_of(content: Any, param: str) -> str:
    """A system/developer/assistant/tool ``content``: a string or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "refusal"):
                raise BridgeError(f"{param}[{i}]", "only text parts are supported here")
            texts.append(str(part.get("text") or part.get("refusal") or ""))
        return "".join(texts)
    raise BridgeError(param, "must be a string or a list of content parts")


def _user_content(content: Any, param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise BridgeError(param, "must be a string or a list of content parts")
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "input_text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise BridgeError(f"{param}[{i}].image_url", "needs a url")
            item = {"type": "input_image", "image_url": url}
            if isinstance(image, dict) and image.get("detail"):
                item["detail"] = image["detail"]
            parts.append(item)
        else:
            raise BridgeError(f"{param}[{i}]", f"content part type {kind!r} is not supported")
    return parts


def translate_messages(messages: Any) -> tuple[str | None, list[dict[str, Any]]]:
    """``messages`` -> ``(instructions, input items)``.

    system and developer messages join (blank line between) into ``instructions``; user text
    and ``image_url`` parts become a user message; assistant text becomes an assistant message
    and its ``tool_calls`` ``function_call`` items; ``tool`` messages become
    ``function_call_output`` items.

    Raises:
        BridgeError: for a message this bridge cannot express.
    """
    if not isinstance(messages, list) or not messages:
        raise BridgeError("messages", "required (a non-empty list)")
    instructions: list[str] = []
    items: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise BridgeError(param, "must be an object")
        role = msg.get("role")
        if role in ("system", "developer"):
            instructions.append(_text_of(msg.get("content"), f"{param}.content"))
        elif role == "user":
            content = _user_content(msg.get("content"), f"{param}.content")
            items.append({"type": "message", "role": "user", "content": content})
        elif role == "assistant":
            if msg.get("audio") is not None:
                raise BridgeError(f"{param}.audio", "audio is not bridged")
            text = _text_of(msg.get("content"), f"{param}.content")
            if text:
                items.append(
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": text}],
                    }
                )
            for j, call in enumerate(msg.get("tool_calls") or []):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not call.get("id") or not fn.get("name"):
                    raise BridgeError(f"{param}.tool_calls[{j}]", "needs an id and a function name")
                items.append(
                    {
                        "type": "function_call",
                        "call_id": str(call["id"]),
                        "name": str(fn["name"]),
                        "arguments": str(fn.get("arguments") or "{}"),
                    }
                )
        elif role == "tool":
            if not msg.get("tool_call_id"):
                raise BridgeError(f"{param}.tool_call_id", "required for a tool message")
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": str(msg["tool_call_id"]),
                    "output": _text_of(msg.get("content"), f"{param}.content"),
                }
            )
        else:
            raise BridgeError(f"{param}.role", f"role {role!r} is not supported")
    return ("\n\n".join(instructions) if instructions else None), items


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BridgeError("tools", "must be a list")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise BridgeError(f"tools[{i}]", "only function tools are supported")
        if not fn.get("name"):
            raise BridgeError(f"tools[{i}].function.name", "required")
        item: dict[str, Any] = {"type": "function", "name": fn["name"]}
        for key in ("description", "parameters", "strict"):
            if key in fn:
                item[key] = fn[key]
        out.append(item)
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name:
            return {"type": "function", "name": name}
    raise BridgeError("tool_choice", "must be auto, none, required or a function")


def _text_format(fmt: Any) -> dict[str, Any] | None:
    if not isinstance(fmt, dict):
        raise BridgeError("response_format", "must be an object")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = fmt.get("json_schema")
        if not isinstance(schema, dict) or not schema.get("name"):
            raise BridgeError("response_format.json_schema", "needs a name and a schema")
        out = {"type": "json_schema", "name": schema["name"], "schema": schema.get("schema", {})}
        for key in ("strict", "description"):
            if key in schema:
                out[key] = schema[key]
        return out
    raise BridgeError("response_format.type", f"{kind!r} is not supported")


def chat_to_responses(
    body: Any, models: dict[str, ModelEfforts]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Translate a Chat Completions request body.

    Returns ``(Responses request body, reply context)``; the context (``model`` as the client
    named it, ``stream``, ``include_usage``) is what the reply's translation needs.

    Raises:
        BridgeError: for anything unsupported, naming the field.
    """
    if not isinstance(body, dict):
        raise BridgeError("body", "must be a JSON object")
    for key in body:
        if key in UNSUPPORTED and body[key] not in (None, False, [], {}):
            raise BridgeError(key, UNSUPPORTED[key])
        if key not in KNOWN and key not in UNSUPPORTED:
            raise BridgeError(key, "unknown or unsupported field")
    if body.get("n") not in (None, 1):
        raise BridgeError("n", "only one choice (n = 1) is supported")
    try:
        model, effort = resolve(body, models)
    except ValueError as e:
        param = str(e).split(":", 1)[0]
        raise BridgeError(param, str(e).split(": ", 1)[-1]) from None
    instructions, items = translate_messages(body.get("messages"))
    out: dict[str, Any] = {"model": model, "input": items, "store": False}
    if instructions is not None:
        out["instructions"] = instructions
    for key in SAME_NAME:
        if key in body and body[key] is not None:
            out[key] = body[key]
    stream = bool(body.get("stream"))
    out["stream"] = stream
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        out["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("response_format") is not None:
        fmt = _text_format(body["response_format"])
        if fmt is not None:
            out["text"] = {"format": fmt}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise BridgeError("max_completion_tokens", "must be a positive integer")
        out["max_output_tokens"] = limit
    if effort is not None:
        out["reasoning"] = {"effort": effort}
    if body.get("service_tier") is not None:
        out["service_tier"] = body["service_tier"]
    options = body.get("stream_options") or {}
    context = {
        "model": body["model"],
        "stream": stream,
        "include_usage": bool(isinstance(options, dict) and options.get("include_usage")),
    }
    return out, context


def chat_usage(usage: dict[str, int] | None) -> dict[str, Any] | None:
    """Responses usage (:func:`addons.responses_turn.usage_of`'s shape) in Chat Completions'
    shape: prompt, completion and total tokens with cached and reasoning details."""
    if usage is None:
        return None
    return {
        "prompt_tokens": usage["input"],
        "completion_tokens": usage["output"],
        "total_tokens": usage["total"],
        "prompt_tokens_details": {"cached_tokens": usage["cached"]},
        "completion_tokens_details": {"reasoning_tokens": usage["reasoning"]},
    }


def finish_reason(status: str | None, reason: str | None, has_calls: bool) -> str:
    """Chat Completions' ``finish_reason`` for a Responses outcome: ``tool_calls`` when the
    turn called tools, ``length`` for ``max_output_tokens``, ``content_filter``, else ``stop``."""
    if status == "incomplete":
        return "content_filter" if reason == "content_filter" else "length"
    return "tool_calls" if has_calls else "stop"


def completion_id(response_id: Any) -> str:
    """The chat completion's id, derived from the Responses id."""
    return f"chatcmpl-{response_id or int(time.time() * 1000)}"


def responses_to_chat(response: Any, context: dict[str, Any]) -> dict[str, Any]:
    """A Responses ``response`` object -> one ``chat.completion`` object.

    Raises:
        ValueError: when ``response`` is not a response object.
    """
    if not isinstance(response, dict) or not isinstance(response.get("output"), list):
        raise ValueError("not a Responses response object")
    text, calls = [], []
    for item in response["output"]:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            for part in item.get("content") or []:
                if isinstance(part, dict) and part.get("type") == "output_text":
                    text.append(str(part.get("text", "")))
        elif item.get("type") == "function_call":
            calls.append(
                {
                    "id": item.get("call_id") or item.get("id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        message["tool_calls"] = calls
    details = response.get("incomplete_details") or {}
    reason = details.get("reason") if isinstance(details, dict) else None
    out = {
        "id": completion_id(response.get("id")),
        "object": "chat.completion",
        "created": int(response.get("created_at") or time.time()),
        "model": context.get("model") or response.get("model"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason(response.get("status"), reason, bool(calls)),
                "logprobs": None,
            }
        ],
    }
    usage = chat_usage(usage_of(response))
    if usage is not None:
        out["usage"] = usage
    return out


def chat_error(status: int, body: bytes) -> bytes:
    """An upstream error body in Chat Completions' error shape (OpenAI's ``{"error": {...}}``,
    which both APIs share; a body that is not one is wrapped)."""
    try:
        doc = loads_json(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
            return json.dumps(doc).encode()
    except ValueError:
        pass
    text = body.decode("utf-8", "replace")[:500]
    return json.dumps(
        {"error": {"type": "upstream_error", "code": str(status), "message": text or "error"}}
    ).encode()
