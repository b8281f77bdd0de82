"""The paper's agentic case study at our scale: two instances of one X-LoRA model (different expert
masks and roles) in a bounded question / answer / critique dialogue on a topic; the (subject,
relation, object) triples their statements contain become a knowledge graph (GraphML + PNG).

Triples come from two sources, each edge says which: `model` (after each answer the answering
instance is asked for "subject | relation | object" lines, parsed strictly) and `rules` (a
deterministic pattern over the statements: noun phrase, relation verb from RELATIONS, noun phrase).
The summary counts both, so a write-up can say what the model itself managed (on SmolLM2-135M with
the shipped experts: nothing, see the README's "Agents").
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

# longest first, so "is used for" wins over "is"
RELATIONS = sorted(
    [
        "is a", "is an", "is", "are", "has", "have", "contains", "contain", "consists of", "forms", "form",
        "binds to", "binds", "bind to", "increases", "increase", "decreases", "decrease", "causes", "cause",
        "depends on", "is used for", "are used for", "is used in", "are used in", "kills", "kill", "targets",
        "target", "disrupts", "disrupt", "produces", "produce", "reduces", "reduce", "affects", "affect",
        "interacts with", "interact with", "determines", "determine", "includes", "include", "helps", "help",
    ],
    key=len,
    reverse=True,
)  # fmt: skip
_RELATION = re.compile(r"\b(" + "|".join(re.escape(r) for r in RELATIONS) + r")\b", re.IGNORECASE)
_DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "its", "their", "some", "many", "most"}
_PRONOUNS = {"it", "they", "he", "she", "we", "you", "i", "which", "who", "there", "what", "this", "that"}
_MAX_PHRASE_WORDS = 5


@dataclass(frozen=True)
class Triple:
    subject: str
    relation: str
    object: str
    source: str  # "model" or "rules"
    turn: int
    speaker: str


@dataclass
class AgentsConfig:
    """Roles and bounds of the dialogue; expert lists are names to keep (None: all, []: base model)."""

    topic: str
    turns: int = 3
    max_new_tokens: int = 64
    asker_experts: list[str] | None = field(default_factory=list)  # the questioner: the plain base
    answerer_experts: list[str] | None = None  # the answerer: X-LoRA over every expert


def _phrase(words: list[str]) -> str:
    """A cleaned noun phrase: lower case, no punctuation, leading determiners dropped, at most a few words."""
    cleaned = [re.sub(r"[^\w+\-]", "", w.lower()) for w in words]
    cleaned = [w for w in cleaned if w]
    while cleaned and cleaned[0] in _DETERMINERS:
        cleaned = cleaned[1:]
    return " ".join(cleaned[:_MAX_PHRASE_WORDS])


def _relation(text: str) -> str:
    """A model-written relation cleaned like the phrases (lower case, word characters, + and -): no
    control characters (GraphML cannot hold them), no `$` (matplotlib would read it as math)."""
    return " ".join(w for w in (re.sub(r"[^\w+\-]", "", w.lower()) for w in text.split()) if w)


def _plain(text: str) -> str:
    """Text for a matplotlib label as written: `$` would start mathtext (and fail on e.g. `$\\foo$`)."""
    return text.replace("$", r"\$")


def rule_triples(text: str) -> list[tuple[str, str, str]]:
    """(subject, relation, object) from each sentence with a relation verb: the words before the verb
    (back to a comma) and after it (up to a comma, 'and', 'which', 'that' or a sentence end)."""
    out = []
    for sentence in re.split(r"(?<=[.!?;])\s+|\n+", text):
        m = _RELATION.search(sentence)
        if m is None:
            continue
        before = re.split(r"[,:(]", sentence[: m.start()])[-1].split()[-_MAX_PHRASE_WORDS:]
        after = re.split(r"[,.;:!?()]|\b(?:and|which|that|but|because|while)\b", sentence[m.end() :])[0].split()
        subject, obj = _phrase(before), _phrase(after)
        if not subject or not obj or subject in _PRONOUNS or obj in _PRONOUNS or subject == obj:
            continue
        out.append((subject, m.group(1).lower(), obj))
    return out


def parse_triples(text: str) -> list[tuple[str, str, str]]:
    """Lines "subject | relation | object" (optionally numbered or bulleted); anything else is skipped."""
    out = []
    for line in text.splitlines():
        parts = [p.strip() for p in re.sub(r"^\s*(?:[-*]|\d+[.)])\s*", "", line).split("|")]
        if len(parts) != 3:
            continue
        subject, relation, obj = _phrase(parts[0].split()), _relation(parts[1]), _phrase(parts[2].split())
        if subject and relation and obj:
            out.append((subject, relation, obj))
    return out


def build_graph(triples: Sequence[Triple]):
    """A networkx DiGraph: nodes are phrases (with how often they occur), one edge per (subject, object)
    with its relations, sources and turns joined as text (GraphML stores scalars only)."""
    import networkx as nx

    g = nx.DiGraph()
    for t in triples:
        for node in (t.subject, t.object):
            g.add_node(node, count=g.nodes[node]["count"] + 1 if node in g else 1)
        if g.has_edge(t.subject, t.object):
            e = g.edges[t.subject, t.object]
            for key, value in (("relation", t.relation), ("source", t.source), ("turns", str(t.turn))):
                if value not in e[key].split("; "):
                    e[key] += f"; {value}"
            e["weight"] += 1
        else:
            g.add_edge(t.subject, t.object, relation=t.relation, source=t.source, turns=str(t.turn), weight=1)
    return g


def write_graph(g, out: Path, title: str) -> None:
    """`graph.graphml` and `graph.png` in `out`, each written to a temporary name then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "graph.graphml.tmp"
    nx.write_graphml(g, tmp)
    tmp.replace(out / "graph.graphml")
    fig, ax = plt.subplots(figsize=(11, 8))
    if g.number_of_nodes():
        pos = nx.spring_layout(g, seed=0, k=1.2)
        nx.draw_networkx(g, pos, ax=ax, node_size=300, font_size=7, node_color="#9ecae1", arrowsize=10)
        labels = {edge: _plain(r) for edge, r in nx.get_edge_attributes(g, "relation").items()}
        nx.draw_networkx_edge_labels(g, pos, labels, font_size=6, ax=ax)
    else:
        ax.text(0.5, 0.5, "no triples extracted", ha="center", va="center")
    ax.set_title(_plain(title))
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "graph.png.tmp.png", dpi=120)
    plt.close(fig)
    (out / "graph.png.tmp.png").replace(out / "graph.png")


