"""OpenAI chat completions ⇄ Anthropic Messages. Pure: values and bytes in, values and
bytes out.

    chat.completions request ──to_messages──▶ Messages request
    Messages answer ──to_completion──▶ chat.completion
    Messages SSE ──ChunkTranslator──▶ chat.completion.chunk SSE (… data: [DONE])
    Anthropic error body ──to_openai_error──▶ {"error": {message, type, param, code}}

What a chat request asks for that Messages cannot give (several choices, log
probabilities, audio, predicted outputs) is refused with a 400 naming the parameter,
never dropped in silence: :func:`check` says so before anything is sent. A JSON
``response_format`` (``json_schema``, ``json_object``) is asked for as Messages does
structured output: one tool, its input the schema, that the model must call
(:func:`answer_tool`); that call's input comes back as the message's content.
Sampling knobs Messages lacks (penalties, seed, logit bias) and OpenAI's storage
options are left out.

Usage: Anthropic's ``input_tokens`` leaves out the prompt read from and written to its
cache; the chat usage counts all three as ``prompt_tokens``, with the parts in
``prompt_tokens_details.cached_tokens`` and ``.cache_write_tokens``
(:meth:`proxy.pricing.Usage.from_anthropic` reads it, or refuses it: then no usage is
reported and the proxy counts the output itself).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from proxy.anthropic_wire import laid_over
from proxy.errors import InvalidRequest
from proxy.pricing import Usage
from proxy.sse import SSEParser

DEFAULT_MAX_TOKENS = 4096  # Messages requires a cap; the proxy always sets one
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", re.S)
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
          "max_tokens": "length", "model_context_window_exceeded": "length",
          "tool_use": "tool_calls", "refusal": "content_filter"}
_UNSUPPORTED = ("prediction", "audio")
JSON_TOOL = "json_answer"  # the tool a json_object (or an unnamed schema) is asked through


def _refuse(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message + " (not supported by this model's provider).",
                          param=param)


def check(payload: Mapping[str, Any]) -> None:
    """Raise the :class:`~proxy.errors.InvalidRequest` that :func:`to_messages` would
    raise for ``payload``, before anything is held or sent."""
    to_messages(payload)


# ---- request ------------------------------------------------------------------------


def to_messages(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The Messages request for the chat completions request ``payload`` (its model
    already the provider's name).

    system and developer messages become ``system`` (a string; text blocks when a part
    has ``cache_control``, which is passed on); consecutive messages of one role are
    merged (Messages requires the roles to alternate) and ``tool`` messages become
    ``tool_result`` blocks of a user message. Raises InvalidRequest, naming the
    parameter, for what cannot be translated."""
    _refuse_unsupported(payload)
    out: dict[str, Any] = {"model": payload.get("model")}
    system: list[dict[str, Any]] = []
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    messages = payload.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be a list.", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest("Each message must be an object.", param=f"messages[{i}]")
        role = m.get("role")
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            system += _text_blocks(m.get("content"), where + ".content")
            continue
        if role == "user":
            blocks = _user_blocks(m.get("content"), where + ".content")
        elif role == "assistant":
            blocks = _assistant_blocks(m, where)
            role = "assistant"
        elif role == "tool":
            blocks = [_tool_result(m, where)]
            role = "user"
        else:
            raise InvalidRequest(f"Messages with role {role!r} cannot be translated.",
                                 param=where + ".role")
        if not blocks:
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    if system:
        out["system"] = (system if any("cache_control" in b for b in system)
                         else "\n\n".join(b["text"] for b in system))
    out["messages"] = [{"role": role, "content": _compact(blocks)} for role, blocks in turns]
    cap = payload.get("max_completion_tokens") or payload.get("max_tokens")
    out["max_tokens"] = cap if isinstance(cap, int) else DEFAULT_MAX_TOKENS
    stop = payload.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = stop
    for key in ("temperature", "top_p"):
        if payload.get(key) is not None:
            out[key] = payload[key]
    end_user = payload.get("user") or payload.get("safety_identifier")
    if isinstance(end_user, str):
        out["metadata"] = {"user_id": end_user}
    tools = payload.get("tools")
    if tools:
        out["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]
    choice = _tool_choice(payload.get("tool_choice"))
    if payload.get("parallel_tool_calls") is False and tools:
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    if choice is not None:
        out["tool_choice"] = choice
    forced = answer_tool(payload)
    if forced is not None:
        spec = _obj(_obj(payload.get("response_format")).get("json_schema"))
        tool: dict[str, Any] = {"name": forced, "description": str(
            spec.get("description") or "Give the answer as this tool's input.")}
        tool["input_schema"] = spec.get("schema") or {"type": "object"}
        out["tools"], out["tool_choice"] = [tool], {"type": "tool", "name": forced}
    if payload.get("stream"):
        out["stream"] = True
    return out


def _refuse_unsupported(p: Mapping[str, Any]) -> None:
    n = p.get("n")
    if n is not None and n != 1:
        raise _refuse("Only one choice ('n': 1) can be asked for", "n")
    if p.get("logprobs") or p.get("top_logprobs"):
        raise _refuse("Log probabilities cannot be returned",
                      "logprobs" if p.get("logprobs") else "top_logprobs")
    modalities = p.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        raise _refuse("Audio output cannot be produced", "modalities")
    for key in _UNSUPPORTED:
        if p.get(key) is not None:
            raise _refuse(f"'{key}' cannot be translated", key)
    fmt = p.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return
    if fmt.get("type") not in ("json_object", "json_schema"):
        raise _refuse(f"response_format {fmt.get('type')!r} cannot be translated",
                      "response_format")
    if p.get("tools"):
        raise _refuse("A JSON response_format together with tools cannot be translated",
                      "response_format")
    schema = _obj(fmt.get("json_schema")).get("schema")
    if fmt["type"] == "json_schema" and not (isinstance(schema, dict)
                                             and schema.get("type", "object") == "object"):
        raise _refuse("response_format.json_schema.schema must be an object schema",
                      "response_format.json_schema.schema")


def answer_tool(payload: Mapping[str, Any]) -> str | None:
    """The tool a JSON ``response_format`` is asked through (its schema's name, else
    :data:`JSON_TOOL`), or None when the answer is plain text."""
    fmt = _obj(payload.get("response_format"))
    if fmt.get("type") not in ("json_object", "json_schema"):
        return None
    name = _obj(fmt.get("json_schema")).get("name")
    return name if isinstance(name, str) and name else JSON_TOOL


def _compact(blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """One plain text block as the string it is; anything else as blocks."""
    if len(blocks) == 1 and blocks[0]["type"] == "text" and len(blocks[0]) == 2:
        text: str = blocks[0]["text"]
        return text
    return blocks


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """Text-only content (system, developer, tool results) as text blocks."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if content is None:
        return []
    if not isinstance(content, list):
        raise InvalidRequest("'content' must be a string or a list of parts.", param=where)
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise InvalidRequest("Only text parts can be translated here.",
                                 param=f"{where}[{j}]")
        out += _text(part, f"{where}[{j}]")
    return out


def _text(part: dict[str, Any], where: str) -> list[dict[str, Any]]:
    text = part.get("text")
    if not isinstance(text, str):
        raise InvalidRequest("A text part's 'text' must be a string.", param=where + ".text")
    if not text:
        return []  # Messages refuses empty text blocks
    block: dict[str, Any] = {"type": "text", "text": text}
    if part.get("cache_control") is not None:
        block["cache_control"] = part["cache_control"]
    return [block]


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str) or content is None:
        return _text_blocks(content, where)
    if not isinstance(content, list):
        raise InvalidRequest("'content' must be a string or a list of parts.", param=where)
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out += _text(part, at)
        elif kind == "image_url":
            out.append(_image(part, at))
        else:
            raise InvalidRequest(f"Content parts of type {kind!r} cannot be translated.",
                                 param=at)
    return out


def _image(part: dict[str, Any], where: str) -> dict[str, Any]:
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise InvalidRequest("An image part needs image_url.url.", param=where + ".image_url")
    if url.startswith("data:"):
        m = _DATA_URL.fullmatch(url)
        if m is None:
            raise InvalidRequest("An inline image must be a base64 data: URL.",
                                 param=where + ".image_url.url")
        source = {"type": "base64", "media_type": m.group(1), "data": m.group(2)}
    elif url.startswith(("https://", "http://")):
        source = {"type": "url", "url": url}
    else:
        raise InvalidRequest("An image URL must be http(s) or a base64 data: URL.",
                             param=where + ".image_url.url")
    block: dict[str, Any] = {"type": "image", "source": source}
    if part.get("cache_control") is not None:
        block["cache_control"] = part["cache_control"]
    return block


def _assistant_blocks(m: dict[str, Any], where: str) -> list[dict[str, Any]]:
    content = m.get("content")
    out: list[dict[str, Any]] = []
    if isinstance(content, list):  # text and refusal parts
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "refusal":
                part = {"type": "text", "text": part.get("refusal")}
            out += _text_blocks([part], f"{where}.content[{j}]")
    else:
        out += _text_blocks(content, where + ".content")
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise InvalidRequest("'tool_calls' must be a list.", param=where + ".tool_calls")
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest("A tool call needs function.name.", param=at)
        try:
            args = orjson.loads(fn.get("arguments") or "{}")
        except (orjson.JSONDecodeError, TypeError):
            args = None
        if not isinstance(args, dict):
            raise InvalidRequest("A tool call's arguments must be a JSON object.",
                                 param=at + ".function.arguments")
        out.append({"type": "tool_use", "id": call.get("id"), "name": fn["name"],
                    "input": args})
    return out


def _tool_result(m: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = m.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest("A tool message needs its tool_call_id.",
                             param=where + ".tool_call_id")
    content = m.get("content")
    blocks = _text_blocks(content, where + ".content")
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    if blocks:
        result["content"] = content if isinstance(content, str) else blocks
    return result


def _tool(tool: Any, where: str) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
        raise InvalidRequest("Only function tools can be translated.", param=where)
    if not isinstance(fn.get("name"), str):
        raise InvalidRequest("A function tool needs a name.", param=where + ".function.name")
    out: dict[str, Any] = {"name": fn["name"]}
    if fn.get("description"):
        out["description"] = fn["description"]
    out["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
    return out


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    named = {"auto": "auto", "required": "any", "none": "none"}
    if isinstance(choice, str) and choice in named:
        return {"type": named[choice]}
    fn = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return {"type": "tool", "name": fn["name"]}
    raise InvalidRequest("tool_choice must be 'auto', 'required', 'none' or a named "
                         "function.", param="tool_choice")


# ---- answer -------------------------------------------------------------------------


def openai_usage(usage: Any) -> dict[str, Any] | None:
    """A Messages ``usage`` as chat's, or None when it is refused."""
    u = Usage.from_anthropic(usage)
    if u is None:
        return None
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens,
                                      "cache_write_tokens": u.cache_write_tokens}}


