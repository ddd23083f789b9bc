"""The OpenAI API's request and response shapes, as far as edgeq serves them (runtime/server.py).

Requests are pydantic models, so a wrong type or an out-of-range value is refused with the field named before
any work is done. Fields OpenAI clients send that do not change the result here (`user`, `metadata`, ...) are
accepted and ignored; fields that would change it and that edgeq cannot honour (tools, JSON mode, logprobs,
`suffix`) are refused rather than silently dropped. Beside OpenAI's sampling fields, the request may carry
llama.cpp's (`top_k`, `min_p`, `repeat_penalty`, `repeat_last_n`) and edgeq's `truncate`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgeq.core.errors import RequestError
from edgeq.runtime.sampling import MAX_SEED

MAX_CHOICES = 16            # choices per request (n x prompts), generated one after another
MAX_STOP = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What /v1/completions and /v1/chat/completions share: the model, the limits, the sampling."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    repeat_last_n: int | None = Field(None, ge=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    truncate: bool = False
    adapters: dict[str, float | None] | list[str] | None = None     # edgeq: the bundle's LoRA adapters to apply

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise RequestError(f"{len(stops)} stop strings; at most {MAX_STOP}", param="stop")
        return stops

    def sampling(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """Sampling settings: the request's, else the server's defaults (`edgeq serve --temperature ...`)."""
        out = dict(defaults)
        for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
                     "frequency_penalty", "presence_penalty", "seed"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.logit_bias:
            try:
                out["logit_bias"] = {int(k): max(-100.0, min(100.0, float(v))) for k, v in self.logit_bias.items()}
            except ValueError:
                raise RequestError("logit_bias keys must be token ids", param="logit_bias") from None
        return out

    def refuse_unsupported(self) -> None:
        if self.logprobs:
            raise RequestError("logprobs are not supported by this server", param="logprobs")


class ChatRequest(GenerationRequest):
    messages: list[Any]
    tools: Any = None
    functions: Any = None
    response_format: Any = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise RequestError(f"{name} (function calling) are not supported by this server", param=name)
        fmt = self.response_format
        if fmt and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise RequestError("response_format other than text is not supported by this server",
                               param="response_format")


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        return _texts_or_ids(self.prompt, "prompt")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise RequestError("suffix (insertion) is not supported by this server", param="suffix")


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str = "float"
    dimensions: int | None = None

    def inputs(self) -> list[str | list[int]]:
        return _texts_or_ids(self.input, "input")


def _texts_or_ids(value: str | list, param: str) -> list[str | list[int]]:
    """OpenAI's text inputs as a list: one string, a list of strings, one list of token ids, or several."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise RequestError(f"{param} is empty", param=param)
    if all(isinstance(x, int) for x in value):
        return [list(value)]
    return list(value)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Choice:
    """One finished choice: its text and why it ended."""

    index: int
    prompt_index: int
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(choices: list[Choice]) -> dict[str, int]:
    # each prompt counts once, however many choices (n) it had, as OpenAI counts them
    prompt = sum({c.prompt_index: c.prompt_tokens for c in choices}.values())
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_response(rid: str, model: str, choices: list[Choice], fingerprint: str) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                         "finish_reason": c.finish_reason} for c in choices],
            "usage": usage(choices)}


def chat_chunk(rid: str, model: str, fingerprint: str, index: int, delta: dict[str, Any],
               finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def completion_response(rid: str, model: str, choices: list[Choice], fingerprint: str) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                        for c in choices],
            "usage": usage(choices)}


def completion_chunk(rid: str, model: str, fingerprint: str, index: int, text: str,
                     finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, obj: str, fingerprint: str, choices: list[Choice]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "system_fingerprint": fingerprint,
            "choices": [], "usage": usage(choices)}
