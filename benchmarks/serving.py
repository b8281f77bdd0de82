"""Serving throughput with batching against without, at 8 concurrent streams (loopback only).

    python benchmarks/serving.py [--streams 8] [--tokens 64]

Starts `xlora serve` twice in its own process on 127.0.0.1 (max_batch 8, then max_batch 1) over
the tiny Llama and 8 experts of the inference benchmark, sends from this process `--streams`
concurrent streaming completion requests over HTTP (greedy, fixed max_tokens),
and prints generated tokens per second for each, and their ratio. Each figure is the median of
`--repeats` rounds. Bounded: every request has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load, make_experts, tiny_llama  # noqa: E402


def word_tokenizer(path: Path, vocab: int = 32000):
    """A word-level tokenizer over the tiny model's vocabulary (the benchmark needs no real text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(vocab - 3)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def serve(base_dir: Path, checkpoint: Path, max_batch: int, threads: int):
    """`xlora serve` in its own process, as a user runs it; returns (process, port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "xlora.cli",
        "serve",
        "--checkpoint",
        str(checkpoint),
        "--base",
        str(base_dir),
        "--max-batch",
        str(max_batch),
        "--port",
        str(port),
        "--max-queue",
        "256",
        "--model-name",
        "bench",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def throughput(port: int, streams: int, tokens: int) -> float:
    """Generated tokens per second over `streams` concurrent streaming requests (raw httpx client:
    on 2 cores a heavier client would steal CPU from the server it measures)."""
    url = f"http://127.0.0.1:{port}/v1/completions"

    def one(i: int) -> int:
        words = " ".join(f"w{(i * 37 + k) % 30000}" for k in range(32))
        body = {"model": "bench", "prompt": words, "max_tokens": tokens, "temperature": 0, "stream": True}
        n = 0
        with httpx.stream("POST", url, json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    n = json.loads(line[6:])["usage"]["completion_tokens"]
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=streams) as pool:
        counts = list(pool.map(one, range(streams), timeout=900))
    return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="xlora-serve-bench-"))
    base_dir = tiny_llama(root / "base")
    experts = make_experts(base_dir, root)
    word_tokenizer(base_dir)  # saved next to the model, where `xlora serve --base` finds it

    from xlora import XLoraConfig, XLoraModel

    model = XLoraModel.from_experts(load(base_dir), experts, XLoraConfig(xlora_depth=2, layerwise_scalings=True))
    model.save_pretrained(root / "checkpoint")
    results = {}
    for max_batch in (8, 1):
        proc, port = serve(base_dir, root / "checkpoint", max_batch, args.threads)
        try:
            throughput(port, 2, 4)  # warm-up
            rounds = [throughput(port, args.streams, args.tokens) for _ in range(args.repeats)]
            results[max_batch] = statistics.median(rounds)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(
        f"torch {torch.__version__}, {args.threads} threads; {args.streams} concurrent streams x "
        f"{args.tokens} new tokens (32-token prompts), greedy; median of {args.repeats} rounds\n"
    )
    print("| server | tokens/s |")
    print("|---|---:|")
    print(f"| batching (max_batch 8) | {results[8]:.1f} |")
    print(f"| no batching (max_batch 1) | {results[1]:.1f} |")
    print(f"\nbatching / no batching: {results[8] / results[1]:.2f} (goal >= 3)")


if __name__ == "__main__":
    main()
