"""`xlora eval`: one checkpoint (and, with baselines, the base model, each single expert and the
uniform mix) on one task file, every metric with its 95% bootstrap interval and n.

Each model's score keeps its per-item values, so X-LoRA minus the best single expert is a *paired*
difference on the same items (stats.paired_difference), not two intervals compared by eye. The
"best" expert is picked per metric by its point estimate on these same items, which flatters the
expert a little: a difference in X-LoRA's favour is, if anything, understated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from xlora.science.eval.decoding import DecodeOptions, decode_answers
from xlora.science.eval.stats import DEFAULT_RESAMPLES, Interval, bootstrap_mean, paired_available, paired_difference
from xlora.science.tasks import MAE_METRICS, Item, check_items, outcomes

XLORA = "X-LoRA"
LOSS = "eval_loss"
LOWER_IS_BETTER = (*MAE_METRICS, LOSS)


@dataclass
class EvalOptions:
    """How `xlora eval` scores: generation length, loss truncation and the bootstrap."""

    max_new_tokens: int = 32
    max_length: int = 128  # tokens per item for the loss (longer items are cut, as in training)
    batch_size: int = 8
    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    train_smiles: set[str] | None = None  # canonical training SMILES, for the novelty rate
    decoding: DecodeOptions = field(default_factory=DecodeOptions)  # greedy, or sample-and-check


@dataclass
class ModelScore:
    """One model's per-item values (metric -> values, None = unparsed), intervals and loss weights."""

    name: str
    values: dict[str, list[float | None]]
    intervals: dict[str, Interval]
    loss_tokens: list[int] = field(default_factory=list)  # [n_items]: answer tokens of each item


@dataclass
class Scorecard:
    """Every model's score on one task file, and X-LoRA minus the best single expert per metric."""

    task: str
    n_items: int
    n_generated: int
    models: list[ModelScore]
    differences: dict[str, tuple[str, Interval]]  # metric -> (best expert's name, paired interval)
    decoding: str = "greedy"  # how the answers were decoded, for the table's header


@torch.no_grad()
def item_losses(model, tok, items: list[Item], max_length: int, batch_size: int = 8) -> list[tuple[float, int]]:
    """(mean cross-entropy of the answer's tokens, number of them) per item, chat template as in
    training; the token-weighted mean of these is `evaluate.eval_loss` on the same records."""
    from xlora.train.data import IGNORE, collate, encode_record

    examples = []
    for n, it in enumerate(items):
        record = {"messages": [{"role": "user", "content": it.prompt}, {"role": "assistant", "content": it.answer}]}
        ex = encode_record(tok, record, f"item {n + 1}")
        ex.input_ids, ex.labels = ex.input_ids[:max_length], ex.labels[:max_length]
        examples.append(ex)
    out: list[tuple[float, int]] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], tok.pad_token_id or 0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]  # [B, T-1]
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(labels.shape)  # [B, T-1]
        counts = (labels != IGNORE).sum(1)  # [B]
        for total, count in zip(ce.sum(1).tolist(), counts.tolist()):
            out.append((total / count if count else 0.0, int(count)))
    return out


def _interval(metric: str, values: list[float | None], weights: list[int] | None, opts: EvalOptions) -> Interval:
    """A metric's interval; an MAE uses the parsed items only and is n/a unless half of them parse."""
    kept = [(v, w) for v, w in zip(values, weights or [1] * len(values)) if v is not None and w > 0]
    if not kept or (metric in MAE_METRICS and 2 * len(kept) < len(values)):
        return Interval(math.nan, math.nan, math.nan, len(kept))
    vs, ws = [v for v, _ in kept], [w for _, w in kept]
    return bootstrap_mean(vs, ws if weights else None, resamples=opts.resamples, seed=opts.seed)


def score_model(model, tok, name: str, task: str, items: list[Item], opts: EvalOptions) -> ModelScore:
    """Generate answers to the items not marked `loss_only`, score them, and take every item's loss."""
    generated = [it for it in items if not it.meta.get("loss_only")]
    answers = (
        decode_answers(model, tok, task, generated, opts.max_new_tokens, opts.decoding, opts.batch_size)
        if generated
        else []
    )
    values = outcomes(task, generated, answers, opts.train_smiles) if generated else {}
    losses = item_losses(model, tok, items, opts.max_length, opts.batch_size)
    values[LOSS] = [loss for loss, _ in losses]
    tokens = [n for _, n in losses]
    intervals = {m: _interval(m, v, tokens if m == LOSS else None, opts) for m, v in values.items()}
    return ModelScore(name, values, intervals, tokens)


def model_variants(model) -> dict[str, object]:
    """Baselines first, X-LoRA last: name -> a context manager factory putting the model in that mode."""
    from xlora.science.eval.evaluate import variants

    out = variants(model)
    out[XLORA] = out.pop("X-LoRA (trained gate)")
    return out


