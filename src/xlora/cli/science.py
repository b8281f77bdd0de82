"""`xlora reproduce`, `xlora demo`, `xlora eval`, `xlora plot-scalings`, `xlora agents`: the science pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xlora.cli.app import (
    SCALING_PASS_LAYERS,
    DtypeOption,
    QuantizeOption,
    _fail,
    app,
    check_files_out,
    checkpoint_path,
    comma_list,
    out,
)
from xlora.science import SHIPPED, shipped_checkpoint


@app.command()
def reproduce(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the final checkpoint goes.")] = Path("models") / SHIPPED,
    work: Annotated[Path, typer.Option(help="Data, runs and intermediate experts.")] = Path("xlora-reproduce"),
    base: str = "default",
    seed: int = 0,
    n_train: Annotated[int, typer.Option(help="Per task: expert examples the gate also trains on.")] = 320,
    n_eval: int = 24,
    expert_steps: Annotated[
        int,
        typer.Option(
            help="Steps of 16 per expert pass; the property expert trains 4x, the peptide expert 5x, all in bf16 "
            "(the committed experts are reused only at the default)."
        ),
    ] = 160,
    gate_steps: int = 800,
    gate_precision: Annotated[
        str, typer.Option(help="The gate's training precision: auto (fp32 on CPU), fp32, bf16 or fp16.")
    ] = "bf16",
    gate_route_weight: Annotated[
        float, typer.Option(help="Routing prior: pull each gate example towards its task's expert alone (0: off).")
    ] = 0.1,
    gate_route_only: Annotated[
        str | None,
        typer.Option(help="Comma-separated tasks (and/or 'base') whose gate examples the routing prior reads."),
    ] = None,
    gate_lr: float = 5e-3,
    gate_size: int = 256,
    gate_depth: int = 2,
    gate_softmax: Annotated[bool, typer.Option(help="Softmax over experts (else unconstrained).")] = False,
    gate_layerwise: Annotated[bool, typer.Option(help="One scaling per adapted module (else one per expert).")] = True,
    gate_fresh: Annotated[int, typer.Option(help="Extra gate examples per task the experts never saw.")] = 320,
    gate_general: Annotated[
        int, typer.Option(help="Everyday prompts answered by the base, added to the gate data (retention).")
    ] = 320,
    scaling_pass_layers: Annotated[int | None, SCALING_PASS_LAYERS] = None,
) -> None:
    """Train one expert per task, the gate, evaluate everything, write results.md and figures."""
    from xlora.science.eval.evaluate import results_table
    from xlora.science.recipe.pipeline import ReproduceConfig
    from xlora.science.recipe.pipeline import reproduce as run

    try:
        cfg = ReproduceConfig(
            out=out_dir,
            work=work,
            base=base,
            seed=seed,
            n_train=n_train,
            n_eval=n_eval,
            expert_steps=expert_steps,
            gate_steps=gate_steps,
            gate_precision=gate_precision,
            gate_route_weight=gate_route_weight,
            gate_route_only=comma_list(gate_route_only),
            gate_lr=gate_lr,
            gate_size=gate_size,
            gate_depth=gate_depth,
            gate_softmax=gate_softmax,
            gate_layerwise=gate_layerwise,
            gate_fresh=gate_fresh,
            gate_general=gate_general,
            gate_scaling_pass_layers=scaling_pass_layers,
        )
        results = run(cfg)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
        return
    out.print(results_table(results), soft_wrap=True, highlight=False)
    out.print(f"checkpoint, results.md, manifest.json and figures/: {out_dir}", soft_wrap=True, highlight=False)


DEMO_PROMPTS = {
    # phenol: 7 heavy atoms, inside QM9's range (at most 9), Kekulé SMILES as in QM9
    "molecule-properties": "Molecule OC1=CC=CC=C1. Give its HOMO-LUMO gap in eV and its dipole in debye.",
    "molecule-design": "Design a molecule with formula C4H5NO. Answer with a SMILES.",
    "peptides": "Peptide GLFDIVKKVVGALGSL. Is it antimicrobial, and what is its net charge at pH 7?",
    "molecule-thermo": "Molecule OC1=CC=CC=C1. Give its heat capacity Cv in cal/mol K and its zero-point energy in eV.",
    "anticancer": "Peptide GIGKFLKKAKKFGKAFVKILKK. Is it anticancer?",  # a test-set peptide, no near-copy in training
}


DEMO_FIGURES = ("routing_heatmap.png", "routing_tokens.png")


@app.command()
def demo(
    checkpoint: Annotated[Path | None, typer.Option(help="Default: the shipped science checkpoint.")] = None,
    figures: Annotated[Path, typer.Option(help="Where to write the routing figures.")] = Path("xlora-demo"),
    dtype: DtypeOption = "float32",
    quantize: QuantizeOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace figures already in --figures.")] = False,
) -> None:
    """Answer one prompt per task with the shipped X-LoRA model, show which expert led, plot routing."""
    from xlora.bases.loading import load_base
    from xlora.core.model import XLoraModel
    from xlora.formats.native import checkpoint_file
    from xlora.science.figures import heatmaps, routing_for, token_weights
    from xlora.science.recipe.config import MAX_NEW_TOKENS

    try:
        ck = checkpoint or shipped_checkpoint()
        check_files_out(figures, list(DEMO_FIGURES), overwrite, reads=[ck])
        base, tok = load_base("default", dtype=dtype, quantization=quantize)
        model = XLoraModel.from_pretrained(base, ck)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
        return
    out.print(
        f"X-LoRA over SmolLM2-135M-Instruct with experts: {', '.join(model.expert_names)}",
        highlight=False,
        soft_wrap=True,
    )
    if not model.config.enable_softmax:
        out.print(
            "expert weights below are the gate's mean scalings over the answer (unconstrained: > 1 boosts "
            "an expert, < 0 subtracts it; they need not sum to 1)",
            highlight=False,
            soft_wrap=True,
        )
    heat, lines = [], []
    for task, prompt in DEMO_PROMPTS.items():
        mean, tokens, weights, answer = routing_for(model, tok, prompt, MAX_NEW_TOKENS[task])
        if task == "molecule-design":
            from xlora.science.tasks import formula_of

            formula = formula_of(answer.strip())
            answer += f"  (RDKit: {'valid, ' + formula if formula else 'not a valid SMILES'})"
        per_expert = weights.mean(0) if len(weights) else mean.mean(0)
        lead = model.expert_names[int(per_expert.argmax())]
        shares = ", ".join(f"{n} {w:.2f}" for n, w in zip(model.expert_names, per_expert.tolist()))
        out.print(
            f"\n[{task}] {prompt}\n  answer: {answer}\n  dominant expert: {lead} ({shares})",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
        heat.append((task, mean))
        lines.append((task, tokens, weights))
    results = checkpoint_file(ck, "results.md")
    if results.is_file() and checkpoint is None:  # the shipped checkpoint: say what its small table misses
        out.print(
            "\nThe run's own figures on 24 held-out items per task follow. They are small samples: on the "
            "100-item test sets X-LoRA's AMP accuracy is 0.81 and its gap MAE 0.45 eV (the experts alone: 0.86, "
            "0.41); the README's 'Results of the shipped run' has those figures with 95% intervals "
            "(`xlora eval --baselines`).",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
    if results.is_file():
        out.print("\n" + results.read_text(), soft_wrap=True, highlight=False)
    paths = [
        heatmaps(heat, model.expert_names, figures / DEMO_FIGURES[0]),
        token_weights(lines, model.expert_names, figures / DEMO_FIGURES[1]),
    ]
    out.print("figures: " + ", ".join(str(p) for p in paths), soft_wrap=True, highlight=False)


@app.command("eval")
def eval_cmd(
    checkpoint: Annotated[Path, typer.Option(help="An X-LoRA checkpoint ('shipped': the science demo's).")],
    task: Annotated[str, typer.Option(help="One of the science tasks: molecule-properties, peptides, anticancer...")],
    data: Annotated[Path, typer.Option(help="JSONL of {task, prompt, completion, meta} records.")],
    baselines: Annotated[
        bool, typer.Option(help="Also the base model, each single expert and the uniform mix; X-LoRA minus the best.")
    ] = False,
    models: Annotated[
        str | None,
        typer.Option(help="Only these baselines with X-LoRA, comma-separated: base, uniform, expert names."),
    ] = None,
    base: str = "default",
    limit: Annotated[int | None, typer.Option(help="Only the first N records of the task (a quick look).")] = None,
    train_data: Annotated[
        Path | None, typer.Option(help="The run's molecule-design-train.jsonl, for the novelty rate.")
    ] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 2000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    dtype: DtypeOption = "float32",
    quantize: QuantizeOption = None,
    decoding: Annotated[
        str,
        typer.Option(
            help="greedy, or checked: greedy + --samples sampled answers, combined per task (design prompts: the "
            "first answer meeting the prompt's constraints, else the first valid molecule or peptide of the asked "
            "length; numbers: the median; yes/no: the majority); or "
            "constrained: greedy with design answers held to the prompt's form (SMILES with the formula's heavy "
            "atoms; the peptide's length); or constrained-checked: checked with every answer constrained."
        ),
    ] = "greedy",
    samples: Annotated[int, typer.Option(help="Sampled answers per item for the checked decodings.")] = 8,
    batch_size: Annotated[
        int,
        typer.Option(help="Items per forward pass (larger is faster on CPU too; answers may change in the last bit)."),
    ] = 8,
) -> None:
    """Score a checkpoint on a task file: every metric with its 95% bootstrap interval and n."""
    import json

    from xlora.bases.loading import load_base
    from xlora.cli.guard import err
    from xlora.core.model import XLoraModel
    from xlora.science.eval.evaluate import read_items
    from xlora.science.eval.scorecard import (
        EvalOptions,
        evaluate_checkpoint,
        parse_models,
        scorecard_table,
        select_variants,
    )
    from xlora.science.recipe.config import MAX_NEW_TOKENS
    from xlora.science.tasks import TASKS

    if task not in TASKS:
        _fail(f"--task: expected one of {', '.join(TASKS)}, got {task!r}")
    if limit is not None and limit < 1:
        _fail(f"--limit: expected a positive number of records, got {limit}")
    if resamples < 1:
        _fail(f"--resamples: expected a positive integer, got {resamples}")
    from xlora.science.eval.decoding import DECODINGS, DecodeOptions

    if decoding not in DECODINGS:
        _fail(f"--decoding: expected one of {', '.join(DECODINGS)}, got {decoding!r}")
    if samples < 1:
        _fail(f"--samples: expected a positive integer, got {samples}")
    if batch_size < 1:
        _fail(f"--batch-size: expected a positive integer, got {batch_size}")
    items = [i for i in read_items(data) if i.task == task][:limit]
    if not items:
        _fail(f"{data}: no records for task {task}")
    train_smiles = None
    if train_data is not None:
        rows = [json.loads(x) for x in train_data.read_text().splitlines() if x.strip()]
        last = [r["messages"][-1] for r in rows if isinstance(r, dict) and isinstance(r.get("messages"), list)]
        train_smiles = {m["content"] for m in last if isinstance(m, dict) and isinstance(m.get("content"), str)}
        if not train_smiles:
            _fail(f"{train_data}: no chat records ({{'messages': [...]}}) to take training SMILES from")
    model_base, tok = load_base(base, dtype=dtype, quantization=quantize)
    model = XLoraModel.from_pretrained(model_base, checkpoint_path(checkpoint)).eval()
    only = None
    if models is not None:
        if baselines:
            _fail("--models and --baselines: --baselines scores every baseline, --models only the named ones; pick one")
        try:
            only = parse_models(models)
            select_variants(model, True, only)
        except ValueError as e:
            _fail(f"--{e}")
    opts = EvalOptions(
        MAX_NEW_TOKENS[task],
        resamples=resamples,
        seed=seed,
        train_smiles=train_smiles,
        batch_size=batch_size,
        decoding=DecodeOptions(decoding, samples, seed=seed),
    )

    def progress(name: str) -> None:
        err.print(f"scoring {name} on {len(items)} items", highlight=False, soft_wrap=True, markup=False)

    card = evaluate_checkpoint(model, tok, task, items, opts, baselines=baselines, progress=progress, only=only)
    out.print(scorecard_table(card), soft_wrap=True, highlight=False, markup=False)


@app.command("make-test-sets")
def make_test_sets(
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint with the manifest.json of its reproduce run.")] = Path(
        "shipped"
    ),
    out_dir: Annotated[Path, typer.Option("--out", help="Where the {task}-test.jsonl files go.")] = Path("xlora-test"),
    n_loss: Annotated[int, typer.Option(help="Items per task scored by loss.")] = 200,
    n_generate: Annotated[int, typer.Option(help="Items per generated metric.")] = 100,
    overwrite: Annotated[bool, typer.Option(help="Replace test sets already in --out.")] = False,
) -> None:
    """Write test sets disjoint from everything the checkpoint's experts and gate saw (its manifest)."""
    from xlora.science.eval.testsets import HoldoutSizes, manifest_ids, write_test_sets
    from xlora.science.tasks import TASKS

    sizes = HoldoutSizes(n_loss, n_generate)
    sizes.check()  # bad sizes first: they are the error to fix whatever --out holds
    source = checkpoint_path(checkpoint)
    check_files_out(out_dir, [f"{task}-test.jsonl" for task in TASKS] + ["test-ids.json"], overwrite, [source])
    ids, seed = manifest_ids(source)
    record = write_test_sets(out_dir, ids, seed, sizes)
    out.print(
        f"{len(record['qm9_index_test'])} molecules, {len(record['amp_sequences_test'])} antimicrobial-task and "
        f"{len(record['acp_sequences_test'])} anticancer peptides, unseen by the run: "
        f"{out_dir}/{{{','.join(TASKS)}}}-test.jsonl (ids in test-ids.json)",
        soft_wrap=True,
        highlight=False,
        markup=False,
    )


