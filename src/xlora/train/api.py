"""Library entry points: `train_expert` (a PEFT LoRA adapter) and `train_gate` (the X-LoRA classifier)."""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from xlora.core.checks import check_number
from xlora.core.experts import linear_shape
from xlora.core.multimodal import modules_outside_language_model
from xlora.formats.native import ADAPTER_FILES, atomic_directory, check_destination
from xlora.train.data import TokenizedDataset
from xlora.train.loop import Regulariser, Trainer, TrainingArgs, distributed
from xlora.train.run_state import folder_fingerprint, run_lock

if TYPE_CHECKING:
    from xlora.core.model import XLoraModel

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]


@dataclass
class LoraOptions:
    """The expert's LoRA shape (PEFT `LoraConfig` fields)."""

    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.05
    rslora: bool = False

    def __post_init__(self) -> None:
        """Refuse a shape PEFT would accept and training would then break on (NaN alpha, empty targets)."""
        where = "LoraOptions"
        check_number(where, "rank", self.rank, integer=True, low=1)
        check_number(where, "alpha", self.alpha, low=0, low_open=True)
        check_number(where, "dropout", self.dropout, low=0, high=1)
        if self.dropout == 1:
            raise ValueError(f"{where}: dropout: expected a number < 1 (1 drops every input), got 1")
        if not isinstance(self.rslora, bool):
            raise ValueError(f"{where}: rslora: expected true or false, got {self.rslora!r}")
        if not self.targets or not all(isinstance(t, str) and t.strip() for t in self.targets):
            raise ValueError(f"{where}: targets: expected module names such as q_proj, got {self.targets!r}")


def check_lora_targets(base: nn.Module, targets: list[str]) -> None:
    """Every target must name linear layers of the language model, the only ones an X-LoRA mixture
    can adapt; checked before training so that no run ends in an expert `from_experts` refuses."""
    modules = dict(base.named_modules())
    for target in targets:
        hits = [n for n in modules if n == target or n.endswith("." + target)]
        if not hits:
            raise ValueError(f"targets: {target!r} names no module of the base model (e.g. q_proj, v_proj)")
        wrong = [n for n in hits if linear_shape(modules[n]) is None]
        if wrong:
            kind = type(modules[wrong[0]]).__name__
            raise ValueError(
                f"targets: {target!r} matches {wrong[0]}, a {kind}; X-LoRA experts adapt linear layers only"
            )
        outside = modules_outside_language_model(base, hits)
        if outside:
            raise ValueError(
                f"targets: {target!r} matches {outside[0]}, outside the language model; X-LoRA mixes experts "
                "per token of the language model only"
            )


def base_identity(base: nn.Module) -> dict:
    """The base model for a run's identity: its architecture (config without paths and versions) and
    a fingerprint of its weights (the first 64 values of every frozen base tensor, in storage bytes:
    cheap on a 7B model, and different for any other checkpoint of the same architecture)."""
    config = getattr(base, "config", None)
    data = config.to_dict() if config is not None else {"class": type(base).__name__}
    data = {k: v for k, v in data.items() if not k.startswith("_") and k != "transformers_version"}
    text = json.dumps(data, sort_keys=True, default=str)
    weights = hashlib.sha256()
    for name, tensor in base.state_dict().items():
        if "lora_" in name or not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            continue  # LoRA layers PEFT injected for this very run, quantization metadata
        weights.update(name.split("base_layer.")[-1].encode())
        weights.update(tensor.detach().flatten()[:64].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "model_type": data.get("model_type"),
        "config_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
        "weights_sha256": weights.hexdigest()[:16],
    }


def is_quantized(model: nn.Module) -> bool:
    """True when the model holds bitsandbytes 8-bit / 4-bit layers (quantized storage, float compute)."""
    return any(type(m).__name__ in ("Linear8bitLt", "Linear4bit") for m in model.modules())


