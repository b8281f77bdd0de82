"""Request schemas and checks of the OpenAI-compatible server, and the preparation of a request.

Preparation (chat template, tokenisation, checks) is plain blocking code: the server runs it in a
worker thread so that a large prompt does not stall the event loop. Every problem with the
request raises `BadRequest` (HTTP 400) or `ModelNotFound` (404); anything else is an internal fault.

OpenAI request fields are in three groups: implemented (declared on the schemas below), harmless
(accepted and ignored: they do not change the answer), and unsupported (400 "unsupported: <field>"
unless the value is the field's no-op default, such as `n: 1`, `logprobs: false`, `tools: []`).
A field OpenAI does not define is rejected as unrecognized, as OpenAI does: a typo must not be
silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from xlora.serve.engine import MAX_GLOBAL_SCALING_WEIGHT, SEED_MAX, SEED_MIN, MixtureOptions
from xlora.serve.engine import Request as GenRequest

MAX_STOP = 4  # OpenAI's bound on stop sequences; each one is searched at every decoding step
ROLES = ("system", "user", "assistant")  # what chat templates commonly render (no tool/function turns)
DEFAULT_MAX_TOKENS = 256


class BadRequest(Exception):
    """A request the server will not run (HTTP 400); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class ModelNotFound(BadRequest):
    """The request names a model this server does not serve (HTTP 404)."""


class XLoraExtension(BaseModel):
    """The `xlora` request object; unknown fields are errors (a typo must not silently do nothing)."""

    model_config = ConfigDict(extra="forbid")

    return_scalings: Literal["summary", "tokens"] | None = None
    mask_experts: list[str] = Field(default_factory=list)
    top_k: int | None = Field(default=None, ge=1, strict=True)
    global_scaling_weight: float | None = Field(
        default=None,
        ge=-MAX_GLOBAL_SCALING_WEIGHT,
        le=MAX_GLOBAL_SCALING_WEIGHT,
        allow_inf_nan=False,
        strict=True,
    )


class Sampling(BaseModel):
    """Fields shared by both endpoints; other fields are kept and checked by `check_fields`."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False, strict=True)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False, strict=True)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX, strict=True)
    stream: bool = Field(default=False, strict=True)  # "yes" or 1 is a 400, not a stream
    xlora: XLoraExtension | None = None


class ChatMessage(BaseModel):
    """One chat turn; fields other than role and content are checked by `check_fields`."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant"]
    content: str | list[Any]


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[Any]


def _unset(v: Any) -> bool:
    return v is None or v is False or v == "" or v == [] or v == {}


def _zero(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0)


def _one(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1)


# Unsupported fields and the values that leave the answer unchanged (those are accepted).
_COMMON_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "n": _one,
    "logit_bias": _unset,
    "presence_penalty": _zero,
    "frequency_penalty": _zero,
}
_CHAT_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    **_COMMON_UNSUPPORTED,
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": _zero,
    "tools": _unset,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": _unset,
    "function_call": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v is None or v == ["text"],
    "audio": _unset,
    "reasoning_effort": _unset,
    "verbosity": _unset,
    "web_search_options": _unset,
}
_COMPLETION_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    **_COMMON_UNSUPPORTED,
    "logprobs": lambda v: v is None,  # 0 still asks for the sampled token's logprob
    "best_of": _one,
    "echo": lambda v: v is None or v is False,
    "suffix": _unset,
}
# Harmless: bookkeeping, routing or latency hints that do not change the answer.
_CHAT_HARMLESS = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "stream_options",  # the last chunk always carries usage
        "parallel_tool_calls",  # only meaningful with tools, which are refused
        "prediction",  # predicted outputs only speed up generation
        "prompt_cache_key",
        "prompt_cache_retention",
        "safety_identifier",
    }
)
_COMPLETION_HARMLESS = frozenset({"user", "stream_options"})


def check_fields(req: Sampling, chat: bool) -> None:
    """400 for an unsupported field with an effective value, or a field OpenAI does not define."""
    unsupported = _CHAT_UNSUPPORTED if chat else _COMPLETION_UNSUPPORTED
    harmless = _CHAT_HARMLESS if chat else _COMPLETION_HARMLESS
    for name, value in (req.model_extra or {}).items():
        if name == "stream_options" and value is not None:
            # OpenAI's keys; the last chunk always carries usage, so include_usage changes nothing
            if not isinstance(value, dict) or set(value) - {"include_usage", "include_obfuscation"}:
                raise BadRequest("stream_options: expected an object with include_usage", "stream_options")
        if name in unsupported:
            if not unsupported[name](value):
                hint = " (only n=1 is supported)" if name == "n" else ""
                raise BadRequest(f"unsupported: {name}{hint}", name)
        elif name not in harmless:
            raise BadRequest(f"unrecognized request field: {name}", name)
    if isinstance(req, ChatRequest):
        for i, m in enumerate(req.messages):
            for name, value in (m.model_extra or {}).items():
                if not _unset(value):  # name, tool_calls, tool_call_id, ...: the template cannot render them
                    raise BadRequest(f"unsupported: messages[{i}].{name}", f"messages.{i}.{name}")
            if not isinstance(m.content, str):
                raise BadRequest(
                    f"unsupported: messages[{i}].content as a list of parts (send a string)", f"messages.{i}.content"
                )


