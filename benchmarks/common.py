"""Shared set-up for the benchmarks: the tiny Llama of the core issue and N random PEFT experts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(path: Path) -> Path:
    """hidden 512, 8 layers, vocab 32000 (the size named in the core issue), a Llama-shaped MLP
    (intermediate 1408 = 2.75 x hidden) and 8 heads of 64."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=1024,
        use_cache=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load(path: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.config.use_cache = False
    return model


def make_experts(base_dir: Path, root: Path, n: int = 8, rank: int = 16) -> dict[str, Path]:
    """n PEFT LoRA adapters of the given rank on all seven projections, random non-zero weights."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        pm = get_peft_model(load(base_dir), cfg)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.1)
        pm.save_pretrained(root / f"expert{i}")
        out[f"expert{i}"] = root / f"expert{i}"
    return out


def sync() -> None:
    """Wait for queued GPU work, so a wall-clock time covers it (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def paired_times(
    fns: dict[str, Callable[[], object]], reference: str, runs: int = 5, warmup: int = 1
) -> dict[str, tuple[float, float, float, float]]:
    """Time every function once per round, rounds in rotating order, and return per name the median
    wall time, and the median, min and max over rounds of its time / `reference`'s in the same round.

    Pairing makes the ratios robust to this shared machine's drifting speed (the same matmul runs
    at 95-150 GFLOPS from one minute to the next): both sides of a ratio see the same minute."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    ref = times[reference]
    out = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, ref)]
        out[name] = (statistics.median(ts), statistics.median(ratios), min(ratios), max(ratios))
    return out


def median_time(fn: Callable[[], object], runs: int = 5, warmup: int = 1) -> float:
    """Median wall time in seconds over `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
