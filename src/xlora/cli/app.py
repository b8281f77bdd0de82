"""The `xlora` command line: a thin typer layer over the library.

Every command registered on `app` (here, in cli_train.py and in cli_science.py) runs under the
error guard of `cli_guard`: bad input ends a command with one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from xlora.cli.guard import GuardedTyper, err
from xlora.cli.guard import fail as _fail  # cli_train.py and cli_science.py import it from here

out = Console()


app = GuardedTyper(add_completion=False, no_args_is_help=True, help="X-LoRA: a mixture of LoRA experts.")


@app.callback()
def _options(
    verbose: Annotated[bool, typer.Option("--verbose", help="Show transformers' model-loading progress bars.")] = False,
) -> None:
    """X-LoRA: a mixture of LoRA experts."""
    if verbose:
        import os

        os.environ["XLORA_VERBOSE"] = "1"
    else:
        import logging

        # bitsandbytes (imported by PEFT whenever it is installed) logs, on CPUs with AVX512-BF16, that an
        # optional kernel download failed and suggests trust_remote_code: noise on a run that never
        # quantizes, and advice a newcomer should not follow. --verbose shows it.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# Base precision options, shared by every command that loads a base model.
DtypeOption = Annotated[
    str,
    typer.Option(
        "--dtype", help="Base precision: float32 (default, exact), bfloat16, float16, or auto (the checkpoint's)."
    ),
]
QuantizeOption = Annotated[
    str | None,
    typer.Option("--quantize", help="Load the base quantized with bitsandbytes: int8, nf4 or fp4 (xlora[quant])."),
]

SCALING_PASS_LAYERS = typer.Option(
    "--scaling-pass-layers",
    help="Early gate: the scaling pass runs only the first K decoder layers (about (1 + K/L) x the base per "
    "token instead of 2x); default: all layers (the paper's and PEFT's X-LoRA).",
)


def checkpoint_path(path: Path) -> Path:
    """`shipped` names the science checkpoint installed with the package (unless a folder has that name)."""
    if str(path) == "shipped" and not path.exists():
        from xlora.science import shipped_checkpoint

        return shipped_checkpoint()
    return path


def check_files_out(folder: Path, names: list[str], overwrite: bool, reads: list) -> None:
    """The files a command will write into `folder`, each through the shared `check_output` (before any work)."""
    from xlora.formats.atomic import check_output

    for name in names:
        check_output(folder / name, overwrite, reads=reads)


def comma_list(text: str | None) -> list[str] | None:
    """ "a, b" -> ["a", "b"]; None (option not given) stays None, so an empty value is the caller's error."""
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def parse_experts(items: list[str]) -> list[tuple[str, Path]]:
    """`NAME=DIR` strings -> (name, path) pairs (duplicates are reported by the library)."""
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--experts {item!r}: expected NAME=DIR")
        pairs.append((name.strip(), Path(path.strip())))
    return pairs


