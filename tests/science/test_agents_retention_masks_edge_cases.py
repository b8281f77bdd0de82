"""Edge cases of the agents case study, the retention scorer and masks under
static scalings, each test a defect found by attacking them (tiny models only)."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch
from helpers import load_base
from typer.testing import CliRunner

from xlora import XLoraConfig, XLoraModel
from xlora.cli import app
from xlora.science.agents import AgentsConfig, Triple, parse_triples, write_run
from xlora.science.tasks import Item
from xlora.science.tasks.retention import retention_outcomes

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def test_retention_scores_answers_that_restate_the_question():
    """Real SmolLM2 answers (greedy, 12 tokens) open with the question's numbers; the first integer
    was then an operand, so "4 * 6 = 24" scored wrong and the base's correct rate read 0."""
    cases = [  # (question, answer, right answer, is it right, did an answer parse)
        ("What is 4 times 6?", "4 * 6 = 24\n\nIn this", 24, 1.0, 1.0),
        ("What is 3 times 7?", "3 times 7 is 21.", 21, 1.0, 1.0),
        ("What is 59 plus 63?", "59 + 63 = 176.", 122, 0.0, 1.0),
        ("What is 47 minus 33?", "47 - 33 = 11", 14, 0.0, 1.0),
        ("What is 9 times 8?", "To find 9 times 8, we can use the", 72, 0.0, 0.0),  # only the question
        ("What is 40 minus 20?", "20", 20, 1.0, 1.0),  # a bare answer equal to an operand still counts
        ("What is 5 plus 6?", "15 + 6 = 21", 11, 0.0, 1.0),  # 15 is not the operand 5
        ("How many grams are in 3 kilograms?", "3 kilograms is 3000 grams.", 3000, 1.0, 1.0),
        ("How many grams are in 3 kilograms?", "To convert 3 kilograms to grams, you", 3000, 0.0, 0.0),
    ]
    items = [
        Item("retention", f"{q} Answer with a number.", str(a), {"answer": a, "kind": "x"}) for q, _, a, _, _ in cases
    ]
    out = retention_outcomes(items, [c[1] for c in cases])
    assert out == {"correct_rate": [c[3] for c in cases], "parsed_rate": [c[4] for c in cases]}


def test_agents_topic_or_relation_with_dollar_signs_writes_every_file(tmp_path):
    """matplotlib read `$...$` in the title (the topic) or an edge label (a model-written relation) as
    math and failed after the dialogue, leaving graph.graphml alone: no transcript, no summary."""
    triples = [Triple(*parse_triples(r"water | $\foo$ is | polar")[0], "model", 1, "answerer")]
    write_run(
        tmp_path, AgentsConfig(r"the $\foo$ of acids"), [{"turn": 1, "speaker": "a", "kind": "q", "text": "Q"}], triples
    )
    for name in ("graph.graphml", "graph.png", "transcript.md", "triples.jsonl", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "summary.json").read_text())["topic"] == r"the $\foo$ of acids"


def test_model_written_relations_with_control_characters_keep_graphml_readable(tmp_path):
    """A relation copied verbatim from the model's text could hold control characters: the GraphML was
    written, but no reader (networkx included) could parse it back."""
    found = parse_triples("water | is\x01 a\x1b[0m | polar molecule")
    assert found == [("water", "is a0m", "polar molecule")]
    write_run(tmp_path, AgentsConfig("t"), [], [Triple(*found[0], "model", 1, "answerer")])
    assert nx.read_graphml(tmp_path / "graph.graphml").edges["water", "polar molecule"]["relation"] == "is a0m"


def test_agents_cli_takes_quantize(checkpoint, tmp_path):
    """Every command that loads a base takes --quantize; `xlora agents` did not."""
    base_dir, path = checkpoint
    args = ["agents", "--topic", "w7", "--checkpoint", str(path), "--base", str(base_dir), "--out", str(tmp_path)]
    r = runner.invoke(app, args + ["--turns", "1", "--max-new-tokens", "2", "--quantize", "int8"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "summary.json").is_file()


def test_agents_cli_checks_out_before_the_dialogue(checkpoint, tmp_path, monkeypatch):
    """--out naming a file failed only after the whole dialogue ran, as 'FileExistsError: File exists'."""
    import xlora.science.agents as agents

    def never(*a, **k):
        raise AssertionError("the dialogue ran before --out was checked")

    monkeypatch.setattr(agents, "run_dialogue", never)
    base_dir, path = checkpoint
    target = tmp_path / "afile"
    target.write_text("x")
    args = ["agents", "--topic", "w7", "--checkpoint", str(path), "--base", str(base_dir), "--out", str(target)]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "expected a folder" in r.output, r.output


def test_top_k_under_a_mask_never_picks_a_masked_expert(tiny):
    """Masked experts become 0; with top_k_lora=1 that 0 outranked a kept expert's negative static
    weight, so masking two experts also dropped the third: the output was the plain base."""
    base_dir, experts = tiny
    model = XLoraModel.from_experts(load_base(base_dir), experts, XLoraConfig(xlora_depth=2, xlora_size=8))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        with model.static_scalings([-0.5, 0.0, 0.0]):  # chem alone at -0.5, no top-k
            expected = model(input_ids=ids).logits
            expected_ids = model.generate(ids, max_new_tokens=4)
        with model.disable_experts():
            plain = model(input_ids=ids).logits
        assert not torch.allclose(expected, plain)
        model.set_topk_lora(1)
        with model.static_scalings([-0.5, 1.0, 0.2]), model.mask_experts(["prot", "cot"]):
            got = model(input_ids=ids).logits
            got_ids = model.generate(ids, max_new_tokens=4)  # merged decoding: top-k in merge.py
    torch.testing.assert_close(got, expected)
    assert torch.equal(got_ids, expected_ids)