@app.command("make-protein-data")
def make_protein_data(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the protein-*.jsonl files go.")] = Path(
        "xlora-proteins"
    ),
    seed: int = 0,
    n_structure_train: Annotated[int, typer.Option(help="SCOPe domains to train on (each: 2 items).")] = 4000,
    n_structure_test: Annotated[int, typer.Option(help="Held-out SCOPe domains (each: 2 items).")] = 200,
    overwrite: Annotated[bool, typer.Option(help="Replace files already in --out.")] = False,
) -> None:
    """Write homology-split train/test files of the protein mechanics and structure tasks."""
    from xlora.science.proteins.stage import FILES, write_protein_data

    if n_structure_train < 1 or n_structure_test < 1:
        _fail("--n-structure-train, --n-structure-test: expected integers >= 1")
    if any((out_dir / name).exists() for name in ("xlora_config.json", "adapter_config.json")):
        _fail(f"--out {out_dir}: is an X-LoRA checkpoint or an adapter folder; write the data elsewhere")
    check_files_out(out_dir, list(FILES), overwrite, reads=[])
    record = write_protein_data(out_dir, seed, n_structure_train, n_structure_test)
    counts = ", ".join(f"{name} {n}" for name, n in record["counts"].items())
    out.print(f"wrote {out_dir}: {counts}", soft_wrap=True, highlight=False, markup=False)


