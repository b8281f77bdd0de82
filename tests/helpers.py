"""Tiny local models and PEFT adapters for the tests (nothing is fetched from a hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_base(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128) -> Path:
    """Save a tiny random Llama to `path` and return it."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        use_cache=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load_base(path: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def make_adapter(
    base_dir: Path,
    out: Path,
    r: int,
    alpha: float,
    targets: list[str],
    seed: int,
    rslora: bool = False,
    **extra,
) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved to `out`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        init_lora_weights=False,
        use_rslora=rslora,
        task_type="CAUSAL_LM",
        **extra,
    )
    model = get_peft_model(load_base(base_dir), cfg)
    with torch.no_grad():  # PEFT's random init moves a tiny model's hidden states by ~100%; damp it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.25)
    model.save_pretrained(out)
    return out


def make_experts(tmp: Path, base_dir: Path) -> dict[str, Path]:
    """Three experts with different ranks, alphas, targets (one rsLoRA)."""
    return {
        "chem": make_adapter(base_dir, tmp / "chem", 4, 8, ["q_proj", "v_proj", "down_proj"], seed=1),
        "prot": make_adapter(base_dir, tmp / "prot", 8, 4, ["q_proj", "k_proj", "o_proj", "up_proj"], seed=2),
        "cot": make_adapter(base_dir, tmp / "cot", 2, 16, ALL_TARGETS, seed=3, rslora=True),
    }


def add_tiny_tokenizer(model_dir: Path, vocab: int = 128) -> None:
    """Save a word-level tokenizer next to a tiny model: ids 0-2 specials, 3-5 the role words
    user/assistant/system, then words w0, w1, ... (id = 6 + K), and a prefix-stable chat template."""
    save_word_tokenizer(model_dir, [f"w{i}" for i in range(vocab - 6)])


def save_word_tokenizer(path: Path, words: list[str], fuse: bool = False) -> None:
    """A word-level tokenizer: ids 0-2 <pad> <eos> <unk>, 3-5 the role words, then `words`; a
    prefix-stable chat template; `fuse` decodes tokens without spaces between them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "user": 3, "assistant": 4, "system": 5}
    vocab |= {w: 6 + i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if fuse:
        tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    fast.save_pretrained(path)


def fragment_tokenizer(path):
    """A tokenizer whose tokens are SMILES fragments, residues and junk words, decoded without spaces."""
    from transformers import PreTrainedTokenizerFast

    pieces = ["C", "CC", "c", "c1", "N", "n", "O", "=O", "(", ")", "1", "2", "=", "#", "[", "nH", "]", "F", "H",
              "CO", "OC", "C(", "O)", "[nH]", "Cl", "Br", "S", "A", "K", "KK", "L", "LL", "G", "E", "R", "KLK",
              "hello", "the", "gap", "eV", ";", " ", "x"]  # fmt: skip
    save_word_tokenizer(path, pieces, fuse=True)
    return PreTrainedTokenizerFast.from_pretrained(path)


def sharpen(model, std: float = 0.5, seed: int = 0):
    """Random classifier weights large enough that routing differs clearly between tokens."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(0.0, std)
    return model


KILL_AT_SAVE_STEP = """
import os
import signal
from pathlib import Path

import xlora.formats.atomic  # noqa: F401 - the module whose renames are watched

_real_replace = os.replace


def _replace_then_maybe_die(src, dst):
    # SIGKILL this process right after one named rename of an atomic replacement of a folder named NAME:
    # "new": the complete copy became .NAME.new-*; "swap": the old NAME moved aside to .NAME.old-*
    _real_replace(src, dst)
    src, dst = Path(src), Path(dst)
    if {point!r} == "new":
        hit = dst.name.startswith(".{name}.new-")
    else:
        hit = src.name == {name!r} and dst.name.startswith(".{name}.old-")
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)


os.replace = _replace_then_maybe_die
"""


def kill_at_save_step(point: str, name: str) -> str:
    """Python source that makes the process running it die (SIGKILL) at a named step ("new" or "swap") of
    the next atomic replacement of a folder called `name`: the fault is injected by the test, not the library."""
    assert point in ("new", "swap")
    return KILL_AT_SAVE_STEP.format(point=point, name=name)


KILL_AFTER_STEP = """
import os
import signal

from xlora.train.loop import Trainer

_real_log = Trainer.log


def _log_then_maybe_die(self, record):
    # SIGKILL this process right after the metrics row of optimizer step {step} is written
    _real_log(self, record)
    if record.get("step") == {step} and "loss" in record:
        os.kill(os.getpid(), signal.SIGKILL)


Trainer.log = _log_then_maybe_die
"""


def kill_after_training_step(step: int) -> str:
    """Python source that makes a training process die (SIGKILL) right after logging optimizer step `step`."""
    return KILL_AFTER_STEP.format(step=int(step))
