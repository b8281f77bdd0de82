"""Decoding with one KV cache per pass (DESIGN.md: why two caches are exact).

Prefill runs the scaling pass, the classifier and the real pass over the prompt; every step then
feeds only the new token through the scaling pass (cache 1), the classifier, and the real pass
(cache 2). With `reuse_scalings_after=k` the scaling pass stops after k new tokens and each
sequence keeps its last scalings.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from xlora.core import multimodal
from xlora.core.cache import cache_kwargs
from xlora.core.checks import check_number
from xlora.core.merge import merged_experts, row_scalings_if_shared

if TYPE_CHECKING:
    from xlora.core.model import XLoraModel


class StableTemperature:
    """`logits / T` after subtracting each row's maximum: the same distribution, but a tiny T (1e-40)
    gives a one-hot row instead of inf/NaN (which would fail every request sharing the batch)."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        return (scores - scores.max(dim=-1, keepdim=True).values) / self.temperature  # [B, V], max 0


@dataclass
class SamplingOptions:
    """How to pick the next token; defaults are greedy decoding."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    seed: int | None = None

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid option (NaN and bools are refused too)."""
        where = "generate"
        check_number(where, "max_new_tokens", self.max_new_tokens, integer=True, low=1)
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"{where}: do_sample: expected true or false, got {self.do_sample!r}")
        if self.temperature == 0 and not isinstance(self.temperature, bool):
            raise ValueError(f"{where}: temperature: expected a finite number > 0, got 0 (greedy is do_sample=False)")
        check_number(where, "temperature", self.temperature, low=0, low_open=True)
        check_number(where, "top_k", self.top_k, integer=True, low=1, optional=True)
        check_number(where, "top_p", self.top_p, low=0, low_open=True, high=1, optional=True)
        check_number(where, "repetition_penalty", self.repetition_penalty, low=0, low_open=True, optional=True)
        check_number(where, "seed", self.seed, integer=True, low=0, high=2**64 - 1, optional=True)
        if not self.do_sample:  # the CLI's rule too: an option that would be ignored is an error, not a no-op
            ignored = [n for n in ("top_k", "top_p", "seed") if getattr(self, n) is not None]
            ignored += ["temperature"] if self.temperature != 1.0 else []
            if ignored:
                raise ValueError(
                    f"{where}: {', '.join(ignored)} only apply when sampling; pass do_sample=True "
                    "(without it decoding is greedy)"
                )
        check_number(where, "pad_token_id", self.pad_token_id, integer=True, low=0, optional=True)
        eos = self.eos_token_id
        if isinstance(eos, (list, tuple)):
            for e in eos:
                check_number(where, "eos_token_id", e, integer=True, low=0)
        else:
            check_number(where, "eos_token_id", eos, integer=True, low=0, optional=True)

    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [int(self.eos_token_id)]

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                procs.append(StableTemperature(self.temperature))
            if self.top_k is not None:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


@dataclass
class GenerationStep:
    """One decoding step: the new token of every sequence and what the mixture did for it."""

    tokens: torch.Tensor  # [B] (pad id for sequences already finished)
    finished: torch.Tensor  # [B] bool, True once a sequence has produced an EOS
    scalings: torch.Tensor | None  # [B, L, N] scalings that produced this token (None: experts off)


_positions = multimodal.text_positions  # position ids from an attention mask (padding clamped to 0)


def _uncached_logits(
    model: XLoraModel, ids: torch.Tensor, mask: torch.Tensor, images: dict[str, Any] | None = None
) -> torch.Tensor:
    """Recompute everything over the whole sequence (what PEFT does); returns last logits `[B, V]`.
    `images`: the prompt's image inputs (`multimodal.shared_inputs`), fed again every step."""
    images = multimodal.for_longer_sequence(images or {}, ids.shape[1])
    positions, _ = multimodal.prompt_positions(model.base, ids, mask, images)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **images)
    return out.logits[:, -1, :]