def check_outputs(args: TrainingArgs, kind: str) -> None:
    """Fail before training, not after hours, when the model (`kind`: "xlora" or "adapter") or the run
    directory cannot be written, or when saving the model would delete the run directory."""
    from xlora.formats.native import CheckpointError

    check_destination(args.output_dir, overwrite=True, replaces=kind)
    check_destination(args.run_path, overwrite=True, replaces=None)
    out, run = Path(args.output_dir).resolve(), args.run_path.resolve()
    if run == out or run.is_relative_to(out):
        raise CheckpointError(
            f"{args.run_path}: the run directory must not be --out ({args.output_dir}) or inside it: the final "
            "save replaces --out and would delete the run's checkpoints and metrics"
        )


def lock_run(args: TrainingArgs) -> AbstractContextManager[None]:
    """The run directory's lock (see `run_lock`), taken by the first process only (torchrun's others share it)."""
    return run_lock(args.run_path) if distributed()[1] == 0 else nullcontext()


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes transformers' `logits_to_keep` (most causal LMs since 4.45)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


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
    lora = lora or LoraOptions()
    check_lora_targets(base, lora.targets)
    check_outputs(args, "adapter")
    with lock_run(args):
        return _train_expert(base, train_dataset, eval_dataset, args, lora, pad_token_id)


