"""How hard is the anticancer test set? Two model-free baselines and the near-duplicate share.

modlamp's anticancer peptides come in families (KLAKLAK-like repeats, variants one residue apart),
so a random split by exact sequence leaves near-copies of training peptides in the test set. This
script measures, on the generated (not loss-only) test items:

- a net-charge rule: "anticancer" when the charge at pH 7 is at least a threshold chosen for the
  best accuracy on the training peptides;
- 1-nearest neighbour by edit distance over the anticancer training peptides (ties: the first);
- which test peptides are near-duplicates (edit distance <= 2, or one contains the other) of an
  anticancer training peptide or of any peptide in the antimicrobial file; it writes the others to
  `anticancer-test-novel.jsonl` next to the test file, to score models on with `xlora eval`.

    python experiments/acp_baselines.py --data xlora-reproduce/data

Backs the figures quoted in docs/science/analyses.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xlora.science.eval.evaluate import read_items
from xlora.science.eval.stats import bootstrap_mean
from xlora.science.tasks import net_charge
from xlora.science.tasks.datasets import load_amps


def edit_distance(a: str, b: str, cap: int = 99) -> int:
    """Levenshtein distance (rows stop early once every entry exceeds `cap`)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        if min(cur) > cap:
            return cap + 1
        prev = cur
    return prev[-1]


def near(a: str, b: str) -> bool:
    return a in b or b in a or (abs(len(a) - len(b)) <= 2 and edit_distance(a, b, cap=2) <= 2)


def sequence(prompt: str) -> str:
    return prompt.split()[1].rstrip(".")


def fmt(values: list[float]) -> str:
    iv = bootstrap_mean(values)
    return f"{iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}] (n={iv.n})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="A reproduce work folder's data/ directory.")
    a = p.parse_args()
    train = [json.loads(x)["messages"] for x in (a.data / "anticancer-train.jsonl").read_text().splitlines()]
    train = [(sequence(m[0]["content"]), m[1]["content"].endswith("yes")) for m in train]
    test = [it for it in read_items(a.data / "anticancer-test.jsonl") if not it.meta.get("loss_only")]
    seqs = [sequence(it.prompt) for it in test]
    truth = [it.meta["anticancer"] for it in test]

    charges = [(net_charge(s), y) for s, y in train]
    best = max((c for c, _ in charges), key=lambda t: sum((c >= t) == y for c, y in charges))
    rule = [float((net_charge(s) >= best) == y) for s, y in zip(seqs, truth)]
    nn = []
    for s, y in zip(seqs, truth):
        label = min(train, key=lambda t: edit_distance(s, t[0]))[1]
        nn.append(float(label == y))
    print(f"test items generated: {len(test)} ({sum(truth)} anticancer)")
    print(f"charge rule (anticancer when charge >= {best:+.2f}, chosen on training): {fmt(rule)}")
    print(f"1-nearest neighbour by edit distance: {fmt(nn)}")

    amp = {q.sequence for q in load_amps(unique=False)}
    close_train = [any(near(s, t) for t, _ in train) for s in seqs]
    close_amp = [any(near(s, t) for t in amp) for s in seqs]
    novel = [it for it, c1, c2 in zip(test, close_train, close_amp) if not (c1 or c2)]
    positives = sum(it.meta["anticancer"] for it in novel)
    print(f"near-duplicate of an anticancer training peptide: {sum(close_train)}; of an antimicrobial-file "
          f"peptide: {sum(close_amp)}; neither: {len(novel)} ({positives} anticancer)")  # fmt: skip
    keep = [i for i, (c1, c2) in enumerate(zip(close_train, close_amp)) if not (c1 or c2)]
    print(f"on those: charge rule {fmt([rule[i] for i in keep])}, 1-NN {fmt([nn[i] for i in keep])}")
    out = a.data / "anticancer-test-novel.jsonl"
    out.write_text("".join(json.dumps(it.record()) + "\n" for it in novel))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
