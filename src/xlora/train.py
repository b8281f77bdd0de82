"""Library entry points: `train_expert` (a PEFT LoRA adapter) and `train_gate` (the X-LoRA classifier)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from .data import TokenizedDataset
from .io import atomic_directory
from .training import Regulariser, Trainer, TrainingArgs

if TYPE_CHECKING:
    from .model import XLoraModel

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]


@dataclass
class LoraOptions:
    """The expert's LoRA shape (PEFT `LoraConfig` fields)."""

    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.05
    rslora: bool = False


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def train_expert(
    base: nn.Module,
    train_dataset: TokenizedDataset,
    eval_dataset: TokenizedDataset | None,
    args: TrainingArgs,
    lora: LoraOptions | None = None,
    pad_token_id: int = 0,
) -> list[dict]:
    """Train one LoRA adapter with PEFT and save it (atomically) as a PEFT adapter directory at
    `args.output_dir`. The base model is restored (unloaded) afterwards. Returns the step log."""
    from peft import LoraConfig, get_peft_model

    lora = lora or LoraOptions()
    torch.manual_seed(args.seed)  # LoRA A init
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=lora.targets,
        lora_dropout=lora.dropout,
        use_rslora=lora.rslora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    trainer = Trainer(peft_model, trainable, train_dataset, eval_dataset, args, pad_token_id)
    try:
        records = trainer.fit()
        if trainer.rank == 0:
            with atomic_directory(args.output_dir, overwrite=True) as tmp:
                peft_model.save_pretrained(tmp)
        _barrier()
    finally:
        peft_model.unload()
    return records


def gate_regulariser(model: XLoraModel, args: TrainingArgs) -> Regulariser | None:
    """Entropy and load-balancing terms on the scalings of the last forward, over real tokens."""
    if not (args.entropy_weight or args.balance_weight):
        return None
    if args.entropy_weight and not model.config.enable_softmax:
        raise ValueError("entropy_weight needs enable_softmax=True (scalings must be distributions)")

    def fn(attention_mask: torch.Tensor) -> torch.Tensor:
        s = model.get_latest_scalings()  # [B, T, L, N]
        m = attention_mask.to(s.dtype)[:, :, None]  # [B, T, 1]
        denom = m.sum() * s.shape[2]
        total = s.new_zeros(())
        if args.entropy_weight:
            ent = -(s * torch.log(s.clamp_min(1e-12))).sum(-1)  # [B, T, L]
            total = total + args.entropy_weight * (ent * m).sum() / denom
        if args.balance_weight:
            usage = (s * m[..., None]).sum(dim=(0, 1, 2)) / denom  # [N]
            total = total + args.balance_weight * usage.var(unbiased=False)
        return total

    return Regulariser(fn)


def train_gate(
    model: XLoraModel,
    train_dataset: TokenizedDataset,
    eval_dataset: TokenizedDataset | None,
    args: TrainingArgs,
    pad_token_id: int = 0,
) -> list[dict]:
    """Train only the classifier (next-token loss on the second pass) and save the X-LoRA
    checkpoint at `args.output_dir`. Returns the step log."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(
        model, trainable, train_dataset, eval_dataset, args, pad_token_id, regulariser=gate_regulariser(model, args)
    )
    records = trainer.fit()
    if trainer.rank == 0:
        model.save_pretrained(args.output_dir)
    _barrier()
    model.eval()
    return records
