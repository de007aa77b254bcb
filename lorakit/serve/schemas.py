"""OpenAI's request and response shapes for /v1/chat/completions, /v1/completions and /v1/models, and its
error body. Fields lorakit does not implement are refused with a 400 naming them when they are set to
anything but their neutral value; unknown fields are ignored (as OpenAI-compatible servers do)."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lorakit.serve.sampling import SamplingParams

MAX_STOP = 4  # OpenAI: up to 4 stop sequences


class BadRequest(ValueError):
    """A request the server understood but cannot honour (answered with HTTP 400)."""


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    logprobs: bool | int | None = None

    def _refuse_unsupported(self, extra: dict[str, object]) -> None:
        neutral = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "logprobs": None,
                   **extra}
        for name, value in neutral.items():
            given = getattr(self, name)
            if given not in (value, None) and not (name == "logit_bias" and given == {}) \
                    and not (name == "logprobs" and given is False):
                raise BadRequest(f"{name}={given!r} is not supported by lorakit serve; leave it out "
                                 f"(supported: max_tokens, temperature, top_p, stop, seed, stream)")

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise BadRequest(f"stop={self.stop!r}: give at most {MAX_STOP} non-empty strings")
        return SamplingParams(max_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                              top_p=self.top_p, stop=stop, seed=self.seed)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"message content part of type {part.get('type')!r} is not supported: "
                                 "lorakit serve takes text only")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list | None = None
    response_format: dict | None = None

    def check(self) -> None:
        self._refuse_unsupported({"tools": None, "response_format": None})
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens

    def chat(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self._refuse_unsupported({"echo": False, "suffix": None, "best_of": 1})
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise BadRequest(f"prompt is a list of {len(self.prompt)} strings; lorakit serve takes one prompt per "
                             "request (send concurrent requests: they are batched together)")

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


def chat_response(rid: str, model: str, text: str, done: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": done["finish_reason"]}],
            "usage": usage(done)}


def chat_chunk(rid: str, model: str, delta: dict | None, finish_reason: str | None = None,
               usage_: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, **({"usage": usage_} if usage_ is not None else {})}


def completion_response(rid: str, model: str, text: str, done: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": done["finish_reason"]}],
            "usage": usage(done)}


def completion_chunk(rid: str, model: str, text: str | None, finish_reason: str | None = None,
                     usage_: dict | None = None) -> dict:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, **({"usage": usage_} if usage_ is not None else {})}


def model_list(names: list[str], base: str) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "lorakit",
                                        "root": n, "parent": None if n == base else base} for n in names]}


class LoadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
