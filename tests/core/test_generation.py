"""Two-KV-cache decoding is exact, and the sampling / stopping / streaming options behave."""

from __future__ import annotations

import pytest
import torch
from helpers import load_base, sharpen

from xlora import XLoraConfig, XLoraModel
from xlora.core.generation import _positions, iter_generate


@pytest.fixture
def model(tiny) -> XLoraModel:
    base_dir, experts = tiny
    m = XLoraModel.from_experts(
        load_base(base_dir), experts, XLoraConfig(xlora_depth=2, xlora_size=32, layerwise_scalings=True)
    )
    sharpen(m, 0.5, seed=11)
    return m


def test_cached_equals_uncached_64_tokens_left_padded(model, padded_batch):
    ids, mask = padded_batch
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=64)
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=64, use_cache=False)
    assert cached.shape == (3, 12 + 64)
    assert torch.equal(cached, uncached)


def test_cached_logits_match_full_recompute(model, padded_batch):
    """Step logits from the cached loop equal a full forward over the finished sequence."""
    ids, mask = padded_batch
    seq = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    full_mask = torch.cat([mask, torch.ones(3, 8, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(input_ids=seq, attention_mask=full_mask, position_ids=_positions(full_mask)).logits
    assert torch.equal(full[:, 11:-1].argmax(-1), seq[:, 12:])


def reuse_reference(model: XLoraModel, ids, mask, k: int, n_new: int) -> torch.Tensor:
    """Independent slow reference for reuse_scalings_after=k: full recompute with the scalings of
    every position after the k-th new token replaced by those of the k-th new token's position."""
    seq, m = ids, mask
    for _ in range(n_new):
        pos = _positions(m)
        with torch.no_grad():
            hidden = model.scaling_pass(input_ids=seq, attention_mask=m, position_ids=pos)
            s = model.classifier(hidden)  # [B, T, L, N]
            frozen = ids.shape[1] + k - 1  # position that predicted... fed the k-th new token
            if seq.shape[1] > frozen + 1:
                s = s.clone()
                s[:, frozen + 1 :] = s[:, frozen : frozen + 1]
            with model.apply_scalings(s):
                logits = model.base(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1]
        tok = logits.argmax(-1)
        seq = torch.cat([seq, tok[:, None]], 1)
        m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return seq


def test_reuse_scalings_after_matches_reference(model, padded_batch):
    ids, mask = padded_batch
    got = model.generate(ids, attention_mask=mask, max_new_tokens=16, reuse_scalings_after=4)
    assert torch.equal(got, reuse_reference(model, ids, mask, k=4, n_new=16))
    # and it really reuses: per-sequence scalings frozen after 4 new tokens, different across the batch
    steps = []
    model.generate(ids, attention_mask=mask, max_new_tokens=10, reuse_scalings_after=4, callback=steps.append)
    for st in steps[5:]:
        assert torch.equal(st.scalings, steps[4].scalings)
    assert not torch.equal(steps[4].scalings[0], steps[4].scalings[1])
    assert not torch.equal(steps[3].scalings, steps[4].scalings)


def test_config_reuse_default(tiny, padded_batch):
    base_dir, experts = tiny
    cfg = XLoraConfig(reuse_scalings_after=2)
    m = XLoraModel.from_experts(load_base(base_dir), experts, cfg)
    ids, mask = padded_batch
    steps = []
    m.generate(ids, attention_mask=mask, max_new_tokens=6, callback=steps.append)
    assert torch.equal(steps[3].scalings, steps[5].scalings)


def test_sampling_is_seeded_and_topk1_is_greedy(model, padded_batch):
    ids, mask = padded_batch
    a = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9, seed=5)
    b = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9, seed=5)
    c = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    top1 = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=1, seed=1)
    assert torch.equal(greedy, top1)


def test_repetition_penalty_changes_output(model, padded_batch):
    ids, mask = padded_batch
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=24)
    penal = model.generate(ids, attention_mask=mask, max_new_tokens=24, repetition_penalty=5.0)
    assert not torch.equal(plain, penal)


def test_eos_stops_and_pads(model, padded_batch):
    ids, mask = padded_batch
    free = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    eos = int(free[0, 12 + 2])  # the third token row 0 produces
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[eos, eos], pad_token_id=1)
    row0 = out[0, 12:].tolist()
    cut = row0.index(eos)
    assert all(t == 1 for t in row0[cut + 1 :])
    # a batch where every row finishes stops early
    single = model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=10, eos_token_id=eos)
    assert single.shape[1] == 12 + cut + 1


def test_streamer_receives_every_token(model, padded_batch):
    ids, mask = padded_batch

    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.ended = True

    s = Collect()
    out = model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=5, streamer=s)
    assert s.ended and torch.equal(s.chunks[0], ids[:1])
    assert [int(c) for c in s.chunks[1:]] == out[0, 12:].tolist()


def test_disabled_generation_is_base(model, padded_batch):
    ids, mask = padded_batch
    with model.disable_experts():
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    base = model.unload()
    ref = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, ref)


def test_finished_rows_leave_the_batch_without_changing_others(model, padded_batch):
    ids, mask = padded_batch
    free = model.generate(ids, attention_mask=mask, max_new_tokens=20)
    eos = int(free[0, 12 + 1])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    for row in range(3):
        new = free[row, 12:].tolist()
        cut = new.index(eos) + 1 if eos in new else len(new)
        assert out[row, 12 : 12 + cut].tolist() == new[:cut]
        assert all(t == 0 for t in out[row, 12 + cut :].tolist())