def to_completion(msg: Any, created: int, answer: str | None = None) -> dict[str, Any] | None:
    """The chat.completion for a whole Messages answer; None when ``msg`` is not one (an
    object with ``content`` or ``usage``). A call of the ``answer`` tool
    (:func:`answer_tool`) is the content, as JSON text. Odd content still carries the
    answer's usage across — a string is its text, anything else no content — so what
    the provider billed is what is charged."""
    if not isinstance(msg, dict) or ("content" not in msg and "usage" not in msg):
        return None
    content = msg.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    reason = FINISH.get(str(msg.get("stop_reason")), "stop")
    for block in content if isinstance(content, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thinking.append(block["thinking"])
        elif kind == "tool_use" and answer is not None and block.get("name") == answer:
            texts.append(orjson.dumps(block.get("input", {})).decode())
            reason = "stop" if reason == "tool_calls" else reason
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": orjson.dumps(block.get("input", {})
                                                                 ).decode()}})
    message: dict[str, Any] = {"role": "assistant",
                               "content": "".join(texts) if texts else None,
                               "refusal": None}
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    if calls:
        message["tool_calls"] = calls
    out: dict[str, Any] = {
        "id": msg.get("id"), "object": "chat.completion", "created": created,
        "model": msg.get("model"),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": reason}]}
    usage = openai_usage(msg.get("usage"))
    if usage is not None:
        out["usage"] = usage
    return out


def to_openai_error(status: int, body: bytes) -> bytes:
    """An Anthropic error body (``{"type": "error", "error": {"type", "message"}}``) in
    OpenAI's shape; a body of another shape becomes the message."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        message, kind = err["message"], str(err.get("type") or "api_error")
    else:
        text = body.decode("utf-8", "replace").strip()[:500]
        message, kind = f"The provider answered {status}: {text}", "upstream_error"
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None,
                                   "code": None}})


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _index(event: dict[str, Any]) -> int:
    index = event.get("index")
    return index if isinstance(index, int) else -1


def _chunk_bytes(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class ChunkTranslator:
    """Messages SSE bytes in, chat.completion.chunk SSE bytes out, in any network split.

    The first chunk (``message_start``) opens the assistant's turn, and, with
    ``include_usage``, carries the prompt's usage as Anthropic reports it there (no
    output yet): a client or proxy that is left before the end still knows what the
    prompt cost. At ``message_stop`` the usage chunk (``choices: []``) follows with
    ``include_usage``, then ``[DONE]``. An ``error`` event becomes ``data: {"error":
    ...}`` in OpenAI's shape, and the stream ends there. The input of a call of the
    ``answer`` tool (:func:`answer_tool`) streams as content."""

    __slots__ = ("_answering", "_blocks", "_calls", "_parser", "_usage", "answer",
                 "created", "id", "include_usage", "model")

    def __init__(self, include_usage: bool, created: int, model: str = "",
                 answer: str | None = None):
        self.answer = answer
        self._answering: set[int] = set()  # the blocks that call the answer tool
        self.include_usage = include_usage
        self.created = created
        self.model = model
        self.id = ""
        self._parser = SSEParser()
        self._blocks: dict[int, int] = {}  # a tool_use block's index → its call ordinal
        self._calls = 0
        self._usage: dict[str, Any] = {}

    def feed(self, chunk: bytes) -> bytes:
        out = [self._event(e.data) for e in self._parser.feed(chunk)]
        return b"".join(out)

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None,
               usage: dict[str, Any] | None = None) -> bytes:
        data: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta,
                                                  "logprobs": None,
                                                  "finish_reason": finish}]}
        if self.include_usage:
            data["usage"] = usage
        return _chunk_bytes(data)

    def _event(self, raw: str) -> bytes:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return b""
        if not isinstance(data, dict):
            return b""
        kind = data.get("type")
        if kind == "message_start":
            msg = _obj(data.get("message"))
            self.id = str(msg.get("id") or "")
            self.model = str(msg.get("model") or self.model)
            self._usage = laid_over(self._usage, _obj(msg.get("usage")))
            start = {**self._usage, "output_tokens": 0}
            return self._chunk({"role": "assistant", "content": ""},
                               usage=openai_usage(start))
        if kind == "content_block_start":
            return self._block_start(data)
        if kind == "content_block_delta":
            return self._delta(data)
        if kind == "message_delta":
            self._usage = laid_over(self._usage, _obj(data.get("usage")))  # cumulative
            delta = _obj(data.get("delta"))
            reason = delta.get("stop_reason")
            if reason is None:
                return b""
            finish = FINISH.get(str(reason), "stop")
            if finish == "tool_calls" and self._answering and not self._calls:
                finish = "stop"
            return self._chunk({}, finish)
        if kind == "message_stop":
            usage = openai_usage(self._usage)
            tail = self._chunk(None, usage=usage) if self.include_usage and usage else b""
            return tail + b"data: [DONE]\n\n"
        if kind == "error":
            err = _obj(data.get("error"))
            return b"data: " + to_openai_error(200, orjson.dumps({"error": err})) + b"\n\n"
        return b""  # ping, and events not known yet

    def _block_start(self, data: dict[str, Any]) -> bytes:
        block = data.get("content_block")
        if not isinstance(block, dict):
            return b""
        if block.get("type") == "tool_use" and self.answer is not None \
                and block.get("name") == self.answer:
            self._answering.add(_index(data))
            return b""
        if block.get("type") == "tool_use":
            ordinal = self._blocks[_index(data)] = self._calls
            self._calls += 1
            return self._chunk({"tool_calls": [{
                "index": ordinal, "id": block.get("id"), "type": "function",
                "function": {"name": block.get("name"), "arguments": ""}}]})
        if block.get("type") == "text" and block.get("text"):
            return self._chunk({"content": block["text"]})
        return b""

    def _delta(self, data: dict[str, Any]) -> bytes:
        delta = data.get("delta")
        if not isinstance(delta, dict):
            return b""
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return self._chunk({"content": delta["text"]})
        if kind == "thinking_delta" and delta.get("thinking"):
            return self._chunk({"reasoning_content": delta["thinking"]})
        if kind == "input_json_delta" and delta.get("partial_json"):
            if _index(data) in self._answering:
                return self._chunk({"content": delta["partial_json"]})
            ordinal = self._blocks.get(_index(data))
            if ordinal is None:
                return b""
            return self._chunk({"tool_calls": [{
                "index": ordinal, "function": {"arguments": delta["partial_json"]}}]})
        return b""  # signatures, citations
