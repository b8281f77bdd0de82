"""Several mixtures over one base in memory: weights exist once, each mixture answers as it would
alone, merged decoding in one never leaks into another, and the server routes by `model`."""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient
from helpers import add_tiny_tokenizer, load_base, sharpen
from transformers import AutoTokenizer

from xlora import XLoraConfig, XLoraModel
from xlora.bases.sharing import shared_copy
from xlora.core.generation import SamplingOptions, iter_generate
from xlora.serve.app import create_app
from xlora.serve.engine import Engine

CFG = XLoraConfig(xlora_depth=2, xlora_size=16, layerwise_scalings=True)
PROMPT = torch.tensor([[5, 9, 17, 3, 11]])


def two_mixtures(tiny):
    base_dir, experts = tiny
    base = load_base(base_dir)
    copy = shared_copy(base)  # before any mixture wraps the base
    a = sharpen(XLoraModel.from_experts(base, {"chem": experts["chem"], "prot": experts["prot"]}, CFG), 0.5, seed=1)
    b = sharpen(XLoraModel.from_experts(copy, {"cot": experts["cot"], "chem": experts["chem"]}, CFG), 0.5, seed=2)
    return a, b


def alone(tiny, like: XLoraModel, names: dict) -> XLoraModel:
    base_dir, experts = tiny
    model = XLoraModel.from_experts(load_base(base_dir), {n: experts[n] for n in names}, CFG)
    model.classifier.load_state_dict(like.classifier.state_dict())
    return model


def storage_bytes(*models) -> int:
    seen = {}
    for m in models:
        for t in [*m.parameters(), *m.buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_weights_exist_once_and_each_mixture_answers_as_alone(tiny):
    a, b = two_mixtures(tiny)
    base_bytes = storage_bytes(load_base(tiny[0]))
    own = sum(storage_bytes(m.classifier) + sum(storage_bytes(layer) - storage_bytes(layer.base_layer)
                                                 for layer in m.xlora_layers) for m in (a, b))  # fmt: skip
    assert storage_bytes(a, b) <= base_bytes + 1.2 * own  # the base once, not twice
    for model, names in ((a, ("chem", "prot")), (b, ("cot", "chem"))):
        with torch.no_grad():
            assert torch.equal(model(input_ids=PROMPT).logits, alone(tiny, model, names)(input_ids=PROMPT).logits)


def test_merged_decoding_in_one_mixture_leaves_the_other_alone(tiny):
    a, b = two_mixtures(tiny)
    with torch.no_grad():
        before = b(input_ids=PROMPT).logits
    steps = iter_generate(a, PROMPT, None, SamplingOptions(max_new_tokens=12, eos_token_id=[]), reuse_scalings_after=1)
    for n, _ in enumerate(steps):
        if n == 4:
            break
    assert a._merged  # a's weights hold its experts now
    with torch.no_grad():
        assert torch.equal(b(input_ids=PROMPT).logits, before)
    steps.close()


def test_the_server_routes_by_model(tiny):
    base_dir, _ = tiny
    add_tiny_tokenizer(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    a, b = two_mixtures(tiny)
    reference = Engine(alone(tiny, a, ("chem", "prot")), tok)
    body = {"prompt": "w1 w2 w3", "max_tokens": 6, "temperature": 0}
    with TestClient(create_app({"a": Engine(a, tok), "b": Engine(b, tok)})) as http:
        listed = {m["id"]: m["experts"] for m in http.get("/v1/models").json()["data"]}
        assert listed == {"a": ["chem", "prot"], "b": ["cot", "chem"]}
        got = http.post("/v1/completions", json={**body, "model": "a"}).json()["choices"][0]["text"]
        assert http.post("/v1/completions", json={**body, "model": "b"}).status_code == 200
        missing = http.post("/v1/completions", json={**body, "model": "c"})
        assert missing.status_code == 404 and "serves 'a', 'b'" in missing.json()["error"]["message"]
        assert 'xlora_requests_total{model="a",status="200"} 1.0' in http.get("/metrics").text
        assert set(http.get("/health").json()["models"]) == {"a", "b"}
    with TestClient(create_app(reference, "a")) as http:
        assert http.post("/v1/completions", json={**body, "model": "a"}).json()["choices"][0]["text"] == got


def test_shared_copy_refuses_what_it_cannot_copy(tiny):
    import pytest

    for wrong in (None, "base", torch.zeros(3)):
        with pytest.raises(TypeError, match="shared_copy: base: expected a torch nn.Module"):
            shared_copy(wrong)
    a, _ = two_mixtures(tiny)
    with pytest.raises(ValueError, match="already wrapped by a mixture"):
        shared_copy(a.base)
