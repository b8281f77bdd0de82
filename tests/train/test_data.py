"""Data files: the three record shapes, loss masks, CSV, and errors that name file and line."""

from __future__ import annotations

import json

import pytest
from helpers import add_tiny_tokenizer, make_base
from transformers import AutoTokenizer

from xlora.train.data import IGNORE, DataError, DataWarning, collate, load_dataset


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
        (
            '{"messages": [{"role": "robot", "content": "w1"}, {"role": "assistant", "content": "w2"}]}\n',
            r"d.jsonl:1: message role 'robot': expected one of system, user, assistant",
        ),
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


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv"])
def test_non_utf8_names_file_and_line(tok, tmp_path, name):
    p = tmp_path / name
    head = "text\n" if name.endswith(".csv") else ""
    row = (
        (lambda s: s + "\n")
        if name.endswith(".csv")
        else (lambda s: json.dumps({"text": s}, ensure_ascii=False) + "\n")
    )
    p.write_bytes((head + row("w1 w2") + row("caf\xe9")).encode("latin-1"))
    line = 3 if name.endswith(".csv") else 2
    with pytest.raises(DataError, match=rf"{name}:{line}: not valid UTF-8 \(byte 0xe9"):
        load_dataset(p, tok)


def test_utf8_bom_is_fine(tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\ufeff" + json.dumps({"text": "w1 w2"}) + "\n", encoding="utf-8")
    assert len(load_dataset(p, tok)) == 1


def test_dropped_and_truncated_examples_are_reported(tok, tmp_path):
    long = " ".join(f"w{i % 90}" for i in range(40))
    rows = [
        {"prompt": long, "completion": "w1"},  # the completion lies beyond max_length: dropped
        {"prompt": "w1", "completion": "w2"},
        {"text": long},  # truncated, still has loss tokens
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.warns(
        DataWarning,
        match=r"d\.jsonl: of 3 examples, 1 dropped \(no loss token within max_length=16; line 1\), 1 truncated",
    ):
        ds = load_dataset(path, tok, max_length=16)
    assert len(ds) == 2 and (ds.n_dropped, ds.n_truncated) == (1, 1)
    with pytest.raises(
        DataError, match=r"d2\.jsonl: of 1 examples, 1 dropped .*max_length=16.*nothing left to train on"
    ):
        load_dataset(write_jsonl(tmp_path / "d2.jsonl", rows[:1]), tok, max_length=16)
    with pytest.raises(DataError, match=r"max_length: expected an integer >= 2, got 0"):
        load_dataset(path, tok, max_length=0)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("d.csv", "prompt,completion\nw1,w2,w3\n", r"d.csv:2: more fields than the header's 2"),
        ("d.json", '[\n {"text": "w1"}\n]\n', r"d.json:1: invalid JSON .*not a JSON array"),
        (
            "d.jsonl",
            '{"messages": [{"role": "assistant", "content": "w1"}, {"role": "user", "content": "w2"}]}\n',
            r"d.jsonl:1: the first message is the assistant's",
        ),
    ],
)
def test_more_malformed_files(tok, tmp_path, name, content, message):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(p, tok)
