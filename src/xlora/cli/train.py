"""`xlora train-expert` and `xlora train-gate`: thin commands over `xlora.train.api`."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from xlora.cli.app import SCALING_PASS_LAYERS, DtypeOption, QuantizeOption, _fail, app, comma_list, parse_experts

if TYPE_CHECKING:
    pass


TRAIN_KEYS = (
    "steps",
    "epochs",
    "lr",
    "batch_size",
    "grad_accum",
    "scheduler",
    "warmup_steps",
    "max_grad_norm",
    "eval_every",
    "save_every",
    "precision",
    "seed",
    "resume",
)


def _prepare(
    base,
    device,
    data,
    eval,
    max_length,
    out,
    run_dir,
    options: dict,
    dtype="float32",
    quantize=None,
    kind="xlora",
    overwrite: bool = False,
    inputs: tuple = (),
    hold: ExitStack | None = None,
):
    """What both training commands start with: process rank, outputs checked and the run directory locked
    (held by `hold` for the command's life), base model, datasets, TrainingArgs."""
    from xlora.bases.loading import load_base
    from xlora.train.api import check_outputs, lock_run
    from xlora.train.data import load_dataset
    from xlora.train.loop import TrainingArgs, distributed

    _, rank_id = distributed()
    options = dict(options)
    steps = options.pop("steps")
    args = TrainingArgs(output_dir=str(out), max_steps=steps, run_dir=str(run_dir) if run_dir else None, **options)
    reads = [data, eval, *inputs] + ([] if base == "default" else [base])
    check_train_outputs(args, kind, overwrite, reads)
    check_outputs(args, kind)  # before minutes of loading and hours of training
    if hold is not None:
        hold.enter_context(lock_run(args))  # a second run into this run directory fails here, at once
    model, tokenizer = load_base(base, device=_device_for(device), dtype=dtype, quantization=quantize)
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and max_length > context:
        raise ValueError(f"--max-length {max_length}: longer than the base model's context ({context} tokens)")
    train_ds = load_dataset(data, tokenizer, max_length)
    eval_ds = load_dataset(eval, tokenizer, max_length) if eval else None
    return rank_id, model, tokenizer, train_ds, eval_ds, args


def check_train_outputs(args, kind: str, overwrite: bool, reads: list) -> None:
    """--out and the run directory: an existing one only with --overwrite (the run directory also with
    --resume, which continues it), and neither may be, contain or lie inside an input (base, experts, data)."""
    from xlora.formats.atomic import check_output
    from xlora.train.run_state import LOCK

    # --resume continues the run whose output this is: replacing it is the point, no --overwrite needed
    check_output(args.output_dir, overwrite or bool(args.resume), reads=reads, directory=True, replaces=kind)
    run = args.run_path
    used = run.is_dir() and any(p.name != LOCK for p in run.iterdir())
    check_output(run, overwrite or bool(args.resume) or not used, reads=reads, directory=True)


# Options shared by train-expert and train-gate (typer needs them spelled out per command).
_DATA = typer.Option(help="Training data: .jsonl or .csv (prompt/completion, messages or text).")
_EVAL = typer.Option(help="Evaluation data, same format.")
_OVERWRITE = typer.Option(help="Replace an existing --out, or start afresh in a used run directory.")


@app.command("train-expert")
def train_expert_cmd(
    data: Annotated[Path, _DATA],
    out: Annotated[Path, typer.Option(help="Where to write the PEFT LoRA adapter directory.")],
    base: Annotated[str, typer.Option(help="'default' (embedded SmolLM2) or a local HF model dir.")] = "default",
    eval: Annotated[Path | None, _EVAL] = None,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Annotated[
        str, typer.Option(help="Comma-separated module names.")
    ] = "q_proj,k_proj,v_proj,o_proj,gate_proj",
    lora_dropout: float = 0.05,
    epochs: float = 1.0,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")] = None,
    lr: float = 2e-4,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int = 512,
    scheduler: str = "cosine",
    warmup_steps: int = 0,
    max_grad_norm: float = 1.0,
    eval_every: int | None = None,
    save_every: int | None = None,
    precision: str = "auto",
    seed: int = 0,
    resume: bool = False,
    overwrite: Annotated[bool, _OVERWRITE] = False,
    run_dir: Annotated[Path | None, typer.Option(help="Checkpoints and metrics.jsonl (default OUT-run).")] = None,
    device: str | None = None,
    dtype: DtypeOption = "float32",
    quantize: QuantizeOption = None,
) -> None:
    """Train one LoRA expert (a plain PEFT adapter directory) on a data file."""
    from xlora.train.api import LoraOptions, train_expert

    try:
        options = {k: v for k, v in locals().items() if k in TRAIN_KEYS}
        lora = LoraOptions(  # checked before the model loads
            rank=rank, alpha=alpha, targets=[t.strip() for t in targets.split(",")], dropout=lora_dropout
        )
        with ExitStack() as hold:
            rank_id, model, tokenizer, train_ds, eval_ds, args = _prepare(
                base,
                device,
                data,
                eval,
                max_length,
                out,
                run_dir,
                options,
                dtype,
                quantize,
                "adapter",
                overwrite,
                (),
                hold,
            )
            records = train_expert(model, train_ds, eval_ds, args, lora, pad_token_id=_pad_id(tokenizer))
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
        return
    if rank_id == 0:
        _report(records, out, args)


@app.command("train-gate")
def train_gate_cmd(
    data: Annotated[Path, _DATA],
    out: Annotated[Path, typer.Option(help="Where to write the X-LoRA checkpoint.")],
    experts: Annotated[list[str], typer.Option("--experts", "-e", help="NAME=DIR, repeatable.")],
    base: Annotated[str, typer.Option(help="'default' (embedded SmolLM2) or a local HF model dir.")] = "default",
    eval: Annotated[Path | None, _EVAL] = None,
    depth: int = 2,
    size: int = 256,
    dropout: float = 0.0,
    layerwise: bool = True,
    softmax: Annotated[bool, typer.Option(help="Softmax over experts; --no-softmax: unconstrained scalings.")] = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    softmax_topk: bool = False,
    scaling_pass_layers: Annotated[int | None, SCALING_PASS_LAYERS] = None,
    entropy_weight: Annotated[float, typer.Option(help="+w * scalings entropy: >0 sharper, <0 smoother.")] = 0.0,
    balance_weight: Annotated[float, typer.Option(help="+w * variance of mean expert use.")] = 0.0,
    route_weight: Annotated[
        float, typer.Option(help="+w * squared distance of scalings from each record's 'expert' (one-hot).")
    ] = 0.0,
    route_only: Annotated[
        str | None,
        typer.Option(help="Comma-separated labels the routing prior reads (expert names, 'base'); others unsaid."),
    ] = None,
    epochs: float = 1.0,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")] = None,
    lr: float = 1e-3,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int = 512,
    scheduler: str = "cosine",
    warmup_steps: int = 0,
    max_grad_norm: float = 1.0,
    eval_every: int | None = None,
    save_every: int | None = None,
    precision: str = "auto",
    seed: int = 0,
    resume: bool = False,
    overwrite: Annotated[bool, _OVERWRITE] = False,
    run_dir: Annotated[Path | None, typer.Option(help="Checkpoints and metrics.jsonl (default OUT-run).")] = None,
    device: str | None = None,
    dtype: DtypeOption = "float32",
    quantize: QuantizeOption = None,
) -> None:
    """Train the X-LoRA gate (classifier only; base and experts frozen) and save the checkpoint."""
    import torch

    from xlora.core.config import XLoraConfig
    from xlora.core.model import XLoraModel
    from xlora.train.api import train_gate

    try:
        options = {k: v for k, v in locals().items() if k in TRAIN_KEYS}
        options.update(entropy_weight=entropy_weight, balance_weight=balance_weight, route_weight=route_weight)
        options["route_only"] = comma_list(route_only)
        pairs = parse_experts(experts)
        with ExitStack() as hold:  # the run directory's lock, held until the checkpoint is saved
            rank_id, model_base, tokenizer, train_ds, eval_ds, args = _prepare(
                base,
                device,
                data,
                eval,
                max_length,
                out,
                run_dir,
                options,
                dtype,
                quantize,
                "xlora",
                overwrite,
                tuple(p for _, p in pairs),
                hold,
            )
            config = XLoraConfig(
                xlora_depth=depth,
                xlora_size=size,
                xlora_dropout_p=dropout,
                layerwise_scalings=layerwise,
                enable_softmax=softmax,
                softmax_temperature=temperature,
                top_k_lora=top_k,
                enable_softmax_topk=softmax_topk,
                scaling_pass_layers=scaling_pass_layers,
            )
            torch.manual_seed(seed)  # classifier init
            model = XLoraModel.from_experts(model_base, pairs, config, base_model_id=base)
            records = train_gate(model, train_ds, eval_ds, args, pad_token_id=_pad_id(tokenizer))
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
        return
    if rank_id == 0:
        _report(records, out, args)


def _device_for(device: str | None) -> str:
    """Under torchrun every process takes its own GPU; on CPU all share the CPU."""
    import os

    import torch

    if device:
        from xlora.cli.app import pick_device

        return pick_device(device)  # checked: a typo or CUDA on a machine without it is a clear error
    if torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return "cpu"


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


def _report(records: list[dict], out: Path, args) -> None:
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
    line = f"done: {len(losses)} steps"
    if losses:
        line += f", loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    if evals:
        line += f", eval loss {evals[-1]:.4f}"
    out_console = Console()
    out_console.print(line, highlight=False)
    out_console.print(f"model: {out}; log: {args.run_path / 'metrics.jsonl'}", soft_wrap=True, highlight=False)
