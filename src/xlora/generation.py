"""Decoding with one KV cache per pass (DESIGN.md: why two caches are exact).

Prefill runs the scaling pass, the classifier and the real pass over the prompt; every step then
feeds only the new token through the scaling pass (cache 1), the classifier, and the real pass
(cache 2). With `reuse_scalings_after=k` the scaling pass stops after k new tokens and each
sequence keeps its last scalings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .model import cache_kwargs

if TYPE_CHECKING:
    from .model import XLoraModel


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
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k: expected >= 1, got {self.top_k}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty: expected > 0, got {self.repetition_penalty}")

    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
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


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from an attention mask, as `generate` derives them (padding clamped to 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _uncached_logits(model: XLoraModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Recompute everything over the whole sequence (what PEFT does); returns last logits `[B, V]`."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask))
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
) -> Iterator[GenerationStep]:
    """Yield one GenerationStep per new token until every sequence ended or max_new_tokens.

    Finished rows leave the batch (both KV caches shrink), so the cost follows the live rows.
    `stop_rows` `[B]` bool may be set True by the caller between steps (a stop string was seen, a
    client went away): that row counts as finished from the next step on.
    """
    opts = options or SamplingOptions()
    opts.validate()
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

    with torch.no_grad():
        for step in range(opts.max_new_tokens):
            inputs = {"input_ids": step_ids, "attention_mask": mask}
            pos = _positions(mask)[:, -step_ids.shape[1] :]
            if not use_cache:
                logits = _uncached_logits(model, ids, mask)
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
                with model.apply_scalings(scalings_seq):
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
            if keep.numel() < rows.numel():
                rows, ids, mask, step_ids = rows[keep], ids[keep], mask[keep], step_ids[keep]
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
) -> torch.Tensor:
    """Return `[B, T_prompt + new]` token ids (finished rows padded), like `transformers` generate.

    `streamer` follows transformers' streamer protocol (`put`, `end`; e.g. `TextIteratorStreamer`
    for an iterator of text); `callback` receives every GenerationStep. `use_cache=False`
    recomputes both passes over the whole sequence every step (slow; for checking).
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
    new_tokens = []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for step in iter_generate(model, input_ids, attention_mask, opts, use_cache, reuse_scalings_after):
        new_tokens.append(step.tokens)
        if streamer is not None:
            streamer.put(step.tokens.cpu())
        if callback is not None:
            callback(step)
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids.to(model.device), torch.stack(new_tokens, dim=1)], dim=1)
