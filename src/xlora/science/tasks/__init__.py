"""The science tasks, one module per domain: prompts, reference answers and scoring."""

from xlora.science.tasks.item import (
    AMINO,
    TASKS,
    Item,
)
from xlora.science.tasks.molecules import (
    canonical,
    design_item,
    formula_item,
    formula_of,
    property_item,
    thermo_item,
)
from xlora.science.tasks.peptides import (
    anticancer_item,
    net_charge,
    peptide_items,
)
from xlora.science.tasks.scoring import (
    MAE_METRICS,
    META_KEYS,
    check_items,
    mean_baseline,
    outcomes,
    score,
    yes_no,
)

__all__ = [
    "AMINO",
    "Item",
    "MAE_METRICS",
    "META_KEYS",
    "TASKS",
    "anticancer_item",
    "canonical",
    "check_items",
    "design_item",
    "formula_item",
    "formula_of",
    "mean_baseline",
    "net_charge",
    "outcomes",
    "peptide_items",
    "property_item",
    "score",
    "thermo_item",
    "yes_no",
]
