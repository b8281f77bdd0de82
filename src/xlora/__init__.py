"""X-LoRA: a mixture of LoRA experts with a learned per-token, per-layer router."""

from xlora.bases.loading import load_base, load_default_base
from xlora.core.classifier import XLoraClassifier
from xlora.core.config import XLoraConfig, XLoraConfigError
from xlora.core.experts import ExpertError
from xlora.core.generation import GenerationStep, SamplingOptions, generate, iter_generate
from xlora.core.layers import XLoraLinear
from xlora.core.model import XLoraModel
from xlora.core.scalings_log import load_scalings_log
from xlora.formats import checkpoint as _checkpoint  # noqa: F401 - gives XLoraModel its from/save_pretrained
from xlora.formats.native import CheckpointError
from xlora.formats.original import add_xlora_to_model, from_pretrained, xLoRAConfig
from xlora.science import shipped_checkpoint

__all__ = [
    "CheckpointError",
    "ExpertError",
    "GenerationStep",
    "SamplingOptions",
    "XLoraClassifier",
    "XLoraConfig",
    "XLoraConfigError",
    "XLoraLinear",
    "XLoraModel",
    "add_xlora_to_model",
    "from_pretrained",
    "generate",
    "iter_generate",
    "load_base",
    "load_default_base",
    "load_scalings_log",
    "shipped_checkpoint",
    "xLoRAConfig",
]
__version__ = "0.15.0"
