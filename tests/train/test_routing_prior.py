"""The gate's routing prior: records naming their expert, the loss term by hand, and its effect."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_base
from torch.optim.optimizer import register_optimizer_step_pre_hook
from training_helpers import cli, gate_cli_args
from transformers import AutoTokenizer

from xlora import XLoraConfig, XLoraModel
from xlora.train import routing_prior, train_gate
from xlora.train.data import DataError, collate, load_dataset
from xlora.train.loop import TrainingArgs
from xlora.train.run_state import RunError


def write_routed(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def routed_gate(setup, out, softmax: bool = False, **kw):
    """A tiny gate (unconstrained scalings unless `softmax`) trained on `setup`'s data; (model, step log)."""
    base_dir, experts, data, ev = setup
    tok = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(0)
    config = XLoraConfig(xlora_depth=2, xlora_size=16, layerwise_scalings=True, enable_softmax=softmax)
    model = XLoraModel.from_experts(load_base(base_dir), experts, config)
    args = TrainingArgs(**{"output_dir": str(out), "batch_size": 4, "lr": 2e-2, "seed": 3, "progress": False, **kw})
    return model, train_gate(model, load_dataset(data, tok), load_dataset(ev, tok), args, pad_token_id=0)


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

    plain, plain_log = routed_gate(setup, tmp_path / "plain", max_steps=36, save_every=12)
    routed, routed_log = routed_gate(setup, tmp_path / "routed", max_steps=36, route_weight=5.0, save_every=12)
    assert prior(routed) < 0.5 * prior(plain)  # the scalings moved towards each row's label
    assert [r["loss"] for r in routed_log if "loss" in r] != [r["loss"] for r in plain_log if "loss" in r]
    run = json.loads((tmp_path / "routed-run" / "run.json").read_text())
    assert run["args"]["route_weight"] == 5.0
    plain_run = json.loads((tmp_path / "plain-run" / "run.json").read_text())
    assert "route_weight" not in plain_run["args"] and "routes_sha256" not in plain_run["data"]
    assert "routes_sha256" in run["data"]  # a resume with other labels is another run ...
    # ... but labels no term reads do not stop one: the plain run resumes on the data without labels
    rows = [{k: v for k, v in r.items() if k != "expert"} for r in labelled_rows(["chem", "prot"])]
    bare = write_routed(tmp_path / "bare.jsonl", rows)
    routed_gate((base_dir, experts, bare, ev), tmp_path / "plain", max_steps=36, save_every=12, resume=True)
    relabelled = write_routed(tmp_path / "relabelled.jsonl", labelled_rows(["prot", "chem"]))
    with pytest.raises(RunError, match="changed: data.routes_sha256"):
        routed_gate(
            (base_dir, experts, relabelled, ev), tmp_path / "routed", max_steps=36, route_weight=5.0, resume=True
        )


def test_the_prior_does_not_depend_on_how_the_batch_is_split(train_setup, tmp_path):
    """One global batch of 8 rows (one labelled) as 8 x 1, 4 x 2, 2 x 4 and 1 x 8: the same gradient."""
    base_dir, experts, _, ev = train_setup
    rows = [{k: v for k, v in r.items() if k != "expert"} for r in labelled_rows(["chem", "prot"])[:8]]
    rows[5]["expert"] = "chem"
    data = write_routed(tmp_path / "one.jsonl", rows)
    grads: list[torch.Tensor] = []

    def keep(optimizer, *_):  # the gradient the first step applies
        grads.append(torch.cat([p.grad.flatten() for g in optimizer.param_groups for p in g["params"]]).clone())

    handle = register_optimizer_step_pre_hook(keep)
    try:
        for batch, accum in ((8, 1), (4, 2), (2, 4), (1, 8)):
            routed_gate(
                (base_dir, experts, data, ev), tmp_path / f"s{batch}", max_steps=1, batch_size=batch,
                grad_accum=accum, route_weight=1.0, max_grad_norm=None,
            )  # fmt: skip
    finally:
        handle.remove()
    assert len(grads) == 4
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-7)


def test_route_weight_errors_name_the_problem(train_setup, tmp_path):
    base_dir, experts, _, ev = train_setup
    unknown = write_routed(tmp_path / "unknown.jsonl", labelled_rows(["chem", "protein"]))
    with pytest.raises(ValueError, match=r"unknown.jsonl:2: 'expert' 'protein' is not one of this model's experts"):
        routed_gate((base_dir, experts, unknown, ev), tmp_path / "u", max_steps=1, route_weight=1.0)
    with pytest.raises(ValueError, match="route_weight > 0 needs records with an 'expert' field; none has one"):
        routed_gate(train_setup, tmp_path / "n", max_steps=1, route_weight=1.0)  # no record names an expert
    renamed = {"base" if name == "cot" else name: path for name, path in experts.items()}
    with pytest.raises(ValueError, match='an expert is named "base"'):
        routed_gate((base_dir, renamed, unknown, ev), tmp_path / "b", max_steps=1, route_weight=1.0)
    labelled = write_routed(tmp_path / "labelled.jsonl", labelled_rows(["chem", "prot"]))
    with pytest.raises(ValueError, match=r"labelled.jsonl:4: 'expert' \"base\" \(no expert\) cannot be reached"):
        routed_gate((base_dir, experts, labelled, ev), tmp_path / "sm", softmax=True, max_steps=1, route_weight=1.0)
    for bad in (-1.0, float("nan"), float("inf"), "1", None, True, 10**400):
        with pytest.raises(ValueError, match="TrainingArgs.route_weight: expected a finite number >= 0"):
            TrainingArgs(output_dir="x", route_weight=bad)
    # a weight so large that the loss overflows: an error, and no gate saved
    with pytest.raises(ValueError, match="step 1: the training loss is not finite"):
        routed_gate((base_dir, experts, labelled, ev), tmp_path / "big", max_steps=2, route_weight=1e308)
    assert not (tmp_path / "big").exists()
    # the CLI: one line, no traceback
    r = cli(*gate_cli_args((base_dir, experts, unknown, ev), tmp_path / "c", "--steps", "1", "--route-weight", "1"))
    assert r.returncode != 0 and "not one of this model's experts" in r.stderr and "Traceback" not in r.stderr


