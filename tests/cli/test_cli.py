"""The `xlora` command line on a tiny local model with a word-level tokenizer."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from helpers import add_tiny_tokenizer, load_base
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from xlora import XLoraConfig, XLoraModel
from xlora.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tok_base(tiny):
    base_dir, experts = tiny
    add_tiny_tokenizer(base_dir)
    return base_dir, experts


def test_generate_with_experts_streams_and_summarises(tok_base):
    base_dir, experts = tok_base
    torch.manual_seed(0)  # the new gate is random: whatever ran before must not decide what it generates
    args = ["generate", "--base", str(base_dir), "--prompt", "w5 w6 w7", "--max-new-tokens", "6"]
    for name, path in experts.items():
        args += ["--experts", f"{name}={path}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"expert weights: chem=0\.\d{3}, prot=0\.\d{3}, cot=0\.\d{3}", result.output)
    assert re.search(r"w\d+", result.output.split("expert weights:")[0])  # streamed words


def test_generate_from_checkpoint_matches_library(tok_base, tmp_path):
    base_dir, experts = tok_base
    model = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(xlora_depth=2, xlora_size=8))
    model.save_pretrained(tmp_path / "ck")
    result = runner.invoke(
        app,
        [
            "generate",
            "--base",
            str(base_dir),
            "--checkpoint",
            str(tmp_path / "ck"),
            "-p",
            "w9",
            "--no-chat",
            "--max-new-tokens",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    out = model.generate(torch.tensor([[15]]), max_new_tokens=5, eos_token_id=1, pad_token_id=0)  # "w9"
    words = " ".join(f"w{t - 6}" for t in out[0, 1:].tolist() if t > 5)
    assert words in result.output


def test_generate_errors(tok_base, tmp_path):
    base_dir, experts = tok_base
    r = runner.invoke(app, ["generate", "--base", str(base_dir), "-p", "x", "--experts", "nodir"])
    assert r.exit_code == 2 and "expected NAME=DIR" in r.output
    r = runner.invoke(app, ["generate", "--base", str(base_dir), "-p", "x", "--experts", f"a={tmp_path}/missing"])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["generate", "--base", str(tmp_path), "-p", "x"])
    assert r.exit_code == 2 and "not a local model directory" in r.output


def test_info(tok_base, tmp_path):
    base_dir, experts = tok_base
    model = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(layerwise_scalings=True))
    model.save_pretrained(tmp_path / "ck")
    r = runner.invoke(app, ["info", str(tmp_path / "ck")])
    assert r.exit_code == 0, r.output
    assert "chem" in r.output and "q_proj,v_proj,down_proj".split(",")[0] in r.output
    assert "layerwise_scalings=True" in r.output
    r = runner.invoke(app, ["info", str(experts["cot"])])
    assert r.exit_code == 0 and "yes" in r.output  # rsLoRA
    r = runner.invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 2 and "neither an X-LoRA checkpoint" in r.output


def one_error_line(result) -> str:
    """The single `error: ...` line that ends a failed command (no traceback; notes may precede it)."""
    lines = [line for line in result.output.splitlines() if line.strip() and "Loading weights" not in line]
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert "Traceback" not in result.output
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    return errors[0]


def test_every_command_runs_under_the_error_guard():
    """Commands registered here, in cli_train.py and in cli_science.py are all wrapped."""
    names = {info.name or info.callback.__name__ for info in app.registered_commands}
    assert {"generate", "info", "convert", "serve", "train-expert", "train-gate", "reproduce", "eval"} <= names
    for info in app.registered_commands:
        assert hasattr(info.callback, "__wrapped__"), info.name


def _boom(exc: BaseException):
    def raise_it(*args, **kwargs):
        raise exc

    return raise_it


def _errors():
    import json

    from safetensors import SafetensorError

    from xlora import CheckpointError, ExpertError, XLoraConfigError

    return [
        SafetensorError("Error while deserializing header: incomplete metadata"),
        json.JSONDecodeError("Expecting value", "{", 0),
        UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte"),
        FileNotFoundError("x.json: file not found"),
        PermissionError(13, "Permission denied", "/root/x"),
        ExpertError("expert 'a': bad\nsecond line"),
        CheckpointError("ck: bad"),
        XLoraConfigError("XLoraConfig.xlora_depth: expected an integer >= 1, got 0"),
        ValueError("plain"),
    ]


@pytest.mark.parametrize(
    "target, args",
    [
        ("xlora.formats.summary.describe", ["info", "somewhere"]),
        ("xlora.formats.convert.convert_checkpoint", ["convert", "a", "b"]),
        ("xlora.bases.loading.load_base", ["train-expert", "--data", "d.jsonl", "--out", "o"]),  # cli_train.py
        ("xlora.bases.loading.load_base", ["train-gate", "--data", "d.jsonl", "--out", "o", "-e", "a=b"]),
        ("xlora.science.figures.plot_log", ["plot-scalings", "log"]),  # cli_science.py
    ],
)
def test_expected_errors_are_one_line_in_every_command(monkeypatch, target, args):
    module, _, name = target.rpartition(".")
    for exc in _errors():
        monkeypatch.setattr(f"{module}.{name}", _boom(exc))
        line = one_error_line(runner.invoke(app, args))
        assert str(exc).splitlines()[0] in line
    monkeypatch.setattr(f"{module}.{name}", _boom(RuntimeError("a real bug")))
    result = runner.invoke(app, args)  # internal faults keep their traceback
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)


def test_generate_option_errors(tok_base, tmp_path):
    base_dir, experts = tok_base
    args = ["generate", "--base", str(base_dir), "-p", "w1"]
    assert "--temperature: expected a number >= 0" in one_error_line(runner.invoke(app, [*args, "--temperature", "-1"]))
    assert "got nan" in one_error_line(runner.invoke(app, [*args, "--temperature", "nan"]))
    assert "--top-p only apply when sampling" in one_error_line(runner.invoke(app, [*args, "--top-p", "0.5"]))
    line = one_error_line(runner.invoke(app, [*args, "--temperature", "1", "--top-p", "2"]))
    assert "--top-p: expected a number in (0, 1]" in line
    line = one_error_line(runner.invoke(app, [*args, "-e", f"c={experts['chem']}", "--reuse-scalings-after", "0"]))
    assert "--reuse-scalings-after: expected an integer >= 1" in line
    long = ["--no-chat", "-p", " ".join(["w1"] * 600)]
    for extra in ([], ["-e", f"c={experts['chem']}"]):  # base model and X-LoRA
        line = one_error_line(runner.invoke(app, [*args, *long, *extra]))
        assert "600 prompt tokens + max_new_tokens=64 exceed the model's context of 512" in line


def test_bad_adapter_and_data_files_are_one_line(tok_base, tmp_path):
    base_dir, experts = tok_base
    nan = tmp_path / "nan"
    shutil.copytree(experts["chem"], nan)
    tensors = load_file(str(nan / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(nan / "adapter_model.safetensors"))
    r = runner.invoke(app, ["generate", "--base", str(base_dir), "-p", "w1", "-e", f"c={nan}"])
    assert f"{nan}/adapter_model.safetensors: tensor {key} has 1 non-finite" in one_error_line(r)

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "w1"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    r = runner.invoke(
        app, ["train-expert", "--base", str(base_dir), "--data", str(latin), "--out", str(tmp_path / "o")]
    )
    assert f"{latin}:2: not valid UTF-8" in one_error_line(r)


def test_dropped_examples_are_a_warning_line(tok_base, tmp_path, monkeypatch):
    base_dir, _ = tok_base
    monkeypatch.setattr("xlora.train.api.train_expert", lambda *a, **k: [])  # only the data loading matters here
    data = tmp_path / "d.jsonl"
    long = " ".join(f"w{i % 90}" for i in range(40))
    data.write_text(f'{{"prompt": "{long}", "completion": "w1"}}\n{{"prompt": "w1", "completion": "w2"}}\n')
    r = runner.invoke(
        app,
        [
            "train-expert",
            "--base",
            str(base_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            "--max-length",
            "16",
        ],
    )
    assert r.exit_code == 0, r.output
    assert re.search(r"warning: \S+d\.jsonl: of 2 examples, 1 dropped \(no loss token within max_length=16", r.output)


def test_help_shows_no_bool_type_after_flags():
    """typer's rich help printed `--help <bool>` (as if --help took a value) for every flag."""
    names = [info.name or info.callback.__name__ for info in app.registered_commands]
    for args in [["--help"], *[[name, "--help"] for name in names]]:
        r = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert r.exit_code == 0, (args, r.output)
        assert "--help" in r.output and "<bool>" not in r.output, (args, r.output)


