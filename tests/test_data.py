"""Data files: the three record shapes, loss masks, CSV, and errors that name file and line."""

from __future__ import annotations

import json

import pytest
from helpers import add_tiny_tokenizer, make_base
from transformers import AutoTokenizer

from xlora.data import IGNORE, DataError, collate, load_dataset


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = make_base(tmp_path_factory.mktemp("tokbase"))
    add_tiny_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_completion_masks_prompt(tok, tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w1 w2 w3", "completion": "w4 w5"}]), tok)
    ex = ds[0]
    assert tok.convert_ids_to_tokens(ex.input_ids) == ["w1", "w2", "w3", "w4", "w5", "<eos>"]
    assert ex.labels[:3] == [IGNORE] * 3 and ex.labels[3:] == ex.input_ids[3:]


def test_text_and_messages(tok, tmp_path):
    rows = [
        {"text": "w9 w8"},
        {
            "messages": [
                {"role": "user", "content": "w1 w2"},
                {"role": "assistant", "content": "w3 w4"},
                {"role": "user", "content": "w5"},
                {"role": "assistant", "content": "w6"},
            ]
        },
    ]
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    assert ds[0].labels == ds[0].input_ids
    chat = ds[1]
    learned = [t for t, lab in zip(tok.convert_ids_to_tokens(chat.input_ids), chat.labels) if lab != IGNORE]
    assert learned == ["w3", "w4", "w6"]  # only the assistant turns


def test_csv(tok, tmp_path):
    p = tmp_path / "d.csv"
    p.write_text(
        'prompt,completion,messages\nw1,w2,\n,,"[{""role"": ""user"", ""content"": ""w1""}, '
        '{""role"": ""assistant"", ""content"": ""w7""}]"\n'
    )
    ds = load_dataset(p, tok)
    assert len(ds) == 2 and tok.convert_ids_to_tokens(ds[0].input_ids) == ["w1", "w2", "<eos>"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "w1", "completion": "w2"}\n{"prompt": "w1"\n', r"d.jsonl:2: invalid JSON"),
        ('{"prompt": "w1", "completion": "w2"}\n\n{"question": "w1"}\n', r"d.jsonl:3: expected keys"),
        ("[1, 2]\n", r"d.jsonl:1: expected a JSON object"),
        ('{"messages": [{"role": "user", "content": "w1"}]}\n', r"d.jsonl:1: no assistant message"),
        ('{"prompt": 3, "completion": "w2"}\n', r"d.jsonl:1: 'prompt' and 'completion' must be strings"),
        ("", r"d.jsonl: no records"),
    ],
)
def test_malformed(tok, tmp_path, content, message):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(p, tok)


def test_collate_right_pads(tok, tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2 w3"}, {"text": "w1"}]), tok)
    b = collate([ds[0], ds[1]], pad_id=0)
    assert b["input_ids"].shape == (2, 4)
    assert b["attention_mask"][1].tolist() == [1, 1, 0, 0] and b["labels"][1].tolist()[2:] == [IGNORE, IGNORE]
