"""Every ```python block of the README and the docs runs as written, on the embedded base and the shipped experts."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = {"index.md", "results.md", "performance.md", "changelog.md"}  # docs/generate.py copies, not sources
pytestmark = pytest.mark.embedded


def sources() -> list[Path]:
    """The README and every hand-written docs page, in a fixed order."""
    docs = sorted(p for p in (ROOT / "docs").rglob("*.md") if p.relative_to(ROOT / "docs").as_posix() not in GENERATED)
    return [ROOT / "README.md", *docs]


def all_blocks() -> list[tuple[str, str]]:
    """(file, code) for every ```python block."""
    out = []
    for path in sources():
        for code in re.findall(r"```python\n(.*?)```", path.read_text(), re.S):
            out.append((path.relative_to(ROOT).as_posix(), code))
    return out


MARKERS = [
    'save_pretrained("my-xlora")',
    "constrained-checked",
    "openai.OpenAI",
    "quantization=",
    "Qwen2VLForConditionalGeneration",
]


def python_blocks() -> list[str]:
    """The known blocks, in MARKERS order, wherever they live."""
    blocks = all_blocks()
    found = []
    for marker in MARKERS:
        hits = [code for _, code in blocks if marker in code]
        assert len(hits) == 1, f"expected one Python block containing {marker!r}, found {len(hits)}"
        found.append(hits[0])
    return found


def test_the_docs_have_the_blocks_this_test_knows():
    blocks = all_blocks()
    assert len(blocks) == len(MARKERS), (
        f"a Python block was added or removed ({[f for f, _ in blocks]}): run it here too"
    )
    python_blocks()
    assert MARKERS[0] in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]


def test_api_block_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes my-xlora/ into the working directory
    namespace: dict = {}
    exec(compile(python_blocks()[0], "README.md[python 1]", "exec"), namespace)
    model, again, ids = namespace["model"], namespace["again"], namespace["ids"]
    assert (tmp_path / "my-xlora" / "xlora_config.json").is_file()
    assert namespace["s"].shape[2:] == (again.n_layers, 2)  # the last decoding step's scalings
    assert model.n_layers == 0 and again.n_layers == 120  # 30 layers x q,v,o,gate; unload() gave the plain base back
    assert again.expert_names == ["properties", "peptides"]
    ids_out = namespace["ids_out"]
    assert ids_out.shape[1] <= ids.shape[1] + 16
    assert capsys.readouterr().out.strip() != ""  # it printed the answer


def test_design_block_runs(capsys):
    """The constrained-checked design of the README: a SMILES with the asked heavy atoms, printed."""
    from rdkit import Chem

    namespace: dict = {}
    exec(compile(python_blocks()[1], "README.md[python 2]", "exec"), namespace)
    smiles = namespace["smiles"]
    assert capsys.readouterr().out.strip() == smiles
    mol = Chem.MolFromSmiles(smiles, sanitize=False)  # the grammar guarantees syntax and heavy atoms
    assert mol is not None and sorted(a.GetSymbol() for a in mol.GetAtoms()) == ["C"] * 6 + ["O"]


def test_quantized_base_block_runs(capsys):
    pytest.importorskip("bitsandbytes")
    namespace: dict = {}
    exec(compile(python_blocks()[3], "README.md[python 4]", "exec"), namespace)
    layer = namespace["model"].xlora_layers[0]
    assert type(layer.base_layer).__name__ == "Linear4bit"  # the base stayed 4-bit under the mixture
    assert capsys.readouterr().out.strip() != ""


def test_vision_language_block_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes tiny-vlm/, charts/ and photos/ into the working directory
    namespace: dict = {}
    exec(compile(python_blocks()[4], "README.md[python 5]", "exec"), namespace)
    model, ids = namespace["model"], namespace["ids"]
    assert namespace["logits"].shape[:2] == ids.shape
    assert model.n_layers == 4 and all(".language_model." in name for name in model.module_names)
    assert namespace["out"].shape[1] > ids.shape[1]
    assert capsys.readouterr().out.strip() != ""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_serving_block_runs_against_xlora_serve(tmp_path, capsys):
    """The block talks to `xlora serve --checkpoint my-xlora` on port 8000: start that server here."""
    import uvicorn

    from xlora import XLoraConfig, XLoraModel, load_default_base, shipped_checkpoint
    from xlora.serve.app import create_app
    from xlora.serve.engine import Engine

    base, tok = load_default_base()
    shipped = shipped_checkpoint()
    model = XLoraModel.from_experts(
        base,
        {"properties": shipped / "molecule-properties", "peptides": shipped / "peptides"},
        XLoraConfig(xlora_depth=2, xlora_size=32, layerwise_scalings=True),
    )
    code = python_blocks()[2]
    port = 8000
    if not _port_free(port):  # another program holds 8000 here: same code, another port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    server = uvicorn.Server(
        uvicorn.Config(create_app(Engine(model, tok), "my-xlora"), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(400):
            if server.started:
                break
            time.sleep(0.05)
        namespace: dict = {}
        exec(compile(code, "README.md[python 2]", "exec"), namespace)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    summary = namespace["r"].model_extra["xlora"]["summary"]
    assert set(summary) == {"properties", "peptides"}
    assert capsys.readouterr().out.count("\n") >= 2