def test_bad_device_is_one_line(tok_base):
    base_dir, _ = tok_base
    args = ["generate", "--base", str(base_dir), "-p", "w1", "--device"]
    assert "--device 'cdua': not a device name" in one_error_line(runner.invoke(app, [*args, "cdua"]))
    if not torch.cuda.is_available():
        assert "CUDA is not available on this machine" in one_error_line(runner.invoke(app, [*args, "cuda"]))


def test_training_device_and_max_length_are_checked(train_setup, tmp_path):
    base_dir, experts, data, _ = train_setup
    common = ["train-expert", "--base", str(base_dir), "--data", str(data), "--steps", "1"]
    r = runner.invoke(app, [*common, "--out", str(tmp_path / "a"), "--device", "cdua"])
    assert r.exit_code == 2 and "--device 'cdua'" in r.output
    r = runner.invoke(app, [*common, "--out", str(tmp_path / "b"), "--max-length", "100000"])
    assert r.exit_code == 2 and "longer than the base model's context" in r.output


def test_empty_prompt_is_refused_like_the_server(tok_base):
    base_dir, _ = tok_base
    line = one_error_line(runner.invoke(app, ["generate", "--base", str(base_dir), "-p", ""]))
    assert "-p: must not be empty" in line  # the option as given
    line = one_error_line(runner.invoke(app, ["generate", "--base", str(base_dir), "-p", "  \n"]))
    assert "--prompt: must not be empty" in line


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--targets", "embed_tokens"], "targets: 'embed_tokens' matches model.embed_tokens, a Embedding"),
        (["--targets", "q_prj"], "targets: 'q_prj' names no module of the base model"),
        (["--alpha", "nan"], "LoraOptions: alpha: expected a finite number > 0, got nan"),
        (["--rank", "0"], "LoraOptions: rank: expected an integer >= 1, got 0"),
        (["--lora-dropout", "1"], "LoraOptions: dropout: expected a number < 1"),
    ],
)
def test_expert_options_are_refused_before_training(train_setup, tmp_path, extra, message):
    """An expert `from_experts` would refuse, or a NaN alpha, fails before any step, writing nothing."""
    base_dir, _, data, _ = train_setup
    out = tmp_path / "e"
    r = runner.invoke(app, ["train-expert", "--base", str(base_dir), "--data", str(data), "--out", str(out), *extra])
    assert message in one_error_line(r)
    assert not out.exists() and not (tmp_path / "e-run").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--gate-steps", "0"], "reproduce: gate_steps: expected an integer >= 1, got 0"),
        (["--n-train", "-5"], "reproduce: n_train: expected an integer >= 1, got -5"),
        (["--gate-lr", "nan"], "reproduce: gate_lr: expected a finite number > 0"),
        (["--scaling-pass-layers", "99"], "--scaling-pass-layers 99: expected 1..2"),
        (["--out", "."], ".: refusing to write over the current directory"),
        (["--work", "{out}/w"], "expected two separate folders"),
    ],
)
def test_reproduce_options_are_checked_before_any_work(tok_base, tmp_path, monkeypatch, extra, message):
    base_dir, _ = tok_base
    monkeypatch.chdir(tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    extra = [x.replace("{out}", str(out)) for x in extra]
    args = ["reproduce", "--base", str(base_dir), "--out", str(out), "--work", str(work), *extra]
    assert message in one_error_line(runner.invoke(app, args))
    assert not work.exists() and not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "-p", "w1", "--max-new-tokens", "0"], "Invalid value for '--max-new-tokens'"),
        (["generate", "-p", "w1", "--bogus"], "No such option: --bogus"),
        (["info"], "Missing argument 'path'"),
    ],
)
def test_option_parsing_errors_are_one_line_too(args, message):
    """Typer's own errors (ranges, unknown options, missing arguments) look like every other error."""
    line = one_error_line(runner.invoke(app, args))
    assert message in line and line.endswith("--help)")


@pytest.mark.parametrize(
    "args, named",
    [
        (["make-protein-data", "--out", ""], "--out"),
        (["serve", "--checkpoint="], "--checkpoint"),
        (["info", ""], "an argument"),
        (["generate", "-p", "w1", "--checkpoint", ""], "--checkpoint"),
    ],
)
def test_an_empty_value_is_refused_not_read_as_the_working_folder(args, named, tmp_path, monkeypatch):
    """typer turns "" into Path("."): `--out ""` would write into the working directory."""
    monkeypatch.chdir(tmp_path)
    assert f"{named}: must not be empty" in one_error_line(runner.invoke(app, args))
    assert not list(tmp_path.iterdir())