def test_stop_rows_from_the_caller(model, padded_batch):
    from xlora.core.generation import SamplingOptions, iter_generate

    ids, mask = padded_batch
    stop = torch.zeros(3, dtype=torch.bool)
    steps = []
    for step in iter_generate(model, ids, mask, SamplingOptions(max_new_tokens=10, pad_token_id=0), stop_rows=stop):
        steps.append(step)
        if len(steps) == 3:
            stop[1] = True  # e.g. the client of row 1 went away
    assert len(steps) == 10
    assert all(int(s.tokens[1]) == 0 for s in steps[3:])
    assert bool(steps[-1].finished[1]) and not bool(steps[-1].finished[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reuse_scalings_after": -1}, r"reuse_scalings_after: expected an integer >= 1 or None, got -1"),
        ({"reuse_scalings_after": 0}, r"reuse_scalings_after: .* got 0"),
        ({"reuse_scalings_after": 2.0}, r"reuse_scalings_after: .* got 2\.0"),
        ({"max_new_tokens": 0}, r"max_new_tokens: expected an integer >= 1, got 0"),
        ({"max_new_tokens": -5}, r"max_new_tokens: .* got -5"),
        ({"max_new_tokens": 2.5}, r"max_new_tokens: .* got 2\.5"),
        ({"temperature": -1.0}, r"temperature: expected a finite number > 0, got -1\.0"),
        ({"temperature": float("nan"), "do_sample": True}, r"temperature: .* got nan"),
        ({"top_p": 0.0, "do_sample": True}, r"top_p: expected a finite number > 0 and <= 1 or None, got 0\.0"),
        ({"top_p": 1.5, "do_sample": True}, r"top_p: .* got 1\.5"),
        ({"top_p": float("nan"), "do_sample": True}, r"top_p: .* got nan"),
        ({"top_k": 0, "do_sample": True}, r"top_k: expected an integer >= 1 or None, got 0"),
        ({"top_k": 2.5, "do_sample": True}, r"top_k: .* got 2\.5"),
        ({"repetition_penalty": float("nan")}, r"repetition_penalty: .* got nan"),
        ({"seed": -1, "do_sample": True}, r"seed: .* got -1"),
        ({"eos_token_id": "</s>"}, r"eos_token_id: .* got '</s>'"),
        ({"do_sample": "yes"}, r"do_sample: expected true or false"),
    ],
)
def test_bad_generation_options(model, kwargs, message):
    ids = torch.tensor([[5, 6, 7]])
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match="generate: " + message):
        model.generate(ids, **kwargs)


def test_bad_prompts(model):
    ctx = model.base.config.max_position_embeddings  # 512 in the tiny model
    with pytest.raises(ValueError, match=rf"{ctx + 1} prompt tokens \+ max_new_tokens=2 exceed .* context of {ctx}"):
        model.generate(torch.full((1, ctx + 1), 5), max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"{ctx - 10} prompt tokens \+ max_new_tokens=64 exceed .* {ctx} tokens"):
        model.generate(torch.full((1, ctx - 10), 5), max_new_tokens=64)
    with pytest.raises(ValueError, match=rf"{ctx + 1} prompt tokens exceed the model's context of {ctx}"):
        next(iter_generate(model, torch.full((1, ctx + 1), 5)))
    with pytest.raises(ValueError, match=r"empty prompt \(input_ids of shape \[1, 0\]\)"):
        model.generate(torch.zeros((1, 0), dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] of the batch are all padding"):
        model.generate(torch.tensor([[5, 6], [0, 0]]), attention_mask=torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match=r"input_ids: expected integer token ids \[batch, seq\], got \[3\]"):
        model.generate(torch.tensor([5, 6, 7]))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \[1, 3\], got \[1, 2\]"):
        model.generate(torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 2))
    # the longest prompt that fits still generates
    assert model.generate(torch.full((1, ctx - 2), 5), max_new_tokens=2).shape == (1, ctx)


def test_token_ids_outside_the_vocabulary(model):
    with pytest.raises(ValueError, match=r"token id 128 is outside the vocabulary \(0\.\.127\)"):
        model.generate(torch.tensor([[5, 128]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"token id -1 is outside the vocabulary"):
        next(iter_generate(model, torch.tensor([[-1, 5]])))


def test_right_padding_is_refused(model, padded_batch):
    """A right-padded row would continue after its padding; transformers warns, we refuse."""
    ids, mask = padded_batch
    right_ids, right_mask = ids.clone(), mask.flip(1)
    with pytest.raises(ValueError, match=r"attention_mask row\(s\) \[1, 2\] have padding after .* left-pad"):
        model.generate(right_ids, attention_mask=right_mask, max_new_tokens=2)
    holey = torch.ones_like(mask)
    holey[0, 4] = 0  # a hole in the middle is padding after tokens too
    with pytest.raises(ValueError, match=r"row\(s\) \[0\] have padding after"):
        next(iter_generate(model, ids, holey))


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(top_p=0.01, top_k=1, temperature=5.0), "top_k, top_p, temperature"),
        (dict(seed=3), "seed"),
        (dict(temperature=0.5), "temperature"),
    ],
)
def test_sampling_options_without_sampling_are_refused(model, kwargs, named):
    """The CLI refuses --top-p without sampling; the library follows the same rule instead of running greedy."""
    with pytest.raises(ValueError, match=f"generate: {named} only apply when sampling; pass do_sample=True"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, **kwargs)
    model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, do_sample=True, **kwargs)  # fine when sampling
