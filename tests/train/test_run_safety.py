"""Trust in training runs: no code from run files, recovery after a kill mid-save, no mixed runs."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import kill_at_save_step, load_base
from safetensors.torch import load_file
from training_helpers import ROOT, cli, gate_cli_args, run_gate
from transformers import AutoTokenizer

from xlora import XLoraConfig, XLoraModel
from xlora.formats.native import CheckpointError
from xlora.train import LoraOptions, train_expert, train_gate
from xlora.train.data import load_dataset
from xlora.train.loop import TrainingArgs
from xlora.train.run_state import RunError

SRC = ROOT / "src"


def test_no_file_we_read_is_unpickled_with_code():
    """Every torch.load in the package passes weights_only=True; nothing imports pickle."""
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 0, m.end() - 1  # find the matching parenthesis of the call
            for end in range(m.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[m.start() : end + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(ROOT)}: {call}")
        if re.search(r"^\s*(import (c?pickle|dill|joblib)|from (c?pickle|dill|joblib) import)", text, re.M):
            offenders.append(f"{path.relative_to(ROOT)}: imports a pickle module")
    assert not offenders, offenders


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_state_file_that_would_run_code(train_setup, tmp_path):
    run_gate(train_setup, tmp_path / "g", max_steps=4, save_every=2)
    marker = tmp_path / "PWNED"
    state = tmp_path / "g-run" / "checkpoint" / "state.pt"
    torch.save({"step": 2, "optimizer": _Payload(marker), "scheduler": {}, "torch_rng": 0, "python_rng": 0}, state)
    with pytest.raises(
        RunError, match=r"state\.pt: holds code or objects other than tensors.*; refused, nothing in it was run"
    ):
        run_gate(train_setup, tmp_path / "g", max_steps=4, save_every=2, resume=True)
    assert not marker.exists()


def test_kill_between_the_two_renames_resumes_from_the_newest_checkpoint(train_setup, tmp_path):
    """SIGKILL after the old checkpoint moved aside and before the new one moved in (step 6)."""
    opts = ("--steps", "10", "--save-every", "3")
    full = cli(*gate_cli_args(train_setup, tmp_path / "full", *opts))
    assert full.returncode == 0, full.stderr
    killed = cli(*gate_cli_args(train_setup, tmp_path / "part", *opts), inject=kill_at_save_step("swap", "checkpoint"))
    assert killed.returncode == -9
    run = tmp_path / "part-run"
    assert not (run / "checkpoint").exists()  # the window the issue describes
    assert len(list(run.glob(".checkpoint.old-*"))) == 1 and len(list(run.glob(".checkpoint.new-*"))) == 1
    resumed = cli(*gate_cli_args(train_setup, tmp_path / "part", *opts, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 6/10" in resumed.stdout
    assert not list(run.glob(".checkpoint.*"))  # leftovers swept
    again = cli(*gate_cli_args(train_setup, tmp_path / "part", *opts, "--resume"))  # a finished run: no --overwrite
    assert again.returncode == 0 and "already exists" not in again.stderr, again.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # no step logged twice
    wa = load_file(str(tmp_path / "full" / "xlora_classifier.safetensors"))
    wb = load_file(str(tmp_path / "part" / "xlora_classifier.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


def test_resume_picks_the_newest_complete_leftover_and_truncates_metrics(train_setup, tmp_path):
    """Leftovers as a killed saver leaves them (marked as its own): a complete temp dir (step 4) next to
    an older checkpoint moved aside (step 2) and an incomplete temp dir; metrics rows went on to step 6.
    A user's look-alike folder (a complete checkpoint of a later step, unmarked) is neither adopted nor
    removed."""
    from xlora.formats.atomic import _write_marker

    run = tmp_path / "g-run"
    model, _ = run_gate(train_setup, tmp_path / "g", max_steps=6, save_every=4)  # checkpoint at step 4
    final = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    user = run / ".checkpoint.new-123456789-1-0000dddd"
    shutil.copytree(run / "checkpoint", user)
    (user / "meta.json").write_text(json.dumps({"step": 5, "format": 1}))
    tags = {"bbbb": "tmp", "aaaa": "old", "cccc": "tmp"}
    shutil.copytree(run / "checkpoint", run / ".checkpoint.tmp-123456789-1-0000bbbb")
    os.replace(run / "checkpoint", run / ".checkpoint.old-123456789-1-0000aaaa")
    meta = run / ".checkpoint.old-123456789-1-0000aaaa" / "meta.json"
    meta.write_text(json.dumps({"step": 2, "format": 1}))  # the older one
    (run / ".checkpoint.tmp-123456789-1-0000cccc").mkdir()  # an incomplete one (no meta.json)
    for rand, kind in tags.items():
        _write_marker(
            run / f".checkpoint.{kind}-123456789-1-0000{rand}", run / "checkpoint", kind, f"123456789-1-0000{rand}"
        )
    with (run / "metrics.jsonl").open("a") as f:
        f.write("{broken")  # a row cut by the kill
    resumed, records = run_gate(train_setup, tmp_path / "g", max_steps=6, save_every=4, resume=True)
    assert [r["step"] for r in records if "loss" in r] == [5, 6]
    assert [p.name for p in run.glob(".checkpoint.*")] == [user.name]  # the saver's swept, the user's kept
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 6]  # rows past step 4 were dropped, then written again; 6 twice: eval
    for k, v in resumed.classifier.state_dict().items():
        torch.testing.assert_close(v, final[k], atol=1e-6, rtol=0)  # the same run, continued


def test_resume_with_other_settings_lists_every_change(train_setup, tmp_path):
    base_dir, experts, data, _ = train_setup
    tok = AutoTokenizer.from_pretrained(base_dir)
    ds = load_dataset(data, tok)
    run_gate(train_setup, tmp_path / "g", max_steps=4, save_every=2)

    def resume(names=None, config=None, **kw):
        torch.manual_seed(0)
        spec = [(n, experts[n]) for n in (names or list(experts))]
        cfg = config or XLoraConfig(xlora_depth=2, xlora_size=16, layerwise_scalings=True, xlora_dropout_p=0.0)
        model = XLoraModel.from_experts(load_base(base_dir), spec, cfg)
        opts = {"batch_size": 4, "lr": 5e-3, "seed": 3, "max_steps": 4, **kw}
        args = TrainingArgs(output_dir=str(tmp_path / "g"), progress=False, resume=True, **opts)
        return train_gate(model, ds, None, args, pad_token_id=0)

    with pytest.raises(RunError, match=r"args\.lr: 0\.005 -> 0\.001.*args\.seed: 3 -> 4"):
        resume(lr=1e-3, seed=4)
    with pytest.raises(RunError, match=r"args\.batch_size: 4 -> 2"):
        resume(batch_size=2)
    with pytest.raises(RunError, match=r"args\.scheduler: 'cosine' -> 'linear'"):
        resume(scheduler="linear")
    with pytest.raises(RunError, match=r"gate\.enable_softmax: True -> False"):
        resume(config=XLoraConfig(xlora_depth=2, xlora_size=16, layerwise_scalings=True, enable_softmax=False))
    with pytest.raises(RunError, match=r"experts"):
        resume(names=list(reversed(list(experts))))
    with pytest.raises(RunError, match=r"data\.sha256"):
        args = TrainingArgs(output_dir=str(tmp_path / "g"), batch_size=4, lr=5e-3, seed=3, max_steps=4, resume=True)
        smaller = load_dataset(data, tok)
        smaller.examples = smaller.examples[:-4]
        torch.manual_seed(0)
        cfg = XLoraConfig(xlora_depth=2, xlora_size=16, layerwise_scalings=True, xlora_dropout_p=0.0)
        train_gate(XLoraModel.from_experts(load_base(base_dir), experts, cfg), smaller, None, args, pad_token_id=0)
    resume()  # the original settings still resume


def test_resume_notices_an_expert_whose_files_changed(train_setup, tmp_path):
    base_dir, experts, data, _ = train_setup
    copies = {}
    for name, path in experts.items():
        copies[name] = tmp_path / "experts" / name
        shutil.copytree(path, copies[name])
    setup_copy = (base_dir, copies, data, train_setup[3])
    run_gate(setup_copy, tmp_path / "g", max_steps=4, save_every=2)
    name = next(iter(copies))
    weights = copies[name] / "adapter_model.safetensors"
    from safetensors.torch import save_file

    tensors = load_file(str(weights))
    save_file({k: v * 1.01 for k, v in tensors.items()}, str(weights))
    with pytest.raises(RunError, match=rf"experts.*{name}|sha256"):
        run_gate(setup_copy, tmp_path / "g", max_steps=4, save_every=2, resume=True)


def test_resume_without_a_checkpoint_is_an_error(train_setup, tmp_path):
    with pytest.raises(RunError, match=r"--resume given but there is no checkpoint"):
        run_gate(train_setup, tmp_path / "none", max_steps=2, resume=True)
    r = cli(*gate_cli_args(train_setup, tmp_path / "nothing", "--steps", "2", "--resume"))
    assert r.returncode != 0 and "no checkpoint to resume from" in r.stderr and "Traceback" not in r.stderr


def test_fresh_run_never_resumes_into_an_old_checkpoint(train_setup, tmp_path):
    run_gate(train_setup, tmp_path / "g", max_steps=2, save_every=2)
    # a fresh run (no resume) of other settings in the same run dir starts at step 1 ...
    _, records = run_gate(train_setup, tmp_path / "g", max_steps=1, lr=1e-2)
    assert [r["step"] for r in records if "loss" in r] == [1]
    # ... and its run dir no longer holds the first run's checkpoint, so --resume cannot mix them
    with pytest.raises(RunError, match="no checkpoint"):
        run_gate(train_setup, tmp_path / "g", max_steps=2, lr=1e-2, resume=True)


def test_unwritable_destinations_fail_before_training(train_setup, tmp_path):
    base_dir, experts, data, _ = train_setup
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, expected in (
        (afile / "sub", r"afile is a file, not a directory"),
        (Path("/proc/xlora-test-out"), r"/proc/xlora-test-out: cannot write in /proc"),
        (afile, r"afile: exists and is not a directory"),
    ):
        r = cli(*gate_cli_args(train_setup, out, "--steps", "2"))
        assert r.returncode == 2 and re.search(expected, r.stderr), r.stderr
        assert "training" not in r.stderr and "Traceback" not in r.stderr
    tok = AutoTokenizer.from_pretrained(base_dir)
    args = TrainingArgs(output_dir=str(afile / "e"), max_steps=1, batch_size=8, progress=False)
    with pytest.raises(CheckpointError, match="afile is a file"):
        train_expert(load_base(base_dir), load_dataset(data, tok), None, args, LoraOptions(rank=2))


def test_resume_notices_another_base_of_the_same_architecture(train_setup, tmp_path):
    from helpers import add_tiny_tokenizer, make_base

    base_dir, experts, data, ev = train_setup
    other = make_base(tmp_path / "other-base", seed=1)  # same config, other weights
    add_tiny_tokenizer(other)
    run_gate(train_setup, tmp_path / "g", max_steps=4, save_every=2)
    with pytest.raises(RunError, match=r"base\.weights_sha256"):
        run_gate((other, experts, data, ev), tmp_path / "g", max_steps=4, save_every=2, resume=True)


def test_a_second_run_into_a_locked_run_directory_fails_naming_the_holder(train_setup, tmp_path):
    """Two `train-gate --out cc` runs started 9 s apart both exited 0 and interleaved cc-run/metrics.jsonl."""
    import subprocess
    import sys
    import threading

    from xlora.train.run_state import LOCK, run_lock

    base_dir, _, data, _ = train_setup
    run = tmp_path / "cc-run"
    expert = ["train-expert", "--base", str(base_dir), "--data", str(data), "--steps", "1", "--run-dir", str(run)]
    with run_lock(run):  # a run in progress
        for args in (
            gate_cli_args(train_setup, tmp_path / "cc", "--steps", "1"),
            [*expert, "--out", str(tmp_path / "e")],
        ):
            r = cli(*args)
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
            line = r.stderr.strip()
            assert len(line.splitlines()) == 1 and "another training run is using this run directory" in line
            assert f"(pid {os.getpid()} on " in line and " since " in line, line
        errors = []
        library = threading.Thread(target=lambda: _catch(errors, run_gate, train_setup, tmp_path / "cc", max_steps=1))
        library.start()
        library.join()
        assert len(errors) == 1 and "another training run is using this run directory" in str(errors[0])
    assert not (run / "metrics.jsonl").exists() and not (tmp_path / "cc").exists()
    # a run killed while holding the lock leaves the lock file, but the kernel dropped the lock: no block
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import os\nfrom xlora.train.run_state import run_lock\nheld = run_lock({str(run)!r})\nheld.__enter__()\n"
            "os.kill(os.getpid(), 9)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9 and (run / LOCK).is_file(), killed.stderr
    r = cli(*gate_cli_args(train_setup, tmp_path / "cc", "--steps", "1"))
    assert r.returncode == 0, r.stderr
    assert not (run / LOCK).exists()


def _catch(errors: list, fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the test checks it
        errors.append(e)