def _train_expert(
    base: nn.Module,
    train_dataset: TokenizedDataset,
    eval_dataset: TokenizedDataset | None,
    args: TrainingArgs,
    lora: LoraOptions,
    pad_token_id: int,
) -> list[dict]:
    """`train_expert` with the run directory locked."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)  # LoRA A init
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=lora.targets,
        lora_dropout=lora.dropout,
        use_rslora=lora.rslora,
        task_type="CAUSAL_LM",
    )
    if is_quantized(base):  # QLoRA: PEFT's k-bit preparation (norms in fp32, input grads for checkpointing)
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    with warnings.catch_warnings():  # PEFT reads a transformers attribute renamed in 5.x: not the user's concern
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(base, config)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    identity = {"kind": "expert", "lora": asdict(lora), "base": base_identity(base)}
    trainer = Trainer(
        peft_model,
        trainable,
        train_dataset,
        eval_dataset,
        args,
        pad_token_id,
        identity=identity,
        answer_logits_only=_keeps_logits(base),
    )
    try:
        records = trainer.fit()
        if trainer.rank == 0:
            with atomic_directory(args.output_dir, overwrite=True, replaces="adapter") as tmp:
                peft_model.save_pretrained(tmp)
        _barrier()
    finally:
        peft_model.unload()
    return records


def route_indices(model: XLoraModel, dataset: TokenizedDataset, only: list[str] | None = None) -> dict[str, int]:
    """Routing label -> expert index ("base" -> -1, no expert) for the labels the prior reads (`only`, or
    every one); a label that is no expert, none read at all, or "base" under softmax scalings (they sum
    to 1, so "no expert" is out of reach) is a ValueError naming the file and line."""
    names = list(model.expert_names)
    if "base" in names:
        raise ValueError('an expert is named "base", which routing labels reserve for "no expert": rename it')
    known = {name: i for i, name in enumerate(names)} | {"base": -1}
    for name in only or []:
        if name not in known:
            raise ValueError(f'route_only: {name!r} is not one of this model\'s experts {names} or "base"')
    read = {k: v for k, v in known.items() if only is None or k in only}
    where = getattr(dataset, "source", None) or "training data"
    for i, ex in enumerate(dataset.examples):
        at = f"{where}:{dataset.example_lines[i]}" if getattr(dataset, "example_lines", None) else where
        if ex.route is not None and ex.route not in known:
            raise ValueError(f"{at}: 'expert' {ex.route!r} is not one of this model's experts {names} or \"base\"")
        if ex.route == "base" and "base" in read and model.config.enable_softmax:
            raise ValueError(
                f"{at}: 'expert' \"base\" (no expert) cannot be reached with softmax scalings, which sum to 1: "
                "train the gate without softmax (--no-softmax) or label these records with an expert"
            )
    if all(ex.route is None for ex in dataset.examples):
        raise ValueError(f"{where}: route_weight > 0 needs records with an 'expert' field; none has one")
    if all(ex.route not in read for ex in dataset.examples):
        raise ValueError(f"{where}: no record's 'expert' is one of route_only {sorted(read)}")
    return read


def gate_regulariser(model: XLoraModel, args: TrainingArgs, dataset: TokenizedDataset) -> Regulariser | None:
    """Entropy and load-balancing terms (means over each micro-batch's real tokens) and the routing prior
    (a mean over every labelled token of the global batch) on the scalings of the last forward."""
    if not (args.entropy_weight or args.balance_weight or args.route_weight):
        return None
    if args.entropy_weight and not model.config.enable_softmax:
        raise ValueError("entropy_weight needs enable_softmax=True (scalings must be distributions)")

    def fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        s = model.get_latest_scalings()  # [B, T, L, N]
        m = batch["attention_mask"].to(s.dtype)[:, :, None]  # [B, T, 1]
        denom = m.sum() * s.shape[2]
        total = s.new_zeros(())
        if args.entropy_weight:
            ent = -(s * torch.log(s.clamp_min(1e-12))).sum(-1)  # [B, T, L]
            total = total + args.entropy_weight * (ent * m).sum() / denom
        if args.balance_weight:
            usage = (s * m[..., None]).sum(dim=(0, 1, 2)) / denom  # [N]
            total = total + args.balance_weight * usage.var(unbiased=False)
        return total

    def summed(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        err, _ = routing_error(model.get_latest_scalings(), batch["attention_mask"], batch["route"])
        return args.route_weight * err

    def norm(batch: dict[str, torch.Tensor]) -> float:
        return float((batch["attention_mask"] * (batch["route"] >= -1)[:, None]).sum())

    plain = fn if (args.entropy_weight or args.balance_weight) else None
    if not args.route_weight:
        return Regulariser(plain)
    return Regulariser(plain, summed, norm, route_indices(model, dataset, args.route_only))


def routing_error(
    scalings: torch.Tensor, attention_mask: torch.Tensor, route: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the real tokens of labelled rows of the layer-mean of sum_n (s_n - target_n)^2, how many
    such tokens). The target is one-hot on the row's expert (`route` >= 0) or all zeros (-1, the base
    alone); rows at -2 are unlabelled. Why: next-token loss alone left the gate mixing three molecule
    experts on a property question."""
    n = scalings.shape[-1]
    target = torch.nn.functional.one_hot(route.clamp_min(0), n).float() * (route >= 0)[:, None]  # [B, N]
    m = attention_mask.float() * (route >= -1)[:, None]  # [B, T]: real tokens of labelled rows
    err = ((scalings.float() - target[:, None, None, :]) ** 2).sum(-1).mean(-1)  # [B, T]
    return (err * m).sum(), m.sum()


def routing_prior(scalings: torch.Tensor, attention_mask: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """The routing prior of one batch: `routing_error`'s mean per labelled token (0 when none is labelled)."""
    err, count = routing_error(scalings, attention_mask, route)
    return err / count.clamp_min(1)


def train_gate(
    model: XLoraModel,
    train_dataset: TokenizedDataset,
    eval_dataset: TokenizedDataset | None,
    args: TrainingArgs,
    pad_token_id: int = 0,
) -> list[dict]:
    """Train only the classifier (next-token loss on the second pass) and save the X-LoRA
    checkpoint at `args.output_dir`. Returns the step log."""
    check_outputs(args, "xlora")
    with lock_run(args):
        return _train_gate(model, train_dataset, eval_dataset, args, pad_token_id)


def _train_gate(
    model: XLoraModel,
    train_dataset: TokenizedDataset,
    eval_dataset: TokenizedDataset | None,
    args: TrainingArgs,
    pad_token_id: int,
) -> list[dict]:
    """`train_gate` with the run directory locked."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    experts = [
        {"name": name, "sha256": folder_fingerprint(model.expert_sources[name][0], ADAPTER_FILES[:3])[:16]}
        for name in model.expert_names
    ]
    identity = {"kind": "gate", "gate": model.config.to_dict(), "experts": experts, "base": base_identity(model.base)}
    trainer = Trainer(
        model,
        trainable,
        train_dataset,
        eval_dataset,
        args,
        pad_token_id,
        regulariser=gate_regulariser(model, args, train_dataset),
        identity=identity,
    )
    records = trainer.fit()
    if trainer.rank == 0:
        model.save_pretrained(args.output_dir)
    _barrier()
    model.eval()
    return records
