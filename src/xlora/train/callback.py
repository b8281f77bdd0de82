"""Using an XLoraModel with `transformers.Trainer`.

`Trainer` only calls `save_pretrained` on `PreTrainedModel`/`PeftModel`; for other modules it dumps
the whole state dict. This callback writes our native checkpoint instead, at every Trainer save
(into `checkpoint-N/xlora`) and at the end of training (into `save_dir`).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from xlora.core.model import XLoraModel


class XLoraSaveCallback(TrainerCallback):
    def __init__(self, model: XLoraModel, save_dir: str | Path) -> None:
        self.model, self.save_dir = model, Path(save_dir)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.model.save_pretrained(Path(args.output_dir) / f"checkpoint-{state.global_step}" / "xlora")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.model.save_pretrained(self.save_dir)
