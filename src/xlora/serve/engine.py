"""The serving engine: a bounded queue, a scheduler thread, batches decoded with both KV caches.

Batching policy (a decision, see the README): requests join at the next *batch boundary*. The
scheduler takes the oldest waiting request, waits while requests keep arriving (gaps under
`batch_wait_ms`, at most 5 x that), and takes in arrival order up to `max_batch - 1` more whose
X-LoRA options (masked experts, top-k, global weight) are the same, because those options are
per-model settings that must not leak into other requests. The batch is left-padded, prefilled,
and decoded; rows that finish (EOS, stop string, max_tokens, client gone) leave the batch at once,
so the batch gets cheaper as it drains. A new batch starts as soon as the current one ends.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from xlora.core.checks import check_number
from xlora.core.config import MAX_GLOBAL_SCALING_WEIGHT  # the library's bound, one rule for both
from xlora.core.generation import SamplingOptions, iter_generate, vocab_size
from xlora.core.generation import context_length as model_context
from xlora.core.model import XLoraModel

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's int64 seed; torch accepts this range (negatives wrap)
DEFAULT_CONTEXT = 2048  # the context assumed when the model's config does not state one
# The longest `batch_wait_ms`: a batch waits up to 5 x this for company; beyond a minute that is a stall.
MAX_BATCH_WAIT_MS = 60_000.0


SHUTDOWN_MESSAGE = "the server shut down before this request finished; retry it"


class QueueFull(RuntimeError):
    """The waiting queue is at its bound (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The engine is stopping and takes no new request (HTTP 503)."""


@dataclass(frozen=True)
class MixtureOptions:
    """Per-request X-LoRA settings; requests are only batched with equal ones."""

    mask_experts: tuple[str, ...] = ()
    top_k: int | None = None
    global_scaling_weight: float | None = None


@dataclass(eq=False)
class Request:
    """One generation request and the channel its events go to (compared by identity: two equal
    requests from two clients are still two requests)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    mixture: MixtureOptions = field(default_factory=MixtureOptions)
    # events, called from the engine thread: ("token", id, text delta, weights [N] | None),
    # ("text", trailing text, None), ("end", "stop" | "length"), ("error", message)
    emit: Callable[[tuple], None] = field(default_factory=lambda: queue.Queue().put)
    want_scalings: bool = False  # compute per-token expert weights for this request
    cancelled: threading.Event = field(default_factory=threading.Event)

    def problem(self, experts: list[str], vocab: int | None = None, context: int | None = None) -> str | None:
        """Why this request cannot run, or None. Checked at `submit`: a bad row would fail its whole batch."""
        m = self.mixture

        def number(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def integer(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(self.prompt_ids, list) or not self.prompt_ids:
            return "the prompt has no tokens"
        if not all(integer(t) and t >= 0 and (vocab is None or t < vocab) for t in self.prompt_ids):
            bad = next(t for t in self.prompt_ids if not (integer(t) and t >= 0 and (vocab is None or t < vocab)))
            return f"prompt_ids: token id {bad!r} is not an integer in 0..{(vocab or 0) - 1 if vocab else 'vocab'}"
        if not integer(self.max_tokens) or self.max_tokens < 1:
            return f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"
        if context is not None and len(self.prompt_ids) + self.max_tokens > context:
            return (
                f"{len(self.prompt_ids)} prompt tokens + max_tokens {self.max_tokens} exceed the context of {context}"
            )
        if not (number(self.temperature) and self.temperature >= 0):
            return f"temperature must be a finite number >= 0, got {self.temperature!r}"
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            return f"top_p must be a number in (0, 1], got {self.top_p!r}"
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            return f"seed must be in [{SEED_MIN}, {SEED_MAX}]"
        w = m.global_scaling_weight
        if w is not None and not (math.isfinite(w) and abs(w) <= MAX_GLOBAL_SCALING_WEIGHT):
            return f"global_scaling_weight must be finite with magnitude <= {MAX_GLOBAL_SCALING_WEIGHT}"
        if m.top_k is not None and not 1 <= m.top_k <= len(experts):
            return f"top_k must be in [1, {len(experts)}]"
        if any(e not in experts for e in m.mask_experts) or len(set(m.mask_experts)) >= len(experts):
            return "mask_experts must name known experts and leave at least one"
        return None


def _row_sampler(requests: list[Request], device: torch.device):
    """Per-row temperature / top-p / seed: greedy when temperature is 0."""
    gens = []
    for r in requests:
        g = None
        if r.temperature > 0 and r.seed is not None:
            g = torch.Generator(device=device).manual_seed(r.seed)
        gens.append(g)

    def sample(ids: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for j, row in enumerate(rows.tolist()):
            r = requests[row]
            scores = logits[j].float()
            if r.temperature <= 0:
                out[j] = scores.argmax()
                continue
            # shifted so the row's maximum is 0: a tiny temperature gives one-hot, never inf/NaN
            probs = torch.softmax((scores - scores.max()) / r.temperature, dim=-1)
            if r.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                cut = sorted_p.cumsum(0) - sorted_p > r.top_p  # drop tokens once the mass before them > top_p
                sorted_p[cut] = 0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            out[j] = torch.multinomial(probs, 1, generator=gens[row])[0]
        return out

    return sample


def check_engine_options(
    max_batch: object,
    max_queue: object,
    batch_wait_ms: object,
    reuse_scalings_after: object,
    context_length: object = None,
    model_context_length: int | None = None,
    where: str = "Engine",
    name: Callable[[str], str] = str,
) -> None:
    """ValueError `<where>: <name(option)>: expected ..., got ...` for the first engine option that cannot work.

    The Engine calls it with its arguments; `xlora serve` calls it before loading a model, with
    `name` spelling each option as its `--flag`, so both refuse exactly the same values.
    `model_context_length` (the model's own context, when known) bounds `context_length`.
    """
    check_number(where, name("max_batch"), max_batch, integer=True, low=1)
    check_number(where, name("max_queue"), max_queue, integer=True, low=1)
    check_number(where, name("batch_wait_ms"), batch_wait_ms, low=0, high=MAX_BATCH_WAIT_MS)
    check_number(where, name("reuse_scalings_after"), reuse_scalings_after, integer=True, low=1, optional=True)
    # a prompt token and a new token at least; past the model's positions it produces garbage
    check_number(
        where, name("context_length"), context_length, integer=True, low=2, high=model_context_length, optional=True
    )


class Engine:
    """Owns the model; `submit` enqueues, a background thread runs batches.

    `context_length` caps prompt plus answer (default: the model's `max_position_embeddings`, or
    DEFAULT_CONTEXT when the config has none). Every argument is checked here (`check_engine_options`),
    so a bad value fails at construction instead of failing every request later.
    """

    def __init__(
        self,
        model: XLoraModel,
        tokenizer: Any,
        max_batch: int = 8,
        max_queue: int = 64,
        reuse_scalings_after: int | None = None,
        batch_wait_ms: float = 20.0,
        context_length: int | None = None,
    ) -> None:
        if not isinstance(model, XLoraModel):
            raise TypeError(f"Engine: model: expected an XLoraModel, got {type(model).__name__}")
        if not callable(getattr(tokenizer, "decode", None)) or not hasattr(tokenizer, "eos_token_id"):
            raise TypeError(f"Engine: tokenizer: expected a transformers tokenizer, got {type(tokenizer).__name__}")
        known = model_context(model)
        check_engine_options(max_batch, max_queue, batch_wait_ms, reuse_scalings_after, context_length, known)
        self.model, self.tokenizer = model, tokenizer
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.last_arrival = 0.0
        self.max_batch, self.max_queue = max_batch, max_queue
        self.reuse_scalings_after = reuse_scalings_after
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.abandon = False  # set after the shutdown grace period: running rows end with an error
        self.busy_rows = 0  # rows of the running batch still decoding
        self.cancelled_rows = 0  # rows stopped because their client went away
        self.eos_ids = self._eos_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.context_length = context_length or known or DEFAULT_CONTEXT
        # How a step's events reach the consumers: called once per step with a function that emits
        # them all (the HTTP server hands this to its event loop: one wake-up per step, not per row).
        self.dispatch: Callable[[Callable[[], None]], None] = lambda fn: fn()
        self.on_step: Callable[[int], None] = lambda rows: None  # rows decoded by each step (metrics)
        # a batch sets the model's per-request options (top-k, global weight, masks): two engines over
        # one model take turns, so one's settings never reach the other's rows
        self.model_lock = model.__dict__.setdefault("_xlora_decode_lock", threading.Lock())
        self.thread = threading.Thread(target=self._run, name="xlora-engine", daemon=True)
        self.thread.start()

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.model.base, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            ids.update(gen_eos)
        return sorted(i for i in ids if i is not None) or [0]

    def submit(self, request: Request) -> Request:
        """Queue `request`; ValueError if it cannot run (see `Request.problem`), QueueFull at the bound."""
        if not isinstance(request, Request):
            raise TypeError(f"Engine.submit: expected an xlora.serve.engine.Request, got {type(request).__name__}")
        problem = request.problem(self.model.expert_names, vocab_size(self.model.base), self.context_length)
        if problem is not None:
            raise ValueError(problem)
        with self.cond:
            if self.stopping:
                raise ShuttingDown("the server is shutting down and takes no new requests; retry later")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} waiting requests; retry later")
            self.waiting.append(request)
            self.last_arrival = time.monotonic()
            self.cond.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop `request` (its client left): a waiting one leaves the queue now, freeing its slot;
        a decoding one leaves its batch at the next step. No event follows; a no-op once it ended."""
        request.cancelled.set()
        with self.cond:
            for i, waiting in enumerate(self.waiting):
                if waiting is request:
                    del self.waiting[i]
                    break

    def begin_shutdown(self, grace_s: float = 10.0) -> None:
        """Start stopping without waiting: new requests are refused (ShuttingDown), waiting ones end
        at once with an error event, and rows still decoding after `grace_s` end with an error too."""
        with self.cond:
            self.stopping = True
            waiting, self.waiting = list(self.waiting), deque()
            self.cond.notify()
        self._send([(r, ("error", SHUTDOWN_MESSAGE)) for r in waiting])
        timer = threading.Timer(grace_s, self._abandon)
        timer.daemon = True
        timer.start()

    def _abandon(self) -> None:
        self.abandon = True  # the running batch outlived the grace period: its rows leave at the next step

    def shutdown(self, grace_s: float = 10.0) -> None:
        """`begin_shutdown`, then wait for the scheduler thread to end (the grace period plus a step)."""
        self.begin_shutdown(grace_s)
        self.thread.join(timeout=grace_s + 10)

    # ------------------------------------------------------------------ scheduler

    def _next_batch(self) -> list[Request]:
        """The oldest request plus compatible ones. Requests sent together arrive a few milliseconds
        apart, so a new batch keeps waiting while they keep coming: until it is full, or no request
        arrived for `batch_wait_s`, or it waited 5 x `batch_wait_s` in all."""
        with self.cond:
            while not self.waiting and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return []
            start = time.monotonic()
            compatible: list[Request] = []
            while not self.stopping:
                if not self.waiting:  # every waiting request was cancelled while the batch formed
                    return []
                first = self.waiting[0]
                compatible = [r for r in self.waiting if r.mixture == first.mixture][: self.max_batch]
                now = time.monotonic()
                quiet = now - self.last_arrival >= self.batch_wait_s
                if len(compatible) >= self.max_batch or quiet or now - start >= 5 * self.batch_wait_s:
                    break
                self.cond.wait(timeout=self.batch_wait_s)
            for r in compatible:
                self.waiting.remove(r)
            return [r for r in compatible if not r.cancelled.is_set()]

    def _run(self) -> None:
        while True:
            try:
                batch = self._next_batch()
            except Exception as e:  # noqa: BLE001 - the scheduler must never die: every later request would hang
                with self.cond:
                    lost, self.waiting = list(self.waiting), deque()
                self._send([(r, ("error", f"scheduling failed: {e}")) for r in lost])
                continue
            if self.stopping:
                return
            if not batch:
                continue
            self.busy_rows = len(batch)
            try:
                with self.model_lock:
                    self._decode(batch)
            except Exception as e:  # noqa: BLE001 - a failed batch must not kill the server
                self._send([(r, ("error", f"generation failed: {e}")) for r in batch])
            finally:
                self.busy_rows = 0

    def _apply_mixture(self, m: MixtureOptions):
        model = self.model
        saved = (model.config.top_k_lora, model.config.global_scaling_weight)
        if m.top_k is not None:
            model.set_topk_lora(m.top_k)
        if m.global_scaling_weight is not None:
            model.set_global_scaling_weight(m.global_scaling_weight)
        handle = model.mask_experts(list(m.mask_experts) or None)
        return saved, handle

    def _restore_mixture(self, saved, handle) -> None:
        handle.__exit__(None, None, None)
        self.model.config.top_k_lora, self.model.config.global_scaling_weight = saved

    def _send(self, events: list[tuple[Request, tuple]]) -> None:
        if events:
            self.dispatch(lambda: [r.emit(ev) for r, ev in events])

    def _decode(self, batch: list[Request]) -> None:
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        limits = torch.tensor([r.max_tokens for r in batch])
        stop = torch.zeros(len(batch), dtype=torch.bool)
        texts = [""] * len(batch)
        generated: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        opts = SamplingOptions(max_new_tokens=int(limits.max()), eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        saved, handle = self._apply_mixture(batch[0].mixture)
        steps = None
        try:
            steps = iter_generate(
                self.model,
                ids,
                mask,
                opts,
                reuse_scalings_after=self.reuse_scalings_after,
                sampler=_row_sampler(batch, self.model.device),
                stop_rows=stop,
            )
            for n, step in enumerate(steps, start=1):
                self.on_step(done.count(False))
                out: list[tuple[Request, tuple]] = []
                for i, r in enumerate(batch):
                    if done[i]:
                        continue
                    if r.cancelled.is_set():
                        done[i], stop[i] = True, True
                        self.cancelled_rows += 1
                        continue
                    if self.abandon:
                        done[i], stop[i] = True, True
                        out.append((r, ("error", SHUTDOWN_MESSAGE)))
                        continue
                    token = int(step.tokens[i])
                    weights = None
                    if r.want_scalings and step.scalings is not None:
                        weights = step.scalings[i].float().mean(0).cpu()  # [N], mean over adapted modules
                    if token in self.eos_ids:
                        done[i], stop[i] = True, True
                        out.append((r, ("end", "stop")))
                        continue
                    generated[i].append(token)
                    text = self.tokenizer.decode(generated[i], skip_special_tokens=True)
                    hit = next((s for s in r.stop if s and s in text), None)
                    if hit is not None:
                        cut = text.index(hit)
                        out.append((r, ("text", text[len(texts[i]) : cut] if cut > len(texts[i]) else "", weights)))
                        done[i], stop[i] = True, True
                        out.append((r, ("end", "stop")))
                        continue
                    # hold back a tail that could still become a stop string
                    hold = max((len(s) - 1 for s in r.stop), default=0)
                    safe = len(text) - hold if hold else len(text)
                    delta = text[len(texts[i]) : max(safe, len(texts[i]))]
                    texts[i] += delta
                    out.append((r, ("token", token, delta, weights)))
                    if n >= r.max_tokens:
                        tail = text[len(texts[i]) :]
                        if tail:
                            out.append((r, ("text", tail, None)))
                        done[i], stop[i] = True, True
                        out.append((r, ("end", "length")))
                self._send(out)
                self.busy_rows = done.count(False)
                if all(done):
                    break
            out = [(r, ("end", "length")) for i, r in enumerate(batch) if not done[i]]  # batch max reached
            self._send(out)
        finally:
            if steps is not None:
                steps.close()  # puts merged weights back before the next batch (merge.py)
            self._restore_mixture(saved, handle)


def now() -> int:
    return int(time.time())
