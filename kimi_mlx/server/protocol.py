"""The OpenAI wire format: request bodies checked field by field, errors and response objects.

Nothing here touches the model: a request becomes a `GenRequest` (sampling settings, stop strings,
the messages or the prompt) or an `APIError` with the status code and the JSON body OpenAI's API
would send (`{"error": {"message", "type", "param", "code"}}`).
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 16


class APIError(Exception):
    """An error the client gets as OpenAI's JSON error object, with an HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param, code)


@dataclass
class GenRequest:
    """One generation request, checked: what the engine needs and how to answer."""

    kind: str  # "chat" | "completion"
    model: Optional[str]
    messages: list = field(default_factory=list)  # [(role, content)] for chat
    prompt: Any = None  # str or list of token ids for completions
    max_tokens: Optional[int] = None
    sampling: dict = field(default_factory=dict)  # temp, top_p, top_k, min_p, repetition_penalty, seed
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, name: str, lo: float, hi: float, default: Optional[float]) -> Optional[float]:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise invalid(f"{name} must be a finite number, got {json.dumps(v)}", name)
    if not lo <= v <= hi:
        raise invalid(f"{name} must be between {lo:g} and {hi:g}, got {v}", name)
    return float(v)


def _integer(body: dict, name: str, lo: Optional[int] = None) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(f"{name} must be an integer, got {json.dumps(v)}", name)
    if lo is not None and v < lo:
        raise invalid(f"{name} must be >= {lo}, got {v}", name)
    return v


def _logit_bias(body: dict) -> Optional[dict]:
    v = body.get("logit_bias")
    if v is None:
        return None
    bad = invalid("logit_bias must map token ids to numbers between -100 and 100", "logit_bias")
    if not isinstance(v, dict):
        raise bad
    out = {}
    for k, b in v.items():
        if not (isinstance(k, str) and k.isdigit()) or isinstance(b, bool) or not isinstance(b, (int, float)) \
                or not -100 <= b <= 100:
            raise bad
        out[int(k)] = float(b)
    return out or None


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise invalid(f"stop takes at most {MAX_STOPS} strings", "stop")
    return stops


def _common(body: dict, kind: str) -> GenRequest:
    if body.get("n") not in (None, 1):
        raise invalid("only n=1 is supported", "n")
    for name in ("tools", "functions"):
        if body.get(name):
            raise invalid(f"{name} are not supported by this server", name)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type", "text") != "text"):
        raise invalid("only response_format {\"type\": \"text\"} is supported", "response_format")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model must be a string", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise invalid("stream must be a boolean", "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise invalid("stream_options must be an object", "stream_options")
    names = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    max_tokens = next((m for m in (_integer(body, n, lo=1) for n in names) if m is not None), None)
    seed = _integer(body, "seed")
    sampling = {
        "temp": _number(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, 1.0),
        "top_k": _integer(body, "top_k", lo=0) or 0,  # extensions many local servers take
        "min_p": _number(body, "min_p", 0.0, 1.0, 0.0),
        "repetition_penalty": _number(body, "repetition_penalty", 0.0, 10.0, None),
        "seed": seed,
        "logit_bias": _logit_bias(body),
    }
    if sampling["top_p"] == 0.0:  # OpenAI takes 0: only the most likely token
        sampling.update(temp=0.0, top_p=1.0)
    return GenRequest(kind, model, max_tokens=max_tokens, sampling=sampling, stop=_stop(body), stream=bool(stream),
                      include_usage=bool(stream and opts and opts.get("include_usage")))


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None and m.get("role") == "assistant":
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for p in c:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise invalid(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            parts.append(p["text"])
        return "".join(parts)
    raise invalid(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def chat_request(body: dict) -> GenRequest:
    req = _common(body, "chat")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise invalid("messages must be a non-empty list", "messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        if m.get("tool_calls"):
            raise invalid("tool calls are not supported by this server", f"messages[{i}].tool_calls")
        req.messages.append((ROLES[m["role"]], _content(m, i)))
    return req


def completion_request(body: dict) -> GenRequest:
    req = _common(body, "completion")
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        req.prompt = list(p)
    elif isinstance(p, str) and p:
        req.prompt = p
    else:
        raise invalid("prompt must be a non-empty string or list of token ids (one prompt per request)", "prompt")
    if body.get("echo"):
        raise invalid("echo is not supported", "echo")
    return req


# -- responses --------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class Reply:
    """The response objects of one request (the same id and creation time in every chunk)."""

    def __init__(self, req: GenRequest, model: str):
        self.req, self.model = req, model
        self.id, self.created = new_id(req.kind), int(time.time())

    def _obj(self, choices: list, chunk: bool, **extra) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.req.kind == "chat" \
            else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def _choice(self, text: Optional[str], finish: Optional[str], chunk: bool) -> dict:
        if self.req.kind == "completion":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if chunk:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def whole(self, text: str, finish: str, use: dict, timings: dict) -> dict:
        return self._obj([self._choice(text, finish, False)], False, usage=use, timings=timings)

    def chunk(self, text: Optional[str], finish: Optional[str] = None, first: bool = False) -> dict:
        c = self._choice(text, finish, True)
        if first and self.req.kind == "chat":
            c["delta"] = {"role": "assistant", **c["delta"]}
        extra = {"usage": None} if self.req.include_usage else {}
        return self._obj([c], True, **extra)

    def usage_chunk(self, use: dict, timings: dict) -> dict:
        return self._obj([], True, usage=use, timings=timings)


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()) + b"\n\n"
