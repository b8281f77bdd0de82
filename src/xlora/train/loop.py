"""One training loop for LoRA experts and for the X-LoRA gate.

What it guarantees:
- A run is a function of (data, args, seed): the order of examples in epoch e is a permutation
  seeded by `seed + e`, and step s always consumes the same global batch. Resuming therefore only
  needs the step counter, the trainable weights, the optimiser, the scheduler and the RNG state,
  all of which a checkpoint holds (written atomically every `save_every` steps).
- The loss of a step is the sum of token cross-entropies over the *global* batch divided by its
  number of loss tokens, so gradient accumulation and data parallelism (torchrun, DDP) give the
  same update as one process with the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from xlora.formats.atomic import remove_leftovers
from xlora.train.data import IGNORE, TokenizedDataset, collate
from xlora.train.run_state import (
    RunError,
    check_run_identity,
    dataset_fingerprint,
    find_checkpoint,
    read_checkpoint_files,
    routes_fingerprint,
    truncate_metrics,
    write_checkpoint,
    write_run_identity,
)

SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainingArgs:
    """Options shared by expert and gate training."""

    output_dir: str
    run_dir: str | None = None  # checkpoints + metrics.jsonl; default: "<output_dir>-run"
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8  # per process and micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    save_every: int | None = None
    seed: int = 0
    precision: str = "auto"
    resume: bool | str = False  # True: continue the run (error if it has no checkpoint); "auto": if it has one
    entropy_weight: float = 0.0  # gate only: + w * mean scalings entropy (w > 0 sharper, w < 0 smoother)
    balance_weight: float = 0.0  # gate only: + w * variance over experts of their mean weight
    # gate only: + w * mean squared distance of each token's scalings from its record's "expert" (one-hot;
    # all zeros for "base"); records without one add nothing
    route_weight: float = 0.0
    # gate only: the routing labels the prior reads (expert names and/or "base"); other labels count as
    # unsaid. None: every label. Why: a prior on one task's records alone, leaving the gate free elsewhere
    route_only: list[str] | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.epochs > 0, "epochs", "> 0"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps", ">= 1"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.grad_accum >= 1, "grad_accum", ">= 1"),
            (self.lr > 0, "lr", "> 0"),
            (self.scheduler in SCHEDULERS, "scheduler", f"one of {SCHEDULERS}"),
            (self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}"),
            (self.warmup_steps >= 0, "warmup_steps", ">= 0"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "> 0 or None"),
            (self.resume in (True, False, "auto"), "resume", "True, False or 'auto'"),
            (_is_weight(self.route_weight), "route_weight", "a finite number >= 0"),
            (_is_names(self.route_only), "route_only", "None or a non-empty list of expert names and/or 'base'"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"TrainingArgs.{name}: expected {expected}, got {getattr(self, name)!r}")
        if self.route_only is not None and not self.route_weight:
            raise ValueError("TrainingArgs.route_only: names the labels a routing prior reads; set route_weight > 0")

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(f"{self.output_dir}-run")

    def identity(self) -> dict:
        """The arguments that decide what a run computes (a resume must not change them)."""
        volatile = ("output_dir", "run_dir", "resume", "progress", "eval_every", "save_every")
        out = {k: v for k, v in asdict(self).items() if k not in volatile}
        if not out["route_weight"]:  # added in v0.12: runs started before it (at 0) still resume
            del out["route_weight"]
        if out["route_only"] is None:  # added in v0.13, likewise
            del out["route_only"]
        else:
            out["route_only"] = sorted(set(out["route_only"]))
        return out


def _is_names(value: object) -> bool:
    """None, or a non-empty list / tuple of non-empty strings."""
    if value is None:
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) and v for v in value)


def _is_weight(value: object) -> bool:
    """A finite float >= 0 (not a bool, not an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:
        return False


def distributed() -> tuple[int, int]:
    """(world size, rank); initialises torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def _all_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16/fp16 autocast when asked and the device supports it; 'auto' = bf16 on capable GPUs."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision in ("auto", "bf16"):
            return (
                torch.bfloat16 if torch.cuda.is_bf16_supported() else (torch.float16 if precision == "bf16" else None)
            )
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16  # CPU bf16 autocast: slower on most CPUs, but asked for explicitly
    return None  # fp16 autocast on CPU is not supported; auto on CPU stays fp32


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies and the number of loss tokens."""
    shift_logits = logits[:, :-1].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:]  # [B, T-1]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((shift_labels != IGNORE).sum())