Sampler = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(ids `[b, T]`, logits `[b, V]`, original row numbers `[b]`) of the live rows -> tokens `[b]`."""


def default_sampler(opts: SamplingOptions, device: torch.device) -> Sampler:
    """Greedy or sampling with transformers' logits processors, one generator for the batch."""
    processors = opts.processors()
    generator = None
    if opts.do_sample and opts.seed is not None:
        generator = torch.Generator(device=device).manual_seed(opts.seed)

    def sample(ids: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        scores = processors(ids, logits.float())
        if opts.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
        return scores.argmax(dim=-1)

    return sample


def context_length(model: XLoraModel) -> int | None:
    """The base model's context (`max_position_embeddings`), or None when it does not say."""
    n = getattr(multimodal.text_config(model.base), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the input embedding: the valid token ids are 0 .. vocab_size - 1."""
    emb = model.get_input_embeddings()
    n = getattr(emb, "num_embeddings", None)
    return int(n) if isinstance(n, int) else None


def check_prompt(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    context: int | None,
    max_new_tokens: int = 0,
    vocab: int | None = None,
) -> None:
    """Refuse prompts the loop cannot run correctly: not `[B, T]` token ids, empty, ids outside the
    vocabulary, a mask of another shape or an all-padding row, or longer (plus `max_new_tokens`)
    than the model's context.

    Past `max_position_embeddings` a model does not fail, it produces garbage; hence an error here.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        got = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"generate: input_ids: expected integer token ids [batch, seq], got {got}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"generate: empty prompt (input_ids of shape {list(input_ids.shape)}); give at least 1 token")
    if vocab is not None and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        bad = int(input_ids.min()) if int(input_ids.min()) < 0 else int(input_ids.max())
        raise ValueError(f"generate: input_ids: token id {bad} is outside the vocabulary (0..{vocab - 1})")
    if attention_mask is None:
        lengths = torch.full((input_ids.shape[0],), input_ids.shape[1])
    else:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            raise ValueError(f"generate: attention_mask: expected shape {list(input_ids.shape)}, got {got}")
        lengths = (attention_mask != 0).sum(dim=1)
        empty = (lengths == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"generate: row(s) {empty} of the batch are all padding (empty prompt)")
        kept = attention_mask != 0  # [B, T]
        right = (kept[:, :-1] & ~kept[:, 1:]).any(dim=1).nonzero().flatten().tolist()
        if right:
            raise ValueError(
                f"generate: attention_mask row(s) {right} have padding after their tokens (right padding); "
                "new tokens follow the last position, so left-pad the batch (tokenizer.padding_side = 'left')"
            )
    longest = int(lengths.max())
    if context is not None and longest + max_new_tokens > context:
        asked = f"{longest} prompt tokens" + (f" + max_new_tokens={max_new_tokens}" if max_new_tokens else "")
        raise ValueError(
            f"generate: {asked} exceed the model's context of {context} tokens (max_position_embeddings); "
            "shorten the prompt" + (" or lower max_new_tokens" if max_new_tokens else "")
        )


def with_model_defaults(model: XLoraModel, opts: SamplingOptions) -> SamplingOptions:
    """Fill `eos_token_id` / `pad_token_id` left as None from the base model's generation_config (then its
    config), as transformers' `generate` does, so decoding stops at the model's end-of-turn token.
    `eos_token_id=[]` means: never stop early."""
    if opts.eos_token_id is not None and opts.pad_token_id is not None:
        return opts
    sources = [getattr(model.base, "generation_config", None), getattr(model.base, "config", None)]

    def first(name: str) -> Any:
        return next((getattr(c, name) for c in sources if c is not None and getattr(c, name, None) is not None), None)

    eos = opts.eos_token_id if opts.eos_token_id is not None else first("eos_token_id")
    pad = opts.pad_token_id if opts.pad_token_id is not None else first("pad_token_id")
    return dataclasses.replace(opts, eos_token_id=eos, pad_token_id=pad)


def _select_rows(cache: Any, keep: torch.Tensor) -> None:
    if cache is not None:
        cache.batch_select_indices(keep)


def iter_generate(
    model: XLoraModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    options: SamplingOptions | None = None,
    use_cache: bool = True,
    reuse_scalings_after: int | None = None,
    sampler: Sampler | None = None,
    stop_rows: torch.Tensor | None = None,
    merge: bool = True,
    images: dict[str, Any] | None = None,
) -> Iterator[GenerationStep]:
    """Yield one GenerationStep per new token until every sequence ended or max_new_tokens.

    `images`: a vision-language base's image inputs (`pixel_values`, `image_grid_thw`, ...); they
    go into the prefill of both passes, and positions follow the model (`xlora.core.multimodal`).

    Finished rows leave the batch (both KV caches shrink), so the cost follows the live rows.
    `stop_rows` `[B]` bool may be set True by the caller between steps (a stop string was seen, a
    client went away): that row counts as finished from the next step on.
    `merge`: once the scalings are fixed (static scalings, or reused after `reuse_scalings_after`)
    and every live row shares them, the experts are folded into the base weights (merge.py) and a
    step costs what the base model's does. The original weights come back when the generator ends
    or is closed; until then the model refuses other calls (close a generator you stop early).
    """
    model._check_not_merged()  # another generator holds merged weights: even the base path would see them
    opts = with_model_defaults(model, options or SamplingOptions())
    opts.validate()
    model.config.validate(model.n_experts)  # fields assigned directly (not through the setters) too
    check_number("generate", "reuse_scalings_after", reuse_scalings_after, integer=True, low=1, optional=True)
    vocab = vocab_size(model.base)
    check_prompt(input_ids, attention_mask, context_length(model), vocab=vocab)
    outside = [e for e in opts.eos_ids() if vocab is not None and e >= vocab]
    if outside:  # generation could never stop on it
        raise ValueError(f"generate: eos_token_id {outside[0]} is outside the vocabulary (0..{vocab - 1})")
    reuse_after = reuse_scalings_after if reuse_scalings_after is not None else model.config.reuse_scalings_after
    device = model.device
    ids = input_ids.to(device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
    n_rows = ids.shape[0]
    eos = torch.tensor(opts.eos_ids(), device=device, dtype=torch.long)
    pad = opts.pad_token_id if opts.pad_token_id is not None else (opts.eos_ids() or [0])[0]
    sample = sampler or default_sampler(opts, device)
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)  # over all original rows
    rows = torch.arange(n_rows, device=device)  # original row number of each live row
    disabled = model._experts_disabled
    cache_scaling = DynamicCache(config=model.base.config) if use_cache else None
    cache_real = DynamicCache(config=model.base.config) if use_cache else None
    step_ids, last_scalings = ids, None
    merged = contextlib.ExitStack()  # holds the merged weights, if any, until the generator ends
    multimodal.check_image_keywords(images or {}, model.base, "iter_generate()")
    images = multimodal.shared_inputs(model.base, ids, images or {})
    multimodal.check_vision_base(model.base, images)
    multimodal.check_image_inputs(model.base, ids, images)
    images = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in images.items()}
    prompt_pos, rope_delta = multimodal.prompt_positions(model.base, ids, mask, images)  # [B, T] or [3, B, T]

    with torch.no_grad(), merged:
        for step in range(opts.max_new_tokens):
            inputs = {"input_ids": step_ids, "attention_mask": mask}
            if step == 0:  # prefill: the images enter both passes (and both caches) here only
                inputs.update(images)
                pos = prompt_pos
            else:
                pos = multimodal.step_positions(mask, step_ids.shape[1], rope_delta)
            if not use_cache:
                logits = _uncached_logits(model, ids, mask, images)
                scalings = None if disabled else model.get_latest_scalings()[:, -1]
            elif disabled:
                out = model.base(**inputs, position_ids=pos, **cache_kwargs(model.base, cache_real))
                logits, scalings = out.logits[:, -1, :], None
            else:
                if reuse_after is not None and step > reuse_after and last_scalings is not None:
                    scalings_seq = last_scalings[:, None]  # [b, 1, L, N]
                    cache_scaling = None  # never needed again
                else:
                    scalings_seq = model.route(cache=cache_scaling, **inputs, position_ids=pos)  # [b, T, L, N]
                fixed = model._static is not None or cache_scaling is None
                if merge and fixed and not model._merged:
                    shared = row_scalings_if_shared(scalings_seq[:, -1])  # [L, N] or None
                    if shared is not None:
                        merged.enter_context(merged_experts(model, shared))
                real = contextlib.nullcontext() if model._merged else model.apply_scalings(scalings_seq)
                with real:
                    out = model.base(
                        **inputs, position_ids=pos, **cache_kwargs(model.base, cache_real), logits_to_keep=1
                    )
                logits, scalings = out.logits[:, -1, :], scalings_seq[:, -1]
            last_scalings = scalings
            token = sample(ids, logits, rows)  # [b]
            if eos.numel():
                finished[rows] |= torch.isin(token, eos)
            full = torch.full((n_rows,), pad, dtype=torch.long, device=device)
            full[rows] = token
            full_scalings = None
            if scalings is not None:
                full_scalings = scalings.new_zeros((n_rows, *scalings.shape[1:]))
                full_scalings[rows] = scalings
            yield GenerationStep(tokens=full, finished=finished.clone(), scalings=full_scalings)
            if stop_rows is not None:
                finished |= stop_rows.to(device)
            if bool(finished.all()):
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            step_ids = token[:, None]
            keep = (~finished[rows]).nonzero().squeeze(1)  # live rows, in batch positions
            if use_cache:
                images = {}  # in both caches now
            if keep.numel() < rows.numel():
                images = multimodal.select_rows(images, keep, rows.numel())
                rows, ids, mask, step_ids = rows[keep], ids[keep], mask[keep], step_ids[keep]
                rope_delta = rope_delta[keep] if rope_delta is not None else None
                last_scalings = last_scalings[keep] if last_scalings is not None else None
                _select_rows(cache_scaling, keep)
                _select_rows(cache_real, keep)


def generate(
    model: XLoraModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    reuse_scalings_after: int | None = None,
    streamer: Any = None,
    callback: Callable[[GenerationStep], None] | None = None,
    **images: Any,
) -> torch.Tensor:
    """Return `[B, T_prompt + new]` token ids (finished rows padded), like `transformers` generate.

    `eos_token_id` / `pad_token_id` default to the base model's generation_config (as transformers
    does: decoding stops at the model's end-of-turn token); `eos_token_id=[]` never stops early.
    `streamer` follows transformers' streamer protocol (`put`, `end`; e.g. `TextIteratorStreamer`
    for an iterator of text); `callback` receives every GenerationStep. `use_cache=False`
    recomputes both passes over the whole sequence every step (slow; for checking).
    `images`: a vision-language base's image inputs (`pixel_values=`, `image_grid_thw=` or
    `pixel_attention_mask=`, ...), used in the prefill of both passes (`xlora.core.multimodal`).
    Invalid options, an empty prompt, or prompt + `max_new_tokens` beyond the model's context
    (`max_position_embeddings`) raise a ValueError naming the argument.
    """
    opts = SamplingOptions(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        seed=seed,
    )
    opts = with_model_defaults(model, opts)
    opts.validate()
    multimodal.check_image_keywords(images, model.base)
    check_prompt(input_ids, attention_mask, context_length(model), max_new_tokens, vocab_size(model.base))
    new_tokens = []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    steps = iter_generate(model, input_ids, attention_mask, opts, use_cache, reuse_scalings_after, images=images)
    try:
        for step in steps:
            new_tokens.append(step.tokens)
            if streamer is not None:
                streamer.put(step.tokens.cpu())
            if callback is not None:
                callback(step)
    finally:  # a callback or streamer that raises must not leave the experts merged into the weights
        steps.close()
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids.to(model.device), torch.stack(new_tokens, dim=1)], dim=1)