def test_a_non_finite_loss_on_one_process_stops_every_process(train_setup, tmp_path):
    """torchrun, 2 processes: only the process holding the one labelled row overflows; both stop at once
    with the error (before, the other failed in the gradient all-reduce with a peer's lost connection, and
    under NCCL could wait there until its timeout)."""
    import os
    import subprocess
    import sys

    from training_helpers import ROOT

    base_dir, experts, _, ev = train_setup
    # 1e38 is finite in float32: x 0 on the unlabelled process, it overflows only on the labelled one
    rows = labelled_rows(["chem", "prot"])[:4]  # global batch 4 = 2 per process: every step splits them
    for r in rows[1:]:
        del r["expert"]
    data = write_routed(tmp_path / "one-labelled.jsonl", rows)
    args = gate_cli_args((base_dir, experts, data, ev), tmp_path / "g", "--steps", "2", "--route-weight", "1e38")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
         "-m", "xlora.cli", *args, "--batch-size", "2"],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode != 0
    assert run.stderr.count("step 1: the training loss is not finite") == 2, run.stderr[-3000:]  # both processes
    assert "(on another process)" in run.stderr
    assert not (tmp_path / "g").exists()


def test_route_only_reads_the_named_labels_as_if_the_others_were_unsaid(train_setup, tmp_path):
    """route_only=["chem"] on data labelled chem / prot / base trains exactly the gate that the prior
    trains on the same data with only the chem labels kept (same first-step gradient)."""
    base_dir, experts, _, ev = train_setup
    rows = labelled_rows(["chem", "prot"])[:8]
    only_chem = [{k: v for k, v in r.items() if k != "expert" or v == "chem"} for r in rows]
    assert {r.get("expert") for r in only_chem} == {"chem", None} and {r["expert"] for r in rows} > {"chem"}
    grads: list[torch.Tensor] = []

    def keep(optimizer, *_):
        grads.append(torch.cat([p.grad.flatten() for g in optimizer.param_groups for p in g["params"]]).clone())

    handle = register_optimizer_step_pre_hook(keep)
    try:
        for name, data, only in (("all", rows, None), ("only", rows, ["chem"]), ("chem", only_chem, None)):
            path = write_routed(tmp_path / f"{name}.jsonl", data)
            routed_gate(
                (base_dir, experts, path, ev), tmp_path / name, max_steps=1, batch_size=8, route_weight=1.0,
                route_only=only, max_grad_norm=None, save_every=1,
            )  # fmt: skip
    finally:
        handle.remove()
    torch.testing.assert_close(grads[1], grads[2], rtol=1e-5, atol=1e-8)  # the same prior ...
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)  # ... and not the all-labels one
    run = json.loads((tmp_path / "only-run" / "run.json").read_text())
    assert run["args"]["route_only"] == ["chem"]
    assert "route_only" not in json.loads((tmp_path / "all-run" / "run.json").read_text())["args"]
    with pytest.raises(RunError, match=r"changed: args.route_only: \['chem'\] -> \['prot'\] \("):  # another run
        routed_gate(
            (base_dir, experts, tmp_path / "only.jsonl", ev), tmp_path / "only", max_steps=1, batch_size=8,
            route_weight=1.0, route_only=["prot"], resume=True, save_every=1, max_grad_norm=None,
        )  # fmt: skip


def test_route_only_errors(train_setup, tmp_path):
    base_dir, experts, _, ev = train_setup
    data = write_routed(tmp_path / "d.jsonl", labelled_rows(["chem", "prot"]))
    setup = (base_dir, experts, data, ev)
    with pytest.raises(ValueError, match=r"route_only: 'protein' is not one of this model's experts"):
        routed_gate(setup, tmp_path / "a", max_steps=1, route_weight=1.0, route_only=["protein"])
    with pytest.raises(ValueError, match=r"d.jsonl: no record's 'expert' is one of route_only \['cot'\]"):
        routed_gate(setup, tmp_path / "b", max_steps=1, route_weight=1.0, route_only=["cot"])
    # "base" labels under softmax are an error only when the prior reads them
    routed_gate(setup, tmp_path / "c", softmax=True, max_steps=1, route_weight=1.0, route_only=["chem", "prot"])
    for bad in ([], "chem", [""], [3]):
        with pytest.raises(ValueError, match="TrainingArgs.route_only: expected None or a non-empty list"):
            TrainingArgs(output_dir="x", route_weight=1.0, route_only=bad)
    with pytest.raises(ValueError, match="route_only: names the labels a routing prior reads; set route_weight"):
        TrainingArgs(output_dir="x", route_only=["chem"])
    r = cli(*gate_cli_args(setup, tmp_path / "e", "--steps", "1", "--route-weight", "1", "--route-only", "chem,x"))
    assert r.returncode != 0 and "route_only: 'x' is not one of" in r.stderr and "Traceback" not in r.stderr
    r = cli(*gate_cli_args(setup, tmp_path / "f", "--steps", "1", "--route-weight", "1", "--route-only", "chem"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "f-run" / "run.json").read_text())["args"]["route_only"] == ["chem"]