def paired_vs_best_expert(scores: list[ModelScore], opts: EvalOptions) -> dict[str, tuple[str, Interval]]:
    """metric -> (the best single expert there, interval of X-LoRA minus it on the same items)."""
    xlora = next((s for s in scores if s.name == XLORA), None)
    experts = [s for s in scores if s.name.startswith("expert ")]
    if xlora is None or not experts:
        return {}
    out = {}
    for metric, values in xlora.values.items():
        ranked = [s for s in experts if not math.isnan(s.intervals[metric].estimate)]
        if not ranked or math.isnan(xlora.intervals[metric].estimate):
            continue
        sign = 1 if metric in LOWER_IS_BETTER else -1
        best = min(ranked, key=lambda s: sign * s.intervals[metric].estimate)
        if metric == LOSS:  # token-weighted, every item counts
            diff = paired_difference(
                values, best.values[metric], xlora.loss_tokens, resamples=opts.resamples, seed=opts.seed
            )
        else:
            a, b = paired_available(values, best.values[metric])
            if not a:
                continue
            diff = paired_difference(a, b, resamples=opts.resamples, seed=opts.seed)
        out[metric] = (best.name, diff)
    return out


def parse_models(text: str) -> list[str]:
    """`--models` text -> names: comma-separated, blanks dropped; empty is an error."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ValueError(f"models: expected comma-separated names (base, uniform or experts), got {text!r}")
    return names


def select_variants(model, baselines: bool, only: list[str] | None = None) -> dict[str, object]:
    """X-LoRA, plus every baseline (`baselines`) or just the ones named in `only` ("base", "uniform",
    or an expert's name): a subset saves time when the other baselines were scored before."""
    every = model_variants(model)
    if only is None:
        return every if baselines else {XLORA: every[XLORA]}
    names = {"base": "base", "uniform": "uniform mix (1/N)"} | {n: f"expert {n}" for n in model.expert_names}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"models: unknown {', '.join(unknown)}; expected base, uniform or one of the experts "
                         f"{', '.join(model.expert_names)}")  # fmt: skip
    wanted = {names[n] for n in only} | {XLORA}
    return {name: mode for name, mode in every.items() if name in wanted}


def evaluate_checkpoint(
    model,
    tok,
    task: str,
    items: list[Item],
    opts: EvalOptions,
    baselines: bool = False,
    progress=None,
    only: list[str] | None = None,
) -> Scorecard:
    """Score the X-LoRA `model` (and with `baselines` the base, single experts, uniform mix, or the
    baselines named in `only`) on `items`. `progress(name)` is called before each model."""
    if not items:
        raise ValueError(f"no items for task {task}")
    check_items(task, items)  # before any answer is generated
    modes = select_variants(model, baselines, only)
    scores = []
    for name, mode in modes.items():
        if progress is not None:
            progress(name)
        with mode():
            scores.append(score_model(model, tok, name, task, items, opts))
    n_generated = sum(not it.meta.get("loss_only") for it in items)
    d = opts.decoding
    how = {
        "checked": f"checked (greedy + {d.samples} samples at T={d.temperature})",
        "constrained": "constrained (greedy; design answers held to the prompt's form)",
        "constrained-checked": f"constrained-checked (greedy + {d.samples} samples at T={d.temperature}, "
        "design answers held to the prompt's form)",
    }.get(d.mode, d.mode)
    return Scorecard(task, len(items), n_generated, scores, paired_vs_best_expert(scores, opts), how)


def scorecard_table(card: Scorecard) -> str:
    """Markdown: one row per metric and model (mean, 95% interval, n), then X-LoRA minus the best
    single expert as a paired difference."""
    lines = [
        f"task {card.task}: {card.n_items} items scored by loss, {card.n_generated} answers generated "
        f"({card.decoding} decoding); 95% percentile bootstrap intervals",
        "",
        "| metric | model | mean | 95% interval | n |",
        "|---|---|---:|---:|---:|",
    ]
    metrics = list(card.models[0].values)
    for metric in metrics:
        better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
        for s in card.models:
            iv = s.intervals[metric]
            lines.append(f"| {metric} ({better}) | {s.name} | {_cells(iv)} |")
        if metric in card.differences:
            best, iv = card.differences[metric]
            better = (iv.high < 0) if metric in LOWER_IS_BETTER else (iv.low > 0)
            verdict = (
                ("X-LoRA clearly better" if better else "X-LoRA clearly worse")
                if iv.excludes_zero
                else "no clear difference"
            )
            lines.append(f"| {metric} | {XLORA} minus {best} (paired, {verdict}) | {_cells(iv, signed=True)} |")
    return "\n".join(lines)


def paired_rows(a: ModelScore, b: ModelScore, opts: EvalOptions, label: str) -> list[str]:
    """Markdown rows: per metric, model `a` minus model `b` on the same items (paired; the loss
    token-weighted), for comparing two gates or two recipes."""
    rows = [f"| metric | {label} [95 % CI] | n |", "|---|---:|---:|"]
    for metric, values in a.values.items():
        if metric == LOSS:
            d = paired_difference(values, b.values[metric], a.loss_tokens, resamples=opts.resamples, seed=opts.seed)
        else:
            x, y = paired_available(values, b.values[metric])
            if not x:
                continue
            d = paired_difference(x, y, resamples=opts.resamples, seed=opts.seed)
        rows.append(f"| {metric} | {d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}] | {d.n} |")
    return rows


def _cells(iv: Interval, signed: bool = False) -> str:
    if iv.n == 0 or math.isnan(iv.estimate):
        return f"n/a | - | {iv.n}"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(iv.estimate)} | [{f.format(iv.low)}, {f.format(iv.high)}] | {iv.n}"


__all__ = [
    "EvalOptions", "Scorecard", "evaluate_checkpoint", "item_losses", "paired_rows", "scorecard_table",
    "select_variants",
]  # fmt: skip
