"""`xlora design`: ask the science checkpoint for a molecule of a given formula or an antimicrobial
peptide of a given length and charge, decoded as `xlora eval --decoding` does, and check the answer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xlora.cli.app import DtypeOption, _fail, app, checkpoint_path, out


@app.command()
def design(
    formula: Annotated[str | None, typer.Option(help="Design a molecule with this formula (C, H, N, O, F).")] = None,
    length: Annotated[int | None, typer.Option(help="Design an antimicrobial peptide of this length.")] = None,
    charge: Annotated[int, typer.Option(help="The peptide's net charge at pH 7 (with --length).")] = 0,
    checkpoint: Annotated[Path, typer.Option(help="An X-LoRA checkpoint ('shipped': the science demo's).")] = Path(
        "shipped"
    ),
    base: str = "default",
    decoding: Annotated[
        str,
        typer.Option(
            help="greedy, checked, constrained or constrained-checked (default): see `xlora eval --help`. "
            "The constrained ones hold the answer to the asked heavy atoms / length while it is written."
        ),
    ] = "constrained-checked",
    samples: Annotated[int | None, typer.Option(help="Sampled answers of the checked decodings (1-64; 8).")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed of the checked decodings (>= 0; 0).")] = None,
    dtype: DtypeOption = "float32",
) -> None:
    """Design a molecule (--formula C6H6O) or a peptide (--length 20 --charge 3) and check it."""
    from xlora.bases.loading import load_base
    from xlora.core.model import XLoraModel
    from xlora.science.eval.decoding import DECODINGS, DecodeOptions, decode_answers
    from xlora.science.eval.design import check_design, heavy_atoms, molecule_request, peptide_request
    from xlora.science.recipe.config import MAX_NEW_TOKENS

    if (formula is None) == (length is None):
        _fail("give either --formula (a molecule) or --length [--charge] (a peptide)")
    if formula is not None and charge != 0:
        _fail("--charge applies to a peptide: add --length")
    if decoding not in DECODINGS:
        _fail(f"--decoding: expected one of {', '.join(DECODINGS)}, got {decoding!r}")
    if not decoding.endswith("checked") and (samples is not None or seed is not None):
        _fail("--samples and --seed apply to the checked decodings only (checked, constrained-checked)")
    if samples is not None and not 1 <= samples <= 64:
        _fail(f"--samples: expected an integer from 1 to 64, got {samples}")
    if seed is not None and not 0 <= seed < 2**63:
        _fail(f"--seed: expected an integer from 0 to 2**63 - 1, got {seed}")
    item = molecule_request(formula) if formula is not None else peptide_request(length, charge)
    opts = DecodeOptions(decoding, samples=8 if samples is None else samples, seed=seed or 0)
    # a SMILES takes up to about three tokens per heavy atom (atom, bond, ring digit or branch)
    if formula is not None:
        budget = max(MAX_NEW_TOKENS[item.task], 3 * heavy_atoms(formula) + 8)
    else:
        budget = max(MAX_NEW_TOKENS["peptides"], length + 8)
    base_model, tok = load_base(base, dtype=dtype)
    model = XLoraModel.from_pretrained(base_model, checkpoint_path(checkpoint))
    [answer] = decode_answers(model, tok, item.task, [item], budget, opts)
    ok, checked = check_design(item, answer)
    verdict = "meets the request" if ok else "does not meet the request"
    text = f"{item.prompt}\n  answer: {answer}\n  {verdict}: {checked}"
    out.print(text, soft_wrap=True, highlight=False, markup=False)
