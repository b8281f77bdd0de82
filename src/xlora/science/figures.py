"""Routing figures (matplotlib PNG): layer x expert heatmaps and expert weight along an answer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LOG_FIGURES = ("scalings_heatmap.png", "scalings_tokens.png")  # what `plot_log` writes


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmaps(panels: list[tuple[str, torch.Tensor]], experts: list[str], path: Path) -> Path:
    """One panel per (title, scalings [L, N]): adapted module (rows) x expert (columns)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 6), squeeze=False)
    for ax, (title, s) in zip(axes[0], panels):
        lo = min(float(s.min()), 0.0)  # unconstrained (no-softmax) scalings can be negative
        im = ax.imshow(s.float().numpy(), aspect="auto", cmap="viridis", vmin=lo, vmax=max(float(s.max()), lo + 1e-6))
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("adapted module (0 = first)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("mean scaling over the prompt")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def token_weights(panels: list[tuple[str, list[str], torch.Tensor]], experts: list[str], path: Path) -> Path:
    """One panel per (title, tokens, weights [T, N]): each expert's weight along a generated answer."""
    plt = _plt()
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), squeeze=False)
    for ax, (title, tokens, w) in zip(axes[:, 0], panels):
        for j, name in enumerate(experts):
            ax.plot(range(len(tokens)), w[:, j].float().numpy(), marker=".", label=name)
        ax.set_xticks(range(len(tokens)), [t.replace("$", r"\$") for t in tokens], rotation=90, fontsize=6)
        ax.set_ylabel("weight")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def routing_for(model, tok, prompt: str, max_new_tokens: int) -> tuple[torch.Tensor, list[str], torch.Tensor, str]:
    """(mean scalings over the prompt [L, N], answer tokens, per-token weights [T, N], answer)."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    steps: list = []
    prompt: list[torch.Tensor] = []

    def on_step(step) -> None:
        if not prompt:  # right after the prefill the latest scalings are the prompt's: no second forward
            prompt.append(model.get_latest_scalings()[0].mean(0))  # [L, N]
        steps.append(step)

    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        callback=on_step,
    )
    prompt_mean = prompt[0]
    new = out[0, ids.shape[1] :].tolist()
    keep = [i for i, t in enumerate(new) if t != tok.eos_token_id and t != tok.pad_token_id]
    tokens = [tok.decode([new[i]]) for i in keep]
    weights = torch.stack([steps[i].scalings[0].mean(0) for i in keep]) if keep else torch.zeros(0, model.n_experts)
    return prompt_mean, tokens, weights, tok.decode([new[i] for i in keep], skip_special_tokens=True)


def write_figures(checkpoint: Path, data_dir: Path, out_dir: Path | None = None, base: str = "default") -> list[Path]:
    """Figures for the first held-out prompt of every task."""
    from xlora.bases.loading import load_base
    from xlora.core.model import XLoraModel
    from xlora.science.recipe.config import MAX_NEW_TOKENS
    from xlora.science.tasks import TASKS

    out_dir = out_dir or checkpoint / "figures"
    base_model, tok = load_base(base)
    model = XLoraModel.from_pretrained(base_model, checkpoint)
    heat, lines = [], []
    for task in TASKS:
        first = json.loads((data_dir / f"{task}-eval.jsonl").read_text().splitlines()[0])
        mean, tokens, weights, _ = routing_for(model, tok, first["prompt"], MAX_NEW_TOKENS[task])
        heat.append((task, mean))
        lines.append((f"{task}: {first['prompt'][:70]}", tokens, weights))
    return [
        heatmaps(heat, model.expert_names, out_dir / "routing_heatmap.png"),
        token_weights(lines, model.expert_names, out_dir / "routing_tokens.png"),
    ]


def plot_log(log: Path, out_dir: Path) -> list[Path]:
    """Figures from a `flush_log_scalings` output: mean heatmap and the per-token weights of the
    single-token entries (generation steps) of batch row 0."""
    from xlora.core.scalings_log import load_scalings_log

    entries, meta = load_scalings_log(log)
    if not entries:
        raise ValueError(f"{log}: the scalings log is empty")
    experts = meta["expert_names"]
    stacked = torch.cat([e[0] for e in entries], 0)  # [sum T, L, N]
    paths = [heatmaps([("all logged tokens", stacked.mean(0))], experts, out_dir / LOG_FIGURES[0])]
    steps = [e[0, -1].mean(0) for e in entries if e.shape[1] == 1]
    if steps:
        w = torch.stack(steps)
        paths.append(
            token_weights([("generation steps", [str(i) for i in range(len(w))], w)], experts, out_dir / LOG_FIGURES[1])
        )
    return paths
