"""The agents case study: triple extraction on hand-made text, the knowledge graph and its files,
the roles' expert masks, and `xlora agents` end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch
from helpers import load_base
from typer.testing import CliRunner

from xlora import XLoraModel
from xlora.cli import app
from xlora.science.agents import (
    AgentsConfig,
    Triple,
    _masked,
    build_graph,
    parse_triples,
    rule_triples,
    run_dialogue,
    write_run,
)

runner = CliRunner()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Antimicrobial peptides disrupt bacterial membranes.",
            [("antimicrobial peptides", "disrupt", "bacterial membranes")],
        ),
        (
            "The HOMO-LUMO gap determines the reactivity of a molecule, which matters.",
            [("homo-lumo gap", "determines", "reactivity of a molecule")],
        ),
        ("Water is a molecule and it is polar.", [("water", "is a", "molecule")]),
        ("Benzene contains six carbon atoms. It is flat.", [("benzene", "contains", "six carbon atoms")]),
        (
            "Cationic peptides bind to anionic lipids; they are short.",
            [("cationic peptides", "bind to", "anionic lipids")],
        ),
        ("It is a protein. What is this? Hello there.", []),  # pronoun subjects and no relation: nothing
        ("The protein is antimicrobial.", [("protein", "is", "antimicrobial")]),  # "is a" needs the word "a"
    ],
)
def test_rule_triples_on_hand_made_sentences(text, expected):
    assert rule_triples(text) == expected


def test_parse_triples_reads_only_well_formed_lines():
    text = "1. Water | is | a polar molecule\n- benzene | contains | carbon.\nno pipes here\na | b\n | x | y"
    assert parse_triples(text) == [("water", "is", "polar molecule"), ("benzene", "contains", "carbon")]


def test_graph_merges_repeated_edges_and_round_trips_through_graphml(tmp_path):
    triples = [
        Triple("water", "is", "polar", "rules", 1, "answerer"),
        Triple("water", "has", "polar", "model", 2, "answerer"),
        Triple("benzene", "contains", "carbon", "rules", 2, "asker"),
    ]
    g = build_graph(triples)
    assert g.number_of_nodes() == 4 and g.number_of_edges() == 2
    e = g.edges["water", "polar"]
    assert (e["relation"], e["source"], e["turns"], e["weight"]) == ("is; has", "rules; model", "1; 2", 2)
    assert g.nodes["water"]["count"] == 2
    cfg = AgentsConfig("chemistry", turns=2)
    summary = write_run(tmp_path, cfg, [{"turn": 1, "speaker": "asker", "kind": "question", "text": "Q?"}], triples)
    back = nx.read_graphml(tmp_path / "graph.graphml")
    assert set(back.edges) == set(g.edges) and back.edges["water", "polar"]["relation"] == "is; has"
    assert (tmp_path / "graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["triples_from_model"] == 1 and summary["triples_from_rules"] == 2
    assert [json.loads(x)["subject"] for x in (tmp_path / "triples.jsonl").read_text().splitlines()] == [
        "water",
        "water",
        "benzene",
    ]
    assert "Q?" in (tmp_path / "transcript.md").read_text()
    assert not list(tmp_path.glob("*.tmp*"))  # written to temporary names, then renamed


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def test_roles_run_with_their_expert_masks(checkpoint):
    base_dir, path = checkpoint
    model = XLoraModel.from_pretrained(load_base(base_dir), path)
    ids = torch.tensor([[7, 8, 9, 10]])
    with torch.no_grad():
        with _masked(model, ["chem"]):
            model(input_ids=ids)
        scalings = model.get_latest_scalings()  # [B, T, L, N], experts in order chem, prot, cot
        assert bool((scalings[..., 1:] == 0).all()) and bool((scalings[..., 0] != 0).any())
        with _masked(model, []):
            plain = model(input_ids=ids).logits
        with model.disable_experts():
            assert torch.equal(plain, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match=r"unknown expert\(s\) \['nope'\]"):
        _masked(model, ["nope"])


def test_dialogue_transcript_order_and_bounds(checkpoint):
    base_dir, path = checkpoint
    from transformers import AutoTokenizer

    model = XLoraModel.from_pretrained(load_base(base_dir), path)
    tok = AutoTokenizer.from_pretrained(base_dir)
    transcript, triples = run_dialogue(model, tok, AgentsConfig("w7 w8", turns=2, max_new_tokens=3))
    assert [(u["turn"], u["speaker"], u["kind"]) for u in transcript] == [
        (t, s, k)
        for t in (1, 2)
        for s, k in (("asker", "question"), ("answerer", "answer"), ("answerer", "triples"), ("asker", "critique"))
    ]
    assert all(len(tok(u["text"], add_special_tokens=False)["input_ids"]) <= 3 for u in transcript)
    assert all(t.turn in (1, 2) for t in triples)
    with pytest.raises(ValueError, match="turns and max_new_tokens must be positive"):
        run_dialogue(model, tok, AgentsConfig("x", turns=0))


def test_agents_cli_writes_the_graph_and_rejects_bad_options(checkpoint, tmp_path):
    base_dir, path = checkpoint
    args = ["agents", "--topic", "w7", "--checkpoint", str(path), "--base", str(base_dir), "--out", str(tmp_path)]
    r = runner.invoke(app, args + ["--turns", "1", "--max-new-tokens", "2", "--asker-experts", "chem"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "graph.graphml").is_file() and (tmp_path / "graph.png").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["asker_experts"] == ["chem"]
    r = runner.invoke(app, args + ["--turns", "1", "--max-new-tokens", "2"])
    assert r.exit_code == 2 and "transcript.md: already exists (pass overwrite=True / --overwrite" in r.output
    for bad, message in (
        (["--turns", "0"], "--turns: expected 1 to 50 rounds, got 0"),
        (["--answerer-experts", " , "], "--answerer-experts: expected 'all', 'none' or comma-separated"),
        (["--answerer-experts", "nope"], "unknown expert(s) ['nope']"),
    ):
        r = runner.invoke(app, args + bad + ["--overwrite"])
        assert r.exit_code != 0 and message in r.output, r.output