@dataclass
class Regulariser:
    """Extra loss from the last forward (gate training), in two forms: `fn`, a mean over the micro-batch,
    weighted by its share of the global batch's loss tokens; `summed`, a sum over the micro-batch divided
    by `norm` summed over the whole global batch (so the term does not change with how the batch is split
    into micro-batches and processes)."""

    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None  # micro-batch (collate's dict) -> scalar
    summed: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None  # micro-batch -> summed scalar
    norm: Callable[[dict[str, torch.Tensor]], float] | None = None  # micro-batch -> its share of the divisor
    routes: dict[str, int] | None = None  # routing label -> expert index, when the batches need `route`


class Trainer:
    """The loop; `model(input_ids, attention_mask)` must return an object with `.logits`."""

    def __init__(
        self,
        model: nn.Module,
        trainable: dict[str, nn.Parameter],
        train_ds: TokenizedDataset,
        eval_ds: TokenizedDataset | None,
        args: TrainingArgs,
        pad_id: int,
        regulariser: Regulariser | None = None,
        identity: dict | None = None,
        answer_logits_only: bool = False,
    ) -> None:
        """`identity`: what the run trains beyond its arguments (model, experts, base), JSON-able;
        stored in the run directory and compared on resume. `answer_logits_only`: the model accepts
        transformers' `logits_to_keep`, so the LM head runs only where a loss is taken (same loss,
        ~25 % faster on a short-answer task, where the vocabulary projection of every prompt token
        is wasted)."""
        self.args, self.pad_id, self.regulariser = args, pad_id, regulariser
        self.answer_logits_only = answer_logits_only
        self.extra_identity = identity or {}
        self.world, self.rank = distributed()
        self.module = model
        self.trainable = trainable
        self.device = next(iter(trainable.values())).device
        self.model = model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        self.train_ds, self.eval_ds = train_ds, eval_ds
        self.global_batch = args.batch_size * args.grad_accum * self.world
        self.steps_per_epoch = len(train_ds) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"training data has {len(train_ds)} examples, fewer than one global batch "
                f"({args.batch_size} x {args.grad_accum} accumulation x {self.world} processes)"
            )
        self.total_steps = args.max_steps or max(1, math.floor(args.epochs * self.steps_per_epoch))
        from transformers import get_scheduler

        self.optimizer = torch.optim.AdamW(list(trainable.values()), lr=args.lr, weight_decay=args.weight_decay)
        self.scheduler = get_scheduler(
            args.scheduler if args.scheduler != "constant" else "constant_with_warmup",
            self.optimizer,
            num_warmup_steps=args.warmup_steps,
            num_training_steps=self.total_steps,
        )
        self.amp = autocast_dtype(args.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.step = 0

    # ------------------------------------------------------------------ data order

    def batch_indices(self, step: int) -> list[list[int]]:
        """This process's micro-batches (lists of example indices) for optimizer step `step`."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(self.args.seed + epoch)
        perm = torch.randperm(len(self.train_ds), generator=gen)
        chunk = perm[offset * self.global_batch : (offset + 1) * self.global_batch].tolist()
        b = self.args.batch_size
        return [
            chunk[(j * self.world + self.rank) * b : (j * self.world + self.rank + 1) * b]
            for j in range(self.args.grad_accum)
        ]

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        return self.args.run_path / "checkpoint"

    def run_identity(self) -> dict:
        """Everything that must be equal for a resumed run to continue the same run."""
        return {
            "args": self.args.identity(),
            "world_size": self.world,
            "data": {"examples": len(self.train_ds), "sha256": dataset_fingerprint(self.train_ds)}
            | self._routes_identity(),
            **self.extra_identity,
        }

    def _routes_identity(self) -> dict:
        """The routing labels, when the run trains on them (a routing prior); else nothing, so labels that
        no term reads do not stop a resume."""
        if self.regulariser is None or self.regulariser.routes is None:
            return {}
        return {"routes_sha256": routes_fingerprint(self.train_ds)}

    def save_state(self) -> None:
        if self.rank == 0:
            state = {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
            }
            if torch.cuda.is_available():
                state["cuda_rng"] = torch.cuda.get_rng_state_all()
            write_checkpoint(self.args.run_path, self.step, self.trainable, state)
        if dist.is_initialized():
            dist.barrier()

    def _found_checkpoint(self) -> tuple[Path, int] | None:
        """Rank 0 recovers the newest complete checkpoint (after a kill mid-save); then all read it."""
        found = find_checkpoint(self.args.run_path) if self.rank == 0 else None
        if dist.is_initialized():
            dist.barrier()
            if self.rank != 0:
                found = find_checkpoint(self.args.run_path)
        return found

    def load_state(self, folder: Path) -> None:
        weights, state = read_checkpoint_files(folder)
        missing = sorted(set(self.trainable) - set(weights))
        if missing:
            raise RunError(
                f"{folder}: checkpoint is of another model (it lacks {missing[:3]}); "
                "delete it or train into another run directory"
            )
        wrong = [k for k, p in self.trainable.items() if weights[k].shape != p.shape]
        if wrong:
            k = wrong[0]
            raise RunError(
                f"{folder}: checkpoint is of another model ({k} is {list(weights[k].shape)}, "
                f"expected {list(self.trainable[k].shape)}); delete it or train into another run directory"
            )
        with torch.no_grad():
            for k, p in self.trainable.items():
                p.copy_(weights[k].to(p.device, p.dtype))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"].cpu())
            random.setstate(state["python_rng"])
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise RunError(f"{folder}: optimiser/scheduler/RNG state does not fit this run ({e})") from None
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])

    def start(self) -> None:
        """Resume (checking that nothing changed) or start afresh (clearing the run's old files)."""
        run = self.args.run_path
        identity = self.run_identity()
        found = self._found_checkpoint() if self.args.resume else None
        if self.args.resume is True and found is None:
            raise RunError(f"{run}: --resume given but there is no checkpoint to resume from (drop --resume)")
        if found is not None:
            check_run_identity(run, identity)
            folder, step = found
            self.load_state(folder)
            if self.rank == 0:
                dropped = truncate_metrics(run, step)
                note = f"; dropped {dropped} metrics rows past it" if dropped else ""
                print(f"resumed from {folder} at step {step}/{self.total_steps}{note}")
            return
        if self.rank == 0:
            _remove(run / "metrics.jsonl")
            remove_leftovers(self.checkpoint_dir)  # the saver's own leftovers only, never a user's folder
            _remove(self.checkpoint_dir)  # a fresh run never resumes into another run's checkpoint
            write_run_identity(run, identity)
        if dist.is_initialized():
            dist.barrier()

    def log(self, record: dict) -> None:
        if self.rank == 0:
            self.args.run_path.mkdir(parents=True, exist_ok=True)
            with (self.args.run_path / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ steps

    def _forward_ce(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        extra = {}
        if self.answer_logits_only:  # positions whose next token carries a loss, in any row: [K]
            keep = (batch["labels"][:, 1:] != IGNORE).any(0).nonzero().flatten()
            extra["logits_to_keep"] = keep
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
        if not self.answer_logits_only:
            return token_ce_sum(out.logits, batch["labels"])
        target = batch["labels"][:, keep + 1]  # [B, K]: the token each kept logit predicts
        logits = out.logits.float()  # [B, K, V]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        return loss, int((target != IGNORE).sum())

    def train_step(self) -> tuple[float, int]:
        """One optimizer step; returns (mean loss over the global batch, tokens processed globally)."""
        self.module.train()
        routes = self.regulariser.routes if self.regulariser is not None else None
        micro = [collate([self.train_ds[i] for i in idx], self.pad_id, routes) for idx in self.batch_indices(self.step)]
        micro = [{k: v.to(self.device) for k, v in b.items()} for b in micro]
        local = torch.tensor(float(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)), device=self.device)
        n_tokens = float(_all_sum(local.clone()))
        reg = self.regulariser
        if reg is not None and reg.summed is not None and reg.norm is not None:
            denom = max(float(_all_sum(torch.tensor(float(sum(reg.norm(b) for b in micro)), device=self.device))), 1.0)
        ce_total = torch.zeros((), device=self.device)
        bad = torch.zeros((), device=self.device)  # micro-batches whose loss is not finite, on this process
        first_bad = 0.0
        for j, batch in enumerate(micro):
            sync = j == len(micro) - 1
            ctx = self.model.no_sync() if (self.world > 1 and not sync) else _null()
            with ctx:
                ce, count = self._forward_ce(batch)
                loss = ce / n_tokens * self.world  # DDP averages gradients over processes
                if reg is not None and reg.fn is not None:
                    loss = loss + reg.fn(batch) * (count / n_tokens) * self.world
                if reg is not None and reg.summed is not None:
                    loss = loss + reg.summed(batch) / denom * self.world
                if self.scaler is None and not torch.isfinite(loss.detach()).all():
                    first_bad = float(loss.detach()) if not bad else first_bad
                    bad += 1  # raised below, on every process at once: a raise here would leave the others
                    # waiting in the gradient all-reduce of the last micro-batch
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            ce_total += ce.detach()
        if self.scaler is None and float(_all_sum(bad.clone())) > 0:
            self.optimizer.zero_grad(set_to_none=True)
            where = f"({first_bad:g})" if bad else "(on another process)"
            raise ValueError(
                f"step {self.step + 1}: the training loss is not finite {where}; a regulariser weight or the learning "
                "rate is too large, or the data overflow this precision. Nothing was saved from this step"
            )
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.args.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.args.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seen = float(_all_sum(torch.tensor(float(sum(int(b["attention_mask"].sum()) for b in micro)))))
        return float(_all_sum(ce_total)) / n_tokens, int(seen)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted mean cross-entropy over the eval set (every process takes a slice)."""
        if self.eval_ds is None:
            return None
        self.module.eval()
        idx = list(range(self.rank, len(self.eval_ds), self.world))
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        for start in range(0, len(idx), self.args.batch_size):
            batch = collate([self.eval_ds[i] for i in idx[start : start + self.args.batch_size]], self.pad_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out = self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            ce, n = token_ce_sum(out.logits, batch["labels"])
            total += ce
            count += n
        return float(_all_sum(total)) / max(float(_all_sum(count)), 1.0)

    def fit(self) -> list[dict]:
        """Train to `total_steps` (resuming when asked); returns the step records logged."""
        torch.manual_seed(self.args.seed)
        random.seed(self.args.seed)
        self.start()
        records = []
        bar = _progress(self.total_steps, self.step, enabled=self.args.progress and self.rank == 0)
        t0 = time.perf_counter()
        while self.step < self.total_steps:
            loss, tokens = self.train_step()
            self.step += 1
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            record = {
                "step": self.step,
                "epoch": round(self.step / self.steps_per_epoch, 4),
                "loss": loss,
                "lr": self.scheduler.get_last_lr()[0],
                "tokens_per_s": round(tokens / dt, 1) if dt > 0 else None,
            }
            if self.args.eval_every and self.step % self.args.eval_every == 0:
                record["eval_loss"] = self.evaluate()
            self.log(record)
            records.append(record)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']}")
                bar.update(1)
            if self.args.save_every and self.step % self.args.save_every == 0:
                self.save_state()
        if bar is not None:
            bar.close()
        final_eval = self.evaluate()
        if final_eval is not None:
            self.log({"step": self.step, "eval_loss": final_eval})
            records.append({"step": self.step, "eval_loss": final_eval})
        return records


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)