@app.command("plot-scalings")
def plot_scalings(
    log: Annotated[Path, typer.Argument(help="The path given to flush_log_scalings.")],
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("scalings-figures"),
    overwrite: Annotated[bool, typer.Option(help="Replace figures already in --output.")] = False,
) -> None:
    """Turn a `flush_log_scalings` output into a heatmap and a per-token plot."""
    from xlora.science.figures import LOG_FIGURES, plot_log

    try:
        check_files_out(output, list(LOG_FIGURES), overwrite, reads=[log])
        paths = plot_log(log, output)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
        return
    out.print("figures: " + ", ".join(str(p) for p in paths), soft_wrap=True, highlight=False)


def _expert_list(value: str, option: str) -> list[str] | None:
    """`all` -> None (every expert), `none` -> [] (the plain base), else comma-separated names."""
    if value.strip().lower() == "all":
        return None
    if value.strip().lower() == "none":
        return []
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        _fail(f"{option}: expected 'all', 'none' or comma-separated expert names, got {value!r}")
    return names


@app.command()
def agents(
    topic: Annotated[str, typer.Option(help="What the two instances talk about.")],
    turns: Annotated[int, typer.Option(help="Rounds of question, answer, triples, critique.")] = 3,
    checkpoint: Annotated[Path, typer.Option(help="An X-LoRA checkpoint ('shipped': the science one).")] = Path(
        "shipped"
    ),
    out_dir: Annotated[Path, typer.Option("--out", help="Where transcript, triples and graph go.")] = Path(
        "xlora-agents"
    ),
    asker_experts: Annotated[str, typer.Option(help="The questioner's experts: all, none (base) or names.")] = "none",
    answerer_experts: Annotated[str, typer.Option(help="The answerer's experts: all, none or names.")] = "all",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per utterance.")] = 64,
    base: str = "default",
    dtype: DtypeOption = "float32",
    quantize: QuantizeOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the files of an earlier run in --out.")] = False,
) -> None:
    """Two instances of one X-LoRA model in a bounded question/critique dialogue; the triples they
    state become a knowledge graph (GraphML + PNG). A small-scale version of the paper's case study."""
    from xlora.bases.loading import load_base
    from xlora.core.model import XLoraModel
    from xlora.science.agents import RUN_FILES, AgentsConfig, check_out_dir, run_dialogue, write_run

    if turns < 1 or turns > 50:
        _fail(f"--turns: expected 1 to 50 rounds, got {turns}")
    if max_new_tokens < 1:
        _fail(f"--max-new-tokens: expected a positive number, got {max_new_tokens}")
    if not topic.strip():
        _fail("--topic: expected a non-empty topic")
    cfg = AgentsConfig(
        topic.strip(),
        turns,
        max_new_tokens,
        _expert_list(asker_experts, "--asker-experts"),
        _expert_list(answerer_experts, "--answerer-experts"),
    )
    try:
        check_out_dir(out_dir)  # before the dialogue: a bad --out must not cost the whole run
        reads = [checkpoint_path(checkpoint)] + ([] if base == "default" else [base])
        check_files_out(out_dir, list(RUN_FILES), overwrite, reads)
        model_base, tok = load_base(base, dtype=dtype, quantization=quantize)
        model = XLoraModel.from_pretrained(model_base, checkpoint_path(checkpoint)).eval()
        transcript, triples = run_dialogue(model, tok, cfg)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
        return
    summary = write_run(out_dir, cfg, transcript, triples)
    for u in transcript:
        out.print(f"[turn {u['turn']} {u['speaker']} {u['kind']}] {u['text']}", soft_wrap=True, markup=False)
    out.print(
        f"\n{summary['triples_from_model']} triples in the model's own format, {summary['triples_from_rules']} by "
        f"rules; graph of {summary['nodes']} concepts and {summary['edges']} relations: {out_dir}/graph.graphml, "
        f"{out_dir}/graph.png",
        soft_wrap=True,
        highlight=False,
        markup=False,
    )
