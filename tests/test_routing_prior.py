"""The gate's routing prior: records naming their expert, the loss term by hand, and its effect."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import cli, gate_cli_args, run_gate
from transformers import AutoTokenizer

from xlora.data import DataError, collate, load_dataset
from xlora.train import routing_prior
from xlora.training import TrainingArgs


def write_routed(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled_rows(names: list[str]) -> list[dict]:
    """48 learnable rows (as `train_setup`'s), each naming an expert in turn, every fourth "base"."""
    rows = []
    for i in range(48):
        a, b = 3 + i % 20, 3 + (i * 7) % 30
        expert = "base" if i % 4 == 3 else names[i % 2]
        rows.append({"prompt": f"w{a} w{b}", "completion": f"w{(a + b) % 40 + 10} w{a} w{b}", "expert": expert})
    return rows


def test_routing_prior_by_hand():
    # [B=3, T=2, L=1, N=2]: row 0 -> expert 1, row 1 -> the base alone, row 2 unlabelled
    s = torch.tensor([[[[0.5, 0.5]], [[0.0, 1.0]]], [[[0.2, 0.4]], [[9.0, 9.0]]], [[[7.0, 7.0]], [[7.0, 7.0]]]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])  # row 1's second token is padding
    route = torch.tensor([1, -1, -2])
    # row 0: (0.25 + 0.25) and 0; row 1: 0.04 + 0.16 (the padded 9s are left out); row 2 left out
    expected = (0.5 + 0.0 + 0.2) / 3
    assert routing_prior(s, mask, route).item() == pytest.approx(expected)
    assert routing_prior(s, mask, torch.tensor([-2, -2, -2])).item() == 0.0  # nothing labelled


def test_expert_labels_are_read_checked_and_collated(train_setup, tmp_path):
    base_dir = train_setup[0]
    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = [{"prompt": "w1", "completion": "w2", "expert": "chem"}, {"prompt": "w1", "completion": "w3"}]
    rows.append({"prompt": "w4", "completion": "w5", "expert": "base"})
    ds = load_dataset(write_routed(tmp_path / "d.jsonl", rows), tok)
    assert [e.route for e in ds.examples] == ["chem", None, "base"]
    batch = collate(ds.examples, 0, {"chem": 0, "prot": 1, "base": -1})
    assert batch["route"].tolist() == [0, -2, -1]
    assert "route" not in collate(ds.examples, 0)  # plain training batches are unchanged
    for bad in (3, "", ["chem"]):
        path = write_routed(tmp_path / "bad.jsonl", [rows[1], {"prompt": "w1", "completion": "w2", "expert": bad}])
        with pytest.raises(DataError, match=r"bad.jsonl:2: 'expert' must be an expert's name"):
            load_dataset(path, tok)


def test_route_weight_pulls_each_example_towards_its_expert(train_setup, tmp_path):
    base_dir, experts, _, ev = train_setup
    data = write_routed(tmp_path / "routed.jsonl", labelled_rows(["chem", "prot"]))
    setup = (base_dir, experts, data, ev)
    tok = AutoTokenizer.from_pretrained(base_dir)
    ds = load_dataset(data, tok)
    routes = {"chem": 0, "prot": 1, "cot": 2, "base": -1}
    batch = collate(ds.examples, 0, routes)

    def prior(model) -> float:
        model.eval()
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return routing_prior(model.get_latest_scalings(), batch["attention_mask"], batch["route"]).item()

    plain, plain_log = run_gate(setup, tmp_path / "plain", max_steps=36, lr=2e-2)
    routed, routed_log = run_gate(setup, tmp_path / "routed", max_steps=36, lr=2e-2, route_weight=5.0)
    assert prior(routed) < 0.5 * prior(plain)  # the scalings moved towards each row's label
    assert [r["loss"] for r in routed_log if "loss" in r] != [r["loss"] for r in plain_log if "loss" in r]
    run = json.loads((tmp_path / "routed-run" / "run.json").read_text())
    assert run["args"]["route_weight"] == 5.0
    assert "route_weight" not in json.loads((tmp_path / "plain-run" / "run.json").read_text())["args"]


def test_route_weight_errors_name_the_problem(train_setup, tmp_path):
    base_dir, experts, _, ev = train_setup
    unknown = write_routed(tmp_path / "unknown.jsonl", labelled_rows(["chem", "protein"]))
    with pytest.raises(ValueError, match=r"'expert' 'protein' is not one of this model's experts"):
        run_gate((base_dir, experts, unknown, ev), tmp_path / "u", max_steps=1, route_weight=1.0)
    with pytest.raises(ValueError, match="route_weight > 0 needs records with an 'expert' field"):
        run_gate(train_setup, tmp_path / "n", max_steps=1, route_weight=1.0)  # no record names an expert
    renamed = {"base" if name == "cot" else name: path for name, path in experts.items()}
    with pytest.raises(ValueError, match='an expert is named "base"'):
        run_gate((base_dir, renamed, unknown, ev), tmp_path / "b", max_steps=1, route_weight=1.0)
    with pytest.raises(ValueError, match="TrainingArgs.route_weight: expected a finite number >= 0"):
        TrainingArgs(output_dir="x", route_weight=-1.0)
    # the CLI: one line, no traceback
    r = cli(*gate_cli_args((base_dir, experts, unknown, ev), tmp_path / "c", "--steps", "1", "--route-weight", "1"))
    assert r.returncode != 0 and "not one of this model's experts" in r.stderr and "Traceback" not in r.stderr
