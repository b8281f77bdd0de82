"""X-LoRA: a mixture of LoRA experts with a learned per-token, per-layer router."""

from .base_models import load_base, load_default_base
from .classifier import XLoraClassifier
from .compat import add_xlora_to_model, from_pretrained, xLoRAConfig
from .config import XLoraConfig, XLoraConfigError
from .experts import ExpertError
from .generation import GenerationStep, SamplingOptions, generate, iter_generate
from .io import CheckpointError
from .layers import XLoraLinear
from .model import XLoraModel
from .scalings_log import load_scalings_log
from .science import shipped_checkpoint

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
__version__ = "0.1.0"