def chat_prompt_ids(req: ChatRequest, tokenizer: Any) -> list[int]:
    """The chat template applied to the messages, tokenised; a template that refuses them is a 400."""
    messages = [{"role": m.role, "content": m.content} for m in req.messages]
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:  # e.g. raise_exception("System role not supported")
            raise BadRequest(f"messages: the model's chat template refused them: {e}", "messages") from None
    else:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_prompt_ids(req: CompletionRequest, tokenizer: Any) -> list[int]:
    """The prompt tokenised: one non-empty string (or a list holding exactly one)."""
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise BadRequest("unsupported: prompt as a list other than one string", "prompt")
        prompt = prompt[0]
    if not prompt.strip():
        raise BadRequest("prompt: must not be empty", "prompt")
    return tokenizer(prompt)["input_ids"]


def check_text(req: Sampling) -> None:
    """400 for text a tokenizer cannot take (lone UTF-16 surrogates) and for chats with nothing said."""
    texts: list[tuple[str, str]] = []
    if isinstance(req, ChatRequest):
        texts = [(f"messages.{i}.content", m.content) for i, m in enumerate(req.messages) if isinstance(m.content, str)]
        if all(not text.strip() for _, text in texts):
            raise BadRequest("messages: every message is empty", "messages")
    elif isinstance(req, CompletionRequest) and isinstance(req.prompt, str):
        texts = [("prompt", req.prompt)]
    for field, text in [*texts, *[("stop", x) for x in ([req.stop] if isinstance(req.stop, str) else req.stop or [])]]:
        try:
            text.encode("utf-8")
        except (UnicodeEncodeError, AttributeError):
            raise BadRequest(f"{field}: not valid Unicode text (a lone surrogate?)", field) from None


def check_mixture(ext: XLoraExtension, experts: list[str]) -> MixtureOptions:
    """The extension's X-LoRA options, checked against the model's experts."""
    unknown = [e for e in ext.mask_experts if e not in experts]
    if unknown:
        shown = ", ".join(repr(e) for e in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise BadRequest(f"xlora.mask_experts: unknown expert(s) {shown}; experts are {experts}", "xlora.mask_experts")
    if len(set(ext.mask_experts)) >= len(experts):
        raise BadRequest("xlora.mask_experts: at least one expert must stay unmasked", "xlora.mask_experts")
    if ext.top_k is not None and ext.top_k > len(experts):
        raise BadRequest(f"xlora.top_k: at most the number of experts ({len(experts)})", "xlora.top_k")
    return MixtureOptions(tuple(sorted(set(ext.mask_experts))), ext.top_k, ext.global_scaling_weight)


def prepare(
    req: Sampling, tokenizer: Any, experts: list[str], model_name: str, context_length: int
) -> tuple[GenRequest, int]:
    """Check `req` and build its engine request; returns it with the prompt's token count. Blocking."""
    if req.model != model_name:
        raise ModelNotFound(f"model {req.model!r} not found; this server serves {model_name!r}", "model")
    chat = isinstance(req, ChatRequest)
    check_fields(req, chat)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise BadRequest(f"stop: at most {MAX_STOP} sequences", "stop")
    if any(not isinstance(x, str) or not x for x in stop):
        raise BadRequest("stop: every stop sequence must be a non-empty string", "stop")
    check_text(req)
    mixture = check_mixture(req.xlora or XLoraExtension(), experts)
    if isinstance(req, ChatRequest):
        prompt_ids = chat_prompt_ids(req, tokenizer)
    elif isinstance(req, CompletionRequest):
        prompt_ids = completion_prompt_ids(req, tokenizer)
    else:
        raise TypeError(f"prepare: a ChatRequest or CompletionRequest, got {type(req).__name__}")
    if not prompt_ids:
        raise BadRequest("the prompt has no tokens", "messages" if chat else "prompt")
    room = context_length - len(prompt_ids)
    wanted = req.max_completion_tokens or req.max_tokens
    if room < 1 or (wanted is not None and wanted > room):
        raise BadRequest(
            f"the prompt has {len(prompt_ids)} tokens and max_tokens is {wanted}; the context holds {context_length}",
            "max_tokens",
        )
    gen = GenRequest(
        prompt_ids=prompt_ids,
        max_tokens=min(wanted or DEFAULT_MAX_TOKENS, room),
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=stop,
        mixture=mixture,
        want_scalings=req.xlora is not None and req.xlora.return_scalings is not None,
    )
    return gen, len(prompt_ids)
