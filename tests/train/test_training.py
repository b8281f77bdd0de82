"""Training: experts and gate, reproducible, resumable after SIGKILL, data-parallel, HF Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import kill_after_training_step, load_base
from safetensors.torch import load_file
from training_helpers import ROOT, cli, gate_cli_args, gate_model, run_gate
from transformers import AutoTokenizer

from xlora import XLoraConfig, XLoraModel
from xlora.train import LoraOptions, train_expert, train_gate
from xlora.train.data import load_dataset
from xlora.train.loop import TrainingArgs


def test_gate_training_is_reproducible_and_learns(train_setup, tmp_path):
    m1, r1 = run_gate(train_setup, tmp_path / "a", max_steps=12, eval_every=6, dropout=0.1)
    m2, r2 = run_gate(train_setup, tmp_path / "b", max_steps=12, eval_every=6, dropout=0.1)
    losses1 = [r["loss"] for r in r1 if "loss" in r]
    assert losses1 == [r["loss"] for r in r2 if "loss" in r]  # same seed, same CPU -> same losses
    assert losses1[-1] < losses1[0]
    base_dir = train_setup[0]
    fresh = gate_model(base_dir, train_setup[1])
    for (n, p), (_, q) in zip(m1.named_parameters(), fresh.named_parameters()):
        changed = not torch.equal(p, q)
        assert changed == n.startswith("classifier"), n  # only the classifier moved
    saved = XLoraModel.from_pretrained(load_base(base_dir), tmp_path / "a")
    ids = torch.tensor([[5, 6, 7]])
    m1.eval()
    with torch.no_grad():
        assert torch.equal(saved(input_ids=ids).logits, m1(input_ids=ids).logits)
    metrics = [json.loads(line) for line in (tmp_path / "a-run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(metrics[0]) and "eval_loss" in metrics[5]


def test_regularisers_change_routing(train_setup, tmp_path):
    def entropy(model):
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.tensor([[8, 9, 10, 11, 12]]))
        sc = model.get_latest_scalings()
        return float(-(sc * sc.clamp_min(1e-12).log()).sum(-1).mean())

    plain, _ = run_gate(train_setup, tmp_path / "p", max_steps=8)
    sharp, _ = run_gate(train_setup, tmp_path / "s", max_steps=8, entropy_weight=1.0)
    smooth, _ = run_gate(train_setup, tmp_path / "m", max_steps=8, entropy_weight=-1.0)
    assert entropy(sharp) < entropy(plain) < entropy(smooth)  # w > 0 sharper, w < 0 smoother
    _, bal = run_gate(train_setup, tmp_path / "b", max_steps=4, balance_weight=5.0)
    _, ref = run_gate(train_setup, tmp_path / "q", max_steps=4)
    assert [r["loss"] for r in bal if "loss" in r] != [r["loss"] for r in ref if "loss" in r]


def test_sigkill_and_resume_reaches_same_result(train_setup, tmp_path):
    opts = ("--steps", "10", "--save-every", "3", "--no-softmax")  # the unconstrained gate of the science run
    full = cli(*gate_cli_args(train_setup, tmp_path / "full", *opts))
    assert full.returncode == 0, full.stderr
    assert json.loads((tmp_path / "full" / "xlora_config.json").read_text())["enable_softmax"] is False
    killed = cli(
        *gate_cli_args(train_setup, tmp_path / "part", *opts),
        inject=kill_after_training_step(7),
    )
    assert killed.returncode == -9  # SIGKILL after step 7; the last checkpoint is step 6
    assert not (tmp_path / "part").exists()
    resumed = cli(*gate_cli_args(train_setup, tmp_path / "part", *opts, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 6/10" in resumed.stdout

    def last_loss(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "loss" in r][-1]

    a, b = last_loss(tmp_path / "full-run"), last_loss(tmp_path / "part-run")
    assert a["step"] == b["step"] == 10 and abs(a["loss"] - b["loss"]) < 1e-4
    wa = load_file(str(tmp_path / "full" / "xlora_classifier.safetensors"))
    wb = load_file(str(tmp_path / "part" / "xlora_classifier.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


def test_torchrun_two_processes_equals_one(train_setup, tmp_path):
    """gloo on CPU, 2 processes x batch 2 == 1 process x batch 4 (same global batch)."""
    single = cli(*gate_cli_args(train_setup, tmp_path / "one", "--steps", "4", "--batch-size", "4", "--dropout", "0"))
    assert single.returncode == 0, single.stderr
    args = gate_cli_args(train_setup, tmp_path / "two", "--steps", "4", "--batch-size", "2", "--dropout", "0")
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "xlora.cli",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    wa = load_file(str(tmp_path / "one" / "xlora_classifier.safetensors"))
    wb = load_file(str(tmp_path / "two" / "xlora_classifier.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


def test_train_expert_cli_and_library(train_setup, tmp_path):
    base_dir, _, data, ev = train_setup
    r = cli(
        "train-expert",
        "--base",
        str(base_dir),
        "--data",
        str(data),
        "--eval",
        str(ev),
        "--out",
        str(tmp_path / "exp"),
        "--rank",
        "4",
        "--alpha",
        "8",
        "--targets",
        "q_proj,v_proj",
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
    )
    assert r.returncode == 0, r.stderr
    assert "loss" in r.stdout and (tmp_path / "exp" / "adapter_config.json").is_file()
    cfg = json.loads((tmp_path / "exp" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    m = XLoraModel.from_experts(load_base(base_dir), {"new": tmp_path / "exp"})  # usable as an expert
    assert m.n_layers == 4
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = load_base(base_dir)
    records = train_expert(
        base,
        load_dataset(data, tok),
        None,
        TrainingArgs(output_dir=str(tmp_path / "lib"), max_steps=8, batch_size=8, lr=1e-2, progress=False),
        LoraOptions(rank=2, targets=["o_proj"]),
    )
    losses = [x["loss"] for x in records if "loss" in x]
    assert losses[-1] < losses[0]
    assert not any("lora" in n for n, _ in base.named_modules())  # the base model was restored


def test_bad_data_reports_line(train_setup, tmp_path):
    base_dir, experts, _, _ = train_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1", "completion": "w2"}\n{"prompt": \n')
    r = cli("train-expert", "--base", str(base_dir), "--data", str(bad), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "bad.jsonl:2: invalid JSON" in r.stderr


def test_hf_trainer(train_setup, tmp_path):
    from transformers import Trainer
    from transformers import TrainingArguments as HFArgs

    from xlora.train.callback import XLoraSaveCallback
    from xlora.train.data import collate

    base_dir, experts, data, _ = train_setup
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = gate_model(base_dir, experts)
    before = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    ds = load_dataset(data, tok)
    trainer = Trainer(
        model=model,
        args=HFArgs(
            output_dir=str(tmp_path / "hf"),
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            remove_unused_columns=False,
            logging_steps=1,
        ),
        train_dataset=ds,
        data_collator=lambda exs: collate(exs, 0),
        callbacks=[XLoraSaveCallback(model, tmp_path / "hf-xlora")],
    )
    result = trainer.train()
    assert result.training_loss > 0
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in model.classifier.parameters()}
    assert any(not torch.equal(before[k], v) for k, v in model.classifier.state_dict().items())
    again = XLoraModel.from_pretrained(load_base(base_dir), tmp_path / "hf-xlora")
    model.eval()
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_resume_into_another_models_checkpoint_fails_clearly(train_setup, tmp_path):
    run_gate(train_setup, tmp_path / "g", max_steps=2, save_every=2)
    base_dir, experts, data, _ = train_setup
    tok = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(0)
    cfg = XLoraConfig(xlora_depth=2, xlora_size=32, xlora_dropout_p=0.0)
    wider = XLoraModel.from_experts(load_base(base_dir), experts, cfg)
    args = TrainingArgs(output_dir=str(tmp_path / "g"), batch_size=4, max_steps=4, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"g-run: --resume with other settings.*gate.xlora_size: 16 -> 32"):
        train_gate(wider, load_dataset(data, tok), None, args, pad_token_id=0)


def test_answer_logits_only_matches_the_full_loss_and_gradients(train_setup):
    """The expert trainer's LM head runs only where a loss is taken: same loss, same gradients."""
    from peft import LoraConfig, get_peft_model

    from xlora.train.data import collate
    from xlora.train.loop import Trainer

    base_dir, _, data, _ = train_setup
    tok = AutoTokenizer.from_pretrained(base_dir)
    ds = load_dataset(data, tok)
    torch.manual_seed(0)
    peft = get_peft_model(
        load_base(base_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    trainable = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    batch = collate([ds[i] for i in range(6)], 0)  # rows of different lengths: right padding
    results = []
    for only in (False, True):
        args = TrainingArgs(output_dir="unused", batch_size=2, progress=False)
        trainer = Trainer(peft, trainable, ds, None, args, 0, answer_logits_only=only)
        loss, count = trainer._forward_ce(batch)
        loss.backward()
        results.append((float(loss), count, {n: p.grad.clone() for n, p in trainable.items()}))
        peft.zero_grad()
    (full, n_full, g_full), (kept, n_kept, g_kept) = results
    assert n_full == n_kept > 0 and full == pytest.approx(kept, rel=1e-5)
    for name in g_full:
        torch.testing.assert_close(g_kept[name], g_full[name], rtol=1e-4, atol=1e-6)