def pick_device(device: str | None) -> str:
    """`--device`, checked (a typo or CUDA on a machine without it is a clear error), else cuda or cpu."""
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: not a device name such as cpu, cuda, cuda:1 ({e})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine (use --device cpu)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device!r}: MPS is not available on this machine (use --device cpu)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_generate_options(
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    reuse_scalings_after: int | None,
    has_experts: bool,
) -> None:
    """Refuse `generate` options that would be ignored or invalid, before any model is loaded."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"--temperature: expected a number >= 0 (0 = greedy), got {temperature}")
    if temperature == 0:
        given = [name for name, v in (("--top-p", top_p), ("--top-k", top_k), ("--seed", seed)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply when sampling; add --temperature > 0")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p: expected a number in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k: expected an integer >= 1, got {top_k}")
    if seed is not None and seed < 0:
        raise ValueError(f"--seed: expected an integer >= 0, got {seed}")
    if reuse_scalings_after is not None:
        if reuse_scalings_after < 1:
            raise ValueError(f"--reuse-scalings-after: expected an integer >= 1, got {reuse_scalings_after}")
        if not has_experts:
            raise ValueError("--reuse-scalings-after needs --experts or --checkpoint (the base model has no scalings)")


def base_context(model: Any) -> int | None:
    """`max_position_embeddings` of a plain transformers model, or None."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def summarize_weights(names: list[str], steps: list) -> str:
    """One line: each expert's mean weight over generated tokens and adapted layers."""
    import torch

    rows = [s.scalings[0] for s in steps if s.scalings is not None]  # each [L, N]
    if not rows:
        return "expert weights: (experts disabled)"
    mean = torch.stack(rows).float().mean(dim=(0, 1))  # [N]
    return "expert weights: " + ", ".join(f"{n}={w:.3f}" for n, w in zip(names, mean.tolist()))


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt (user message).")],
    experts: Annotated[list[str] | None, typer.Option("--experts", "-e", help="NAME=DIR, repeatable.")] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="A saved X-LoRA checkpoint directory ('shipped': the science demo's).")
    ] = None,
    base: Annotated[str, typer.Option(help="'default' (embedded SmolLM2) or a local HF model dir.")] = "default",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    temperature: Annotated[float, typer.Option(help="0 means greedy; > 0 samples.")] = 0.0,
    top_p: Annotated[float | None, typer.Option(help="Sampling: nucleus mass in (0, 1].")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sampling: keep the k most likely tokens (>= 1).")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling: random seed (>= 0).")] = None,
    reuse_scalings_after: Annotated[
        int | None, typer.Option(help="Stop the scaling pass after this many new tokens (>= 1).")
    ] = None,
    chat: Annotated[bool, typer.Option(help="Apply the tokenizer's chat template.")] = True,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if present).")] = None,
    dtype: DtypeOption = "float32",
    quantize: QuantizeOption = None,
) -> None:
    """Generate text, streaming tokens, then print each expert's mean weight."""
    from transformers import TextStreamer

    from xlora.bases.loading import load_base
    from xlora.core.config import XLoraConfig
    from xlora.core.generation import check_prompt, vocab_size
    from xlora.core.model import XLoraModel

    if not prompt.strip():  # the server's rule: an empty prompt is refused, not answered
        _fail("--prompt: must not be empty")
    check_generate_options(temperature, top_p, top_k, seed, reuse_scalings_after, bool(experts or checkpoint))
    if experts and checkpoint:
        _fail("give either --experts or --checkpoint, not both")
    pairs = parse_experts(experts or [])
    model_base, tokenizer = load_base(base, device=pick_device(device), dtype=dtype, quantization=quantize)
    if checkpoint is not None:
        model = XLoraModel.from_pretrained(model_base, checkpoint_path(checkpoint))
    elif pairs:
        model = XLoraModel.from_experts(model_base, pairs, XLoraConfig())
        err.print("[yellow]note:[/yellow] new, untrained gate: expert weights are arbitrary")
    else:
        model = None
    if chat and tokenizer.chat_template:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    options = dict(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
    )
    if model is None:
        ids, mask = enc["input_ids"], enc.get("attention_mask")
        check_prompt(ids, mask, base_context(model_base), max_new_tokens, vocab_size(model_base))
        if seed is not None:
            import torch

            torch.manual_seed(seed)  # transformers' generate samples from the global generator
        model_base.generate(  # no experts: the plain base model
            **enc.to(model_base.device),
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=top_p,
            top_k=top_k,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        return
    steps: list = []
    model.generate(
        enc["input_ids"],
        attention_mask=enc["attention_mask"],
        reuse_scalings_after=reuse_scalings_after,
        callback=steps.append,
        **options,
    )
    out.print(summarize_weights(model.expert_names, steps))


@app.command()
def info(path: Annotated[Path, typer.Argument(help="An X-LoRA checkpoint or a PEFT LoRA adapter directory.")]):
    """Show the experts (ranks, alphas, targets) and the gate configuration of a checkpoint."""
    from xlora.formats.summary import describe

    config, experts = describe(checkpoint_path(path))
    table = Table(title=f"experts in {path}")
    for col in ("expert", "rank", "alpha", "rsLoRA", "modules", "targets"):
        table.add_column(col)
    for e in experts:
        table.add_row(e["name"], e["rank"], e["alpha"], e["rslora"], str(e["modules"]), e["targets"])
    out.print(table)
    if config is not None:
        out.print("config: " + ", ".join(f"{k}={v}" for k, v in config.items()))
        out.print(
            f"base: {config.get('base_model_id')} (the checkpoint stores no base weights: it loads on an fp32, bf16, "
            "8-bit or 4-bit base alike, --dtype / --quantize)",
            soft_wrap=True,
            highlight=False,
        )


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="A native or PEFT X-LoRA checkpoint directory.")],
    dst: Annotated[Path, typer.Argument(help="Where to write the converted checkpoint.")],
    to: Annotated[str, typer.Option(help="Target layout: native or peft.")] = "native",
    overwrite: Annotated[bool, typer.Option(help="Replace DST if it exists.")] = False,
) -> None:
    """Convert a checkpoint between the native (original package) and PEFT layouts."""
    from xlora.formats.convert import convert_checkpoint

    report = convert_checkpoint(src, dst, to, overwrite=overwrite)
    # one plain line per tensor (a table would truncate the long key names in narrow terminals)
    for r in report:
        shape = "x".join(map(str, r.shape))
        out.print(f"{r.kind:<10} {r.source} -> {r.destination}  [{shape}] {r.dtype}", soft_wrap=True, highlight=False)
    out.print(f"{len(report)} tensors written to {dst} ({to})", soft_wrap=True, highlight=False)


def resolve_base_dir(base: str | None, base_model_id: str | None) -> Path:
    """--base, else the checkpoint's base_model_id when it is a local directory or the embedded model."""
    from xlora.bases.loading import DEFAULT_BASE_ID, default_base_dir

    choice = base or base_model_id
    if choice in ("default", DEFAULT_BASE_ID):
        return default_base_dir()
    if choice and (Path(choice) / "config.json").is_file():
        return Path(choice)
    raise ValueError(f"base model {choice!r} is not a local directory with config.json; pass --base DIR|default")


@app.command("export-ordering")
def export_ordering_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A native or PEFT X-LoRA checkpoint directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Ordering JSON file to write.")],
    base: Annotated[str | None, typer.Option(help="Base model dir or 'default' (default: the stored id).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
) -> None:
    """Write the mistral.rs ordering file: expert order and our adapted-module numbering."""
    from xlora.formats.checkpoint import read_checkpoint
    from xlora.formats.convert import export_ordering

    base_dir = resolve_base_dir(base, read_checkpoint(checkpoint).base_model_id)
    data = export_ordering(checkpoint, output, base_dir, overwrite=overwrite)  # checks OUTPUT first
    out.print(f"wrote {output}: {len(data['order'])} experts, {len(data['layers'])} adapted modules")


def main() -> None:
    app()
