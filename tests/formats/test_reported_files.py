"""Reported cases of files read or written where they must not be: one path check for every reader,
one destination check for every writer, only the saver's own leftovers swept or adopted, one lock
per destination, and clean one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from helpers import load_base, sharpen
from peft import XLoraConfig as PeftXLoraConfig
from peft import get_peft_model
from typer.testing import CliRunner

from xlora import CheckpointError, XLoraConfig, XLoraModel
from xlora.cli import app

runner = CliRunner()
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def model(tiny) -> XLoraModel:
    base_dir, experts = tiny
    m = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(xlora_depth=2, xlora_size=8))
    sharpen(m, 0.5, seed=4)
    return m


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- 5: one path check for every reader


@pytest.mark.parametrize("inner", ["chem/adapter_config.json", "chem/adapter_model.safetensors", "xlora_config.json"])
def test_info_never_reads_a_checkpoint_file_through_a_symlink_out(model, tmp_path, inner):
    """`xlora info ck` followed a symlinked ck/a/adapter_config.json outside the checkpoint and printed it."""
    ck = model.save_pretrained(tmp_path / "ck")
    secret = tmp_path / "secret.json"
    shutil.copyfile(ck / inner, secret)  # a valid file of the same kind: only the path check can refuse it
    (ck / inner).unlink()
    (ck / inner).symlink_to(secret)
    r = runner.invoke(app, ["info", str(ck)])
    assert r.exit_code == 2 and "leads outside its" in r.output and "Traceback" not in r.output, r.output
    r = runner.invoke(app, ["convert", str(ck), str(tmp_path / "out")])
    assert r.exit_code == 2 and "leads outside its" in r.output and not (tmp_path / "out").exists()


def test_the_classifier_and_peft_files_are_read_through_the_path_check_too(model, tiny, tmp_path):
    base_dir, _ = tiny
    ck = model.save_pretrained(tmp_path / "ck")
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(ck / "xlora_classifier.safetensors", elsewhere)
    (ck / "xlora_classifier.safetensors").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match=r"xlora_classifier.safetensors: leads outside its checkpoint"):
        XLoraModel.from_pretrained(load_base(base_dir), ck)
    peft = model.save_pretrained(tmp_path / "pf", format="peft")
    for name in ("adapter_config.json", "xlora_expert_names.json", "adapter_model.safetensors"):
        shutil.copytree(peft, tmp_path / "pf2")
        shutil.move(tmp_path / "pf2" / name, tmp_path / f"out-{name}")
        (tmp_path / "pf2" / name).symlink_to(tmp_path / f"out-{name}")
        with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: leads outside its checkpoint"):
            XLoraModel.from_pretrained(load_base(base_dir), tmp_path / "pf2")
        shutil.rmtree(tmp_path / "pf2")


# ---------------------------------------------------------------------- 6: one destination check for every writer


def test_export_ordering_never_overwrites_the_checkpoint_or_an_existing_file(tiny_checkpoint, tmp_path):
    base_dir, original = tiny_checkpoint
    ck = tmp_path / "ck"
    shutil.copytree(original, ck)
    before = tree(ck)
    for flags in ([], ["--overwrite"]):  # inside the checkpoint it reads: never, even with --overwrite
        for target in (ck / "xlora_config.json", ck / "chem" / "x.json", ck):
            r = runner.invoke(app, ["export-ordering", str(ck), "-o", str(target), "--base", str(base_dir), *flags])
            assert r.exit_code == 2 and "which this command reads" in r.output, r.output
        r = runner.invoke(app, ["export-ordering", str(ck), "-o", str(base_dir / "config.json"), *flags])
        assert r.exit_code == 2 and "which this command reads" in r.output, r.output
    assert tree(ck) == before
    mine = tmp_path / "mydata.jsonl"
    mine.write_text('{"keep": 1}\n')
    r = runner.invoke(app, ["export-ordering", str(ck), "-o", str(mine), "--base", str(base_dir)])
    assert r.exit_code == 2 and "mydata.jsonl: already exists" in r.output and "--overwrite" in r.output
    assert mine.read_text() == '{"keep": 1}\n'
    r = runner.invoke(app, ["export-ordering", str(ck), "-o", str(mine), "--base", str(base_dir), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads(mine.read_text())["order"] == ["chem", "prot", "cot"]


def test_plot_scalings_refuses_existing_figures_without_overwrite(tiny, tmp_path):
    base_dir, experts = tiny
    m = XLoraModel.from_experts(load_base(base_dir), experts)
    m.enable_scalings_logging()
    m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    m.flush_log_scalings(tmp_path / "log")
    (tmp_path / "fig").mkdir()
    (tmp_path / "fig" / "scalings_heatmap.png").write_text("my figure")
    r = runner.invoke(app, ["plot-scalings", str(tmp_path / "log"), "-o", str(tmp_path / "fig")])
    assert r.exit_code == 2 and "scalings_heatmap.png: already exists" in r.output, r.output
    assert (tmp_path / "fig" / "scalings_heatmap.png").read_text() == "my figure"
    r = runner.invoke(app, ["plot-scalings", str(tmp_path / "log"), "-o", str(tmp_path / "fig"), "--overwrite"])
    assert r.exit_code == 0, r.output


def test_training_outputs_are_checked_like_every_other_writer(train_setup, tmp_path):
    """--out existing needs --overwrite; --out or the run directory inside an input is always refused."""
    base_dir, experts, data, _ = train_setup
    gate = ["train-gate", "--base", str(base_dir), "--data", str(data), "--steps", "1"]
    gate += [f"--experts={n}={p}" for n, p in experts.items()]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "xlora_config.json").write_text("{}")  # an earlier checkpoint
    r = runner.invoke(app, [*gate, "--out", str(taken)])
    assert r.exit_code == 2 and "taken: already exists" in r.output, r.output
    for out in (experts["chem"] / "gate", base_dir / "gate"):
        r = runner.invoke(app, [*gate, "--out", str(out), "--overwrite"])
        assert r.exit_code == 2 and "which this command reads" in r.output, r.output
    r = runner.invoke(app, [*gate, "--out", str(tmp_path / "g"), "--run-dir", str(experts["chem"])])
    assert r.exit_code == 2 and "which this command reads" in r.output, r.output
    expert = ["train-expert", "--base", str(base_dir), "--data", str(data), "--steps", "1"]
    r = runner.invoke(app, [*expert, "--out", str(experts["prot"])])
    assert r.exit_code == 2 and "already exists" in r.output, r.output


# ---------------------------------------------------------------------- 7, 8: only the saver's own leftovers


def test_a_users_look_alike_folder_beside_the_checkpoint_is_never_swept(model, tmp_path):
    ck = model.save_pretrained(tmp_path / "ck")
    mine = [tmp_path / ".ck.old-backup", tmp_path / ".ck.tmp-1-2-deadbeef", tmp_path / ".ck.new-99999999-1-0badcafe"]
    for folder in mine:
        folder.mkdir()
        (folder / "notes.txt").write_text("years of work")
    model.save_pretrained(ck)
    model.save_pretrained(ck)
    for folder in mine:
        assert (folder / "notes.txt").read_text() == "years of work"


def test_recovery_never_adopts_a_users_folder(model, tiny, tmp_path):
    """`from_pretrained(base, "pr")` with no `pr` renamed a user's `.pr.new-v2` to `pr` and loaded it."""
    base_dir, _ = tiny
    saved = model.save_pretrained(tmp_path / "saved")
    for name in (".pr.new-v2", ".pr.new-99999999-1-0badcafe", ".pr.old-99999999-1-0badcafe"):
        shutil.copytree(saved, tmp_path / name)
    with pytest.raises(CheckpointError, match=r"pr: checkpoint directory does not exist"):
        XLoraModel.from_pretrained(load_base(base_dir), tmp_path / "pr")
    assert not (tmp_path / "pr").exists()
    assert sorted(p.name for p in tmp_path.glob(".pr.*")) == sorted(
        [".pr.new-v2", ".pr.new-99999999-1-0badcafe", ".pr.old-99999999-1-0badcafe"]
    )


