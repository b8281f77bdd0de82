"""Science tasks (molecules, peptides), the `xlora reproduce` pipeline, and the shipped demo checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED = "xlora-science"
# The checkpoint `xlora reproduce` made, shipped inside the package (package data, 5.8 MB), so the
# demo runs from any folder after a plain `pip install`.
PACKAGED = Path(__file__).resolve().parent / "shipped" / SHIPPED


def shipped_checkpoint() -> Path:
    """The science demo's checkpoint folder (three PEFT LoRA experts and a trained gate).

    `$XLORA_MODELS/xlora-science` when that is set and exists, else the copy inside the package.
    """
    candidates = [Path(os.environ["XLORA_MODELS"]) / SHIPPED] if os.environ.get("XLORA_MODELS") else []
    candidates.append(PACKAGED)
    found = next((c for c in candidates if (c / "xlora_config.json").is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{PACKAGED}: the shipped science checkpoint is missing; reinstall xlora")
    return found