def _masked(model, keep: list[str] | None):
    """A context manager: every expert (None), the plain base ([]), or only the named ones."""
    if keep is None:
        return ExitStack()
    if not keep:
        return model.disable_experts()
    unknown = [n for n in keep if n not in model.expert_names]
    if unknown:
        raise ValueError(f"agents: unknown expert(s) {unknown}; experts are {model.expert_names}")
    return model.mask_experts([n for n in model.expert_names if n not in keep])


def _say(model, tok, prompt: str, keep: list[str] | None, max_new_tokens: int) -> str:
    from xlora.science.eval.evaluate import generate_answers
    from xlora.science.tasks import Item

    with _masked(model, keep):
        return generate_answers(model, tok, [Item("agents", prompt, "", {})], max_new_tokens, batch_size=1)[0]


def run_dialogue(model, tok, cfg: AgentsConfig) -> tuple[list[dict], list[Triple]]:
    """`cfg.turns` rounds of question (asker), answer (answerer), triples (answerer), critique (asker).
    Returns the transcript (one dict per utterance) and every triple, each tagged with its turn."""
    if cfg.turns < 1 or cfg.max_new_tokens < 1:
        raise ValueError(f"agents: turns and max_new_tokens must be positive, got {cfg.turns}, {cfg.max_new_tokens}")
    transcript: list[dict] = []
    triples: list[Triple] = []
    critique = ""
    for turn in range(1, cfg.turns + 1):
        ask = f"You are a scientist studying {cfg.topic}. Ask one short, specific question about it."
        if critique:
            ask += f" The last critique was: {critique} Ask a follow-up question."
        question = _say(model, tok, ask, cfg.asker_experts, cfg.max_new_tokens)
        answer = _say(model, tok, f"{question} Answer in two sentences.", cfg.answerer_experts, cfg.max_new_tokens)
        listing = _say(
            model,
            tok,
            f"Text: {answer}\nList the facts in the text, one per line, as: subject | relation | object",
            cfg.answerer_experts,
            cfg.max_new_tokens,
        )
        critique = _say(
            model, tok, f"Question: {question}\nAnswer: {answer}\nCritique the answer in one sentence.",
            cfg.asker_experts, cfg.max_new_tokens,
        )  # fmt: skip
        for speaker, kind, text in (
            ("asker", "question", question),
            ("answerer", "answer", answer),
            ("answerer", "triples", listing),
            ("asker", "critique", critique),
        ):
            transcript.append({"turn": turn, "speaker": speaker, "kind": kind, "text": text})
        triples += [Triple(*t, "model", turn, "answerer") for t in parse_triples(listing)]
        triples += [Triple(*t, "rules", turn, "answerer") for t in rule_triples(answer)]
        triples += [Triple(*t, "rules", turn, "asker") for t in rule_triples(critique)]
    return transcript, triples


RUN_FILES = ("transcript.md", "triples.jsonl", "graph.graphml", "graph.png", "summary.json")  # what write_run writes


def write_run(out: Path, cfg: AgentsConfig, transcript: list[dict], triples: list[Triple]) -> dict:
    """transcript.md, triples.jsonl, graph.graphml, graph.png and summary.json in `out`; the summary.

    The dialogue's own files come first and summary.json last (a previous run's is removed first), so
    a failure part-way never leaves a summary beside files of another run."""
    from dataclasses import asdict

    check_out_dir(out)
    (out / "summary.json").unlink(missing_ok=True)
    g = build_graph(triples)
    lines = [f"# {cfg.topic}: {cfg.turns} turns\n"]
    lines += [f"**turn {u['turn']}, {u['speaker']} ({u['kind']})**: {u['text']}\n" for u in transcript]
    summary = {
        "topic": cfg.topic,
        "turns": cfg.turns,
        "triples_from_model": sum(t.source == "model" for t in triples),
        "triples_from_rules": sum(t.source == "rules" for t in triples),
        "nodes": g.number_of_nodes(),
        "edges": g.number_of_edges(),
        "asker_experts": cfg.asker_experts,
        "answerer_experts": cfg.answerer_experts,
    }
    files = {
        "transcript.md": "\n".join(lines),
        "triples.jsonl": "".join(json.dumps(asdict(t)) + "\n" for t in triples),
    }
    for name, text in files.items():
        _write_text(out / name, text)
    write_graph(g, out, f"{cfg.topic}: {g.number_of_nodes()} concepts, {g.number_of_edges()} relations")
    _write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def check_out_dir(out: Path) -> None:
    """`out` is (or can be made) a writable folder; checked before a dialogue, not after it."""
    import os

    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: expected a folder for the agents' output, found a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: the output folder is not writable")