# ---------------------------------------------------------------------- 21: one save at a time per destination


def test_a_concurrent_save_to_the_same_folder_fails_clearly(model, tmp_path):
    from xlora.formats.locks import destination_lock, hold_lock

    target = model.save_pretrained(tmp_path / "ck")
    before = tree(target)
    errors: list[BaseException] = []

    def other_save() -> None:
        try:
            model.save_pretrained(target)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with hold_lock(destination_lock(target), "held by the test"):  # what a save in progress holds
        thread = threading.Thread(target=other_save)
        thread.start()
        thread.join()
    assert len(errors) == 1 and isinstance(errors[0], CheckpointError)
    assert re.fullmatch(
        rf"{re.escape(str(target))}: another save to it is running; .*\(pid \d+ on .+ since .+\)", str(errors[0])
    )
    assert tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no lock file or temp folder left


def test_many_concurrent_saves_each_succeed_or_say_another_save_is_running(model, tiny, tmp_path):
    base_dir, _ = tiny
    target = tmp_path / "ck"
    errors: list[BaseException] = []

    def saves() -> None:
        for _ in range(4):
            try:
                model.save_pretrained(target)
            except BaseException as e:  # noqa: BLE001 - checked below
                errors.append(e)

    threads = [threading.Thread(target=saves) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all("another save to it is running" in str(e) for e in errors), [str(e) for e in errors]
    XLoraModel.from_pretrained(load_base(base_dir), target)  # complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# ---------------------------------------------------------------------- 24: one-line errors, one shared check


def test_a_pickled_base_is_refused_in_one_line(tiny, tmp_path):
    base_dir, _ = tiny
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in base_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, pickled / f.name)
    torch.save(load_base(base_dir), pickled / "pytorch_model.bin")  # a whole pickled model, not a state dict
    r = runner.invoke(app, ["generate", "-p", "hi", "--base", str(pickled), "--max-new-tokens", "1"])
    assert r.exit_code == 2 and not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit)
    assert "hold pickled Python objects" in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_convert_of_a_peft_saved_folder_gives_the_load_message(tiny, tmp_path):
    """PEFT >= 0.20 saves part of the classifier into the experts' files: convert said 'unexpected tensor'."""
    base_dir, experts = tiny
    cfg = PeftXLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=64,
        xlora_depth=2,
        xlora_size=16,
        adapters={str(i): str(p) for i, p in enumerate(experts.values())},
    )
    get_peft_model(load_base(base_dir), cfg).save_pretrained(tmp_path / "peft_saved")
    with pytest.raises(CheckpointError) as loaded:
        XLoraModel.from_pretrained(load_base(base_dir), tmp_path / "peft_saved")
    r = runner.invoke(app, ["convert", str(tmp_path / "peft_saved"), str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.strip() == f"error: {loaded.value}", r.output
    assert "PEFT >= 0.20 saves X-LoRA checkpoints without all classifier weights" in r.output


# ---------------------------------------------------------------------- test hooks


def test_no_test_hook_lives_in_the_package():
    """Faults (a SIGKILL mid-save) are injected by the tests themselves, never through an environment variable."""
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "XLORA_TEST_" in p.read_text()]
    assert not offenders, offenders


def test_an_interrupted_cleanup_leaves_a_marked_folder_the_sweep_still_owns(tiny_checkpoint, tmp_path, monkeypatch):
    """The old copy is deleted marker last: a kill midway must not leave an unmarked copy forever."""
    import shutil as real_shutil

    import xlora.formats.atomic as atomic

    folder = tmp_path / ".ck.old-1-2-deadbeef"
    real_shutil.copytree(tiny_checkpoint[1], folder)
    (folder / atomic.MARKER).write_text("{}")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies inside the first subfolder's removal

    monkeypatch.setattr(atomic.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic.remove_marked(folder)
    assert (folder / atomic.MARKER).is_file()  # still the saver's, so the next save may sweep it
    monkeypatch.undo()
    atomic.remove_marked(folder)
    assert not folder.exists()


def test_a_pickled_payload_is_refused_in_one_line_without_torchs_advice(tiny_checkpoint, tmp_path):
    """torch's refusal text explains how to run the payload; ours names the file and says nothing ran."""
    from xlora.core.experts import ExpertError, read_expert

    marker = tmp_path / "PWNED"
    payload = b"\x80\x04cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint[1], ck)
    (ck / "xlora_classifier.safetensors").unlink()
    (ck / "xlora_classifier.pt").write_bytes(payload)
    with pytest.raises(ValueError) as caught:
        XLoraModel.from_pretrained(load_base(tiny_checkpoint[0]), ck)
    expert = ck / "chem"
    (expert / "adapter_model.safetensors").unlink()
    (expert / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(ExpertError) as caught_expert:
        read_expert("chem", expert)
    for e in (caught.value, caught_expert.value):
        text = str(e)
        assert "holds code or objects other than tensors" in text and "nothing in it was run" in text
        assert "\n" not in text and "weights_only" not in text
    assert not marker.exists()


def test_wrong_kinds_of_path_say_what_they_are(tiny_checkpoint, tmp_path):
    base_dir, ck = tiny_checkpoint
    script = tmp_path / "mk.py"
    script.write_text("x = 1\n")
    with pytest.raises(CheckpointError, match=r"mk\.py: is a file; expected an X-LoRA checkpoint directory"):
        XLoraModel.from_pretrained(load_base(base_dir), script)
    odd = tmp_path / "odd"
    shutil.copytree(ck, odd)
    (odd / "xlora_config.json").unlink()
    (odd / "xlora_config.json").mkdir()
    r = runner.invoke(app, ["info", str(odd)])
    assert r.exit_code == 2 and "xlora_config.json: is a directory or a special file" in r.output
    r = runner.invoke(app, ["info", str(script)])
    assert r.exit_code == 2 and "mk.py: is a file; expected an X-LoRA checkpoint or a PEFT adapter" in r.output
    r = runner.invoke(app, ["generate", "--base", "", "-p", "w1"])
    assert r.exit_code == 2 and "base: must not be empty" in r.output
    r = runner.invoke(app, ["plot-scalings", str(tmp_path / "nope.npz")])
    assert r.exit_code == 2 and "nope.npz: scalings log file not found" in r.output


def test_a_full_disk_names_the_destination(tiny_checkpoint, tmp_path, monkeypatch):
    """ENOSPC carries no file name; every writer says which destination it could not write."""
    import errno

    base_dir, ck = tiny_checkpoint
    model = XLoraModel.from_pretrained(load_base(base_dir), ck)
    real_write = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".") or "tmp" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "ord.json"
    r = runner.invoke(app, ["export-ordering", str(ck), "-o", str(out), "--base", str(base_dir)])
    assert r.exit_code == 2 and f"{out}: cannot write it (No space left on device)" in r.output, r.output
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(OSError, match=rf"{re.escape(str(tmp_path / 'saved'))}: cannot write it \(No space left"):
        model.save_pretrained(tmp_path / "saved")


def test_a_full_disk_while_taking_the_lock_names_the_folder_and_leaves_no_lock(tiny_checkpoint, tmp_path, monkeypatch):
    import errno
    import os

    import xlora.formats.locks as locks

    base_dir, ck = tiny_checkpoint
    model = XLoraModel.from_pretrained(load_base(base_dir), ck)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(locks.os, "pwrite", full)
    with pytest.raises(OSError, match=rf"{re.escape(str(tmp_path))}: cannot write there \(No space left"):
        model.save_pretrained(tmp_path / "sp")
    monkeypatch.setattr(locks.os, "pwrite", os.pwrite)
    assert not list(tmp_path.iterdir())  # no .sp.lock, nothing else
