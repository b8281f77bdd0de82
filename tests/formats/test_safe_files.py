"""Trust in checkpoint files: names never escape their folder, saves never lose the old copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_base, sharpen
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import xlora.formats.atomic as safe_write
from xlora import CheckpointError, ExpertError, XLoraConfig, XLoraModel
from xlora.cli import app
from xlora.formats.convert import convert_checkpoint

runner = CliRunner()
HOSTILE = ["../../ESCAPED", "/tmp/ESCAPED-abs", "..", ".hidden", "a/b", "a\\b", "", "x" * 300]


@pytest.fixture
def model(tiny) -> XLoraModel:
    base_dir, experts = tiny
    m = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(xlora_depth=2, xlora_size=8))
    sharpen(m, 0.5, seed=4)
    return m


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def logits(m: XLoraModel) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=torch.tensor([[3, 4, 5, 6]])).logits


# ---------------------------------------------------------------------- names and paths from files


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_expert_names_in_files_are_refused_by_every_reader(model, tiny, tmp_path, bad):
    base_dir, _ = tiny
    work = tmp_path / "a" / "b"
    native = model.save_pretrained(work / "native")
    cfg = json.loads((native / "xlora_config.json").read_text())
    cfg["adapters"][0] = bad
    (native / "xlora_config.json").write_text(json.dumps(cfg))
    peft = model.save_pretrained(work / "peft", format="peft")
    names = json.loads((peft / "xlora_expert_names.json").read_text())
    names["names"][0] = bad
    (peft / "xlora_expert_names.json").write_text(json.dumps(names))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for src in (native, peft):
        with pytest.raises((ExpertError, CheckpointError), match="expert name"):
            XLoraModel.from_pretrained(load_base(base_dir), src)
        for to in ("native", "peft"):
            with pytest.raises((ExpertError, CheckpointError), match="expert name"):
                convert_checkpoint(src, work / f"out-{to}", to)
        r = runner.invoke(app, ["export-ordering", str(src), "-o", str(work / "order.json"), "--base", str(base_dir)])
        assert r.exit_code != 0 and "expert name" in r.output
    r = runner.invoke(app, ["info", str(native)])
    assert r.exit_code != 0 and "expert name" in r.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not Path("/tmp/ESCAPED-abs").exists()


def test_paths_stored_in_a_checkpoint_never_lead_outside_it(model, tiny, tmp_path):
    """The original layout's `adapters` dict may name folders: used only inside the checkpoint."""
    base_dir, experts = tiny
    ck = model.save_pretrained(tmp_path / "ck")
    outside = tmp_path / "elsewhere"
    shutil.move(ck / "chem", outside)
    cfg = json.loads((ck / "xlora_config.json").read_text())
    cfg["adapters"] = {"chem": str(outside), "prot": "prot", "cot": "./cot"}
    (ck / "xlora_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"chem/ for expert 'chem' is missing .*pass adapters="):
        XLoraModel.from_pretrained(load_base(base_dir), ck)
    (ck / "chem").symlink_to(outside)  # a symlink out of the checkpoint is refused too, and said so
    with pytest.raises(CheckpointError, match=r"chem/ for expert 'chem' leads outside the checkpoint \(a symlink"):
        XLoraModel.from_pretrained(load_base(base_dir), ck)
    r = runner.invoke(app, ["info", str(ck)])
    assert r.exit_code != 0 and "outside the checkpoint" in r.output
    (ck / "chem").unlink()
    # a relative stored path inside the checkpoint is resolved against it, not the working directory
    shutil.copytree(outside, ck / "sub" / "chem-folder")
    cfg["adapters"]["chem"] = "sub/chem-folder"
    (ck / "xlora_config.json").write_text(json.dumps(cfg))
    loaded = XLoraModel.from_pretrained(load_base(base_dir), ck)
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    # the caller may point anywhere explicitly
    explicit = XLoraModel.from_pretrained(load_base(base_dir), ck, adapters={**experts, "chem": outside})
    torch.testing.assert_close(logits(explicit), logits(model), atol=0, rtol=0)


def test_a_copied_peft_format_checkpoint_uses_its_own_expert_folders(model, tiny, tmp_path):
    base_dir, _ = tiny
    original = model.save_pretrained(tmp_path / "orig", format="peft")
    stored = json.loads((original / "adapter_config.json").read_text())["adapters"]
    assert all(Path(p).is_absolute() for p in stored.values())  # PEFT needs absolute paths
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    for i in range(3):  # the original's experts now differ: the copy must not read them
        w = original / str(i) / "adapter_model.safetensors"
        save_file({k: v * 3 for k, v in load_file(str(w)).items()}, str(w))
    loaded = XLoraModel.from_pretrained(load_base(base_dir), copy)
    assert all(src.resolve().is_relative_to(copy.resolve()) for src, _ in loaded.expert_sources.values())
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    shutil.rmtree(original)
    torch.testing.assert_close(logits(XLoraModel.from_pretrained(load_base(base_dir), copy)), logits(model))


# ---------------------------------------------------------------------- atomic replacement


@pytest.mark.parametrize("failing_call", [1, 2, 3])
def test_a_failed_rename_always_leaves_the_old_checkpoint_byte_identical(model, tmp_path, monkeypatch, failing_call):
    """Calls of os.replace in a replacement: 1 tmp->new, 2 old->aside, 3 new->path."""
    target = model.save_pretrained(tmp_path / "ck")
    before = tree(target)
    sharpen(model, 0.9, seed=9)  # the new save differs
    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(safe_write.os, "replace", flaky)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(target)
    monkeypatch.setattr(safe_write.os, "replace", real)
    assert tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no leftovers


KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from helpers import kill_at_save_step, load_base, sharpen
exec(kill_at_save_step({point!r}, "ck"))
from xlora import XLoraConfig, XLoraModel
experts = {experts!r}
m = XLoraModel.from_experts(load_base({base!r}), experts, XLoraConfig(xlora_depth=2, xlora_size=8))
sharpen(m, 0.7, seed=11)
m.save_pretrained({target!r})
"""


@pytest.mark.parametrize("point", ["new", "swap"])
def test_a_kill_during_replacement_is_recovered(model, tiny, tmp_path, point):
    """SIGKILL after the new copy is complete: the next load or save finds a whole checkpoint."""
    base_dir, experts = tiny
    target = model.save_pretrained(tmp_path / "ck")
    before = tree(target)
    script = KILL_SCRIPT.format(
        tests=str(Path(__file__).resolve().parents[1]),
        experts={k: str(v) for k, v in experts.items()},
        base=str(base_dir),
        target=str(target),
        point=point,
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    assert target.exists() == (point == "new")  # "swap": the window between the two renames
    loaded = XLoraModel.from_pretrained(load_base(base_dir), target)
    if point == "new":  # killed before the old copy moved: the old one stays, whole
        assert tree(target) == before
        torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    else:  # killed between the two renames: no checkpoint at the path; the load puts the complete new one there
        assert tree(target) != before
        assert not torch.equal(logits(loaded), logits(model))
    model.save_pretrained(target)  # and the next save sweeps every leftover
    assert tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_destinations_are_checked_with_the_given_path(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    for dest in (".", "./", "..", str(tmp_path)):
        for fmt in ("native", "peft"):
            with pytest.raises(CheckpointError, match="refusing to write over the current directory"):
                model.save_pretrained(dest, format=fmt)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    for fmt in ("native", "peft"):
        with pytest.raises(CheckpointError, match=r"^afile/sub: .*afile is a file, not a directory"):
            model.save_pretrained("afile/sub", format=fmt)
        with pytest.raises(CheckpointError, match=r"^afile: exists and is not a directory"):
            model.save_pretrained("afile", format=fmt)
    with pytest.raises(CheckpointError, match=r"^/proc/xlora-x: cannot write in /proc"):
        model.save_pretrained("/proc/xlora-x")


def test_non_finite_or_corrupt_classifier_is_refused(model, tiny, tmp_path):
    base_dir, _ = tiny
    ck = model.save_pretrained(tmp_path / "ck")
    path = ck / "xlora_classifier.safetensors"
    good = load_file(str(path))
    for bad in (float("nan"), float("inf")):
        state = dict(good)
        key = sorted(state)[0]
        state[key] = state[key].clone()
        state[key].view(-1)[0] = bad
        save_file(state, str(path))
        with pytest.raises(
            CheckpointError, match=r"xlora_classifier.safetensors: classifier tensor .* NaN or infinite"
        ):
            XLoraModel.from_pretrained(load_base(base_dir), ck)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=r"xlora_classifier.safetensors: not a readable safetensors file"):
        XLoraModel.from_pretrained(load_base(base_dir), ck)
    r = runner.invoke(app, ["convert", str(ck), str(tmp_path / "out")])
    assert r.exit_code == 2 and "not a readable safetensors file" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------------- found by the hostile review


def test_saves_never_replace_a_folder_of_other_files(model, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    for fmt in ("native", "peft"):
        with pytest.raises(CheckpointError, match=r"thesis: exists, is not empty and is not an X-LoRA checkpoint"):
            model.save_pretrained(folder, format=fmt)
    assert (folder / "thesis.tex").read_text() == "years of work"
    (tmp_path / "empty").mkdir()
    model.save_pretrained(tmp_path / "empty")  # an empty folder, or an earlier checkpoint, may be replaced
    model.save_pretrained(tmp_path / "empty")


def test_convert_never_writes_over_or_into_its_source(model, tmp_path):
    parent = tmp_path / "parent"
    ck = model.save_pretrained(parent / "ck")
    (parent / "notes.txt").write_text("keep")
    for dst in (parent, ck, ck / "inner"):
        r = runner.invoke(app, ["convert", str(ck), str(dst), "--overwrite"])
        assert r.exit_code == 2, r.output
    assert (parent / "notes.txt").read_text() == "keep" and (ck / "xlora_config.json").is_file()


def test_symlinked_adapter_files_are_never_read_or_copied(model, tiny, tmp_path):
    base_dir, _ = tiny
    ck = model.save_pretrained(tmp_path / "ck")
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (ck / "chem" / "README.md").unlink()
    (ck / "chem" / "README.md").symlink_to(secret)
    with pytest.raises(CheckpointError, match=r"README.md: leads outside its adapter folder"):
        XLoraModel.from_pretrained(load_base(base_dir), ck)
    r = runner.invoke(app, ["convert", str(ck), str(tmp_path / "out")])
    assert r.exit_code == 2 and not (tmp_path / "out").exists()
    copies = [p for p in tmp_path.rglob("*.md") if p.is_file() and not p.is_symlink()]
    assert not any("private key" in p.read_text(errors="ignore") for p in copies)


def test_pathological_pattern_regexes_fail_fast(tiny, tmp_path):
    import time

    base_dir, experts = tiny
    bad = tmp_path / "bad"
    shutil.copytree(experts["chem"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"(.|.)*Z": 4}
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()  # hung the loader with Python's re (exponential backtracking)
    XLoraModel.from_experts(load_base(base_dir), {"chem": bad})
    assert time.perf_counter() - t0 < 30
    import xlora.core.adapter_config as experts_module

    cfg["alpha_pattern"] = {"q_proj": 4}
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    original = experts_module.PATTERN_TIMEOUT_S
    experts_module.PATTERN_TIMEOUT_S = 1e-9  # any match now runs out of time: the error path
    try:
        with pytest.raises(ExpertError, match=r"alpha_pattern'?: regex 'q_proj' takes over .*backtracking"):
            XLoraModel.from_experts(load_base(base_dir), {"chem": bad})
    finally:
        experts_module.PATTERN_TIMEOUT_S = original


@pytest.mark.parametrize("bad", ["chem\n", "chem\r", " chem"[1:] + "\n"])
def test_names_with_line_breaks_are_refused(bad):
    from xlora.core.experts import check_expert_name

    with pytest.raises(ExpertError, match="expert name"):
        check_expert_name(bad)


def test_run_dir_inside_out_is_refused(train_setup, tmp_path):
    from training_helpers import run_gate

    for run_dir in (tmp_path / "g", tmp_path / "g" / "run"):
        with pytest.raises(CheckpointError, match=r"run directory must not be --out"):
            run_gate(train_setup, tmp_path / "g", max_steps=1, run_dir=str(run_dir))
