"""XLoraModel: the scaling pass, the classifier and the real pass, with a KV cache per pass.

    input_ids [B, T]
        |
        +------------------------------+
        |                              |
        v                              |
  scaling pass: the same decoder,      |
  every scaling = scaling_pass_value   |
  (0: experts skipped, plain base)     |
  KV cache #1 (never depends on s)     |
        |                              |
        v  last hidden state [B, T, H] |
  classifier (XLoraClassifier)         |
        |                              |
        v  scalings s [B, T, L, N]     |
  top-k / softmax / masks / global g   |
        |                              |
        |  ScalingsState.coef: one     |
        |  [B, T, R_l] tensor per      |
        |  adapted module l, set for   |
        |  the real pass, cleared in   |
        |  `finally`                   |
        v                              v
  real pass: every XLoraLinear l computes
      W x + ((x @ A_cat.T) * coef_l) @ B_cat.T      (all N experts in two GEMMs)
  KV cache #2
        |
        v
  logits [B, T, V]

Token t's scalings depend only on tokens <= t, so both passes decode incrementally, each with its
own cache, and greedy output equals recomputing the whole prefix (what PEFT does).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xlora.core.cache import cache_kwargs
from xlora.core.classifier import XLoraClassifier, select_topk
from xlora.core.config import XLoraConfig, XLoraConfigError
from xlora.core.early_gate import check_scaling_pass_layers, truncated_decoder
from xlora.core.experts import ExpertSpec, LoraExpert, load_experts, stack_module
from xlora.core.layers import ScalingsState, XLoraLinear, compute_dtype
from xlora.core.multimodal import (
    IMAGE_PREFIXES,
    check_image_inputs,
    check_image_keywords,
    check_vision_base,
    shared_inputs,
    text_config,
)
from xlora.core.scalings_api import ScalingsAPI
from xlora.core.scalings_log import ScalingsLog

# Reading and writing checkpoints lives in `xlora.formats`, a layer above the core. That layer hands
# its two functions to the model here when it is imported (`import xlora` always imports it), so the
# core never imports upward and `from_pretrained` / `save_pretrained` keep PEFT's names on the class.
_CHECKPOINT_IO: dict[str, Callable[..., Any]] = {}


def register_checkpoint_io(load: Callable[..., XLoraModel], save: Callable[..., Path]) -> None:
    """Called once by `xlora.formats.checkpoint`: the functions behind from_pretrained / save_pretrained."""
    _CHECKPOINT_IO.update(load=load, save=save)


def _checkpoint_io(which: str) -> Callable[..., Any]:
    if which not in _CHECKPOINT_IO:  # only when xlora.core is used without `import xlora` having run
        import importlib

        importlib.import_module("xlora.formats.checkpoint")
    return _CHECKPOINT_IO[which]


def check_arguments(base: object, config: object, classifier_dtype: object) -> None:
    """A TypeError naming the argument for a base, config or classifier dtype of the wrong kind."""
    if not isinstance(base, nn.Module) or not hasattr(base, "get_input_embeddings"):
        raise TypeError(f"base: expected a transformers causal LM (an nn.Module), got {type(base).__name__}")
    if not isinstance(config, XLoraConfig):
        hint = " (use XLoraConfig(**d))" if isinstance(config, dict) else ""
        raise TypeError(f"config: expected an XLoraConfig, got {type(config).__name__}{hint}")
    if classifier_dtype is not None and not (
        isinstance(classifier_dtype, torch.dtype) and classifier_dtype.is_floating_point
    ):
        raise TypeError(f"classifier_dtype: expected a floating torch dtype or None, got {classifier_dtype!r}")


def check_labels(labels: object, reference: torch.Tensor | None) -> None:
    """`labels` must be token ids shaped like the input `[B, T]` (a ValueError naming them, not torch's)."""
    if labels is None or reference is None:
        return
    want = list(reference.shape[:2])
    if not isinstance(labels, torch.Tensor) or list(labels.shape) != want or labels.is_floating_point():
        got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected integer token ids of shape {want} like input_ids, got {got}")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


class XLoraModel(ScalingsAPI, nn.Module):
    """A causal LM whose adapted modules mix N frozen LoRA experts with per-token learned weights.

    Built with `from_experts` (new gate) or `from_pretrained` (saved gate). The base model is
    modified in place: every targeted linear becomes an `XLoraLinear`; `unload()` undoes that.
    """

    def __init__(
        self,
        base: nn.Module,
        experts: list[LoraExpert],
        module_names: list[str],
        config: XLoraConfig,
        base_model_id: str | None = None,
        classifier_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        """`classifier_dtype`: float32 by default, whatever the base's precision (the routing decision
        stays exact on bf16 or quantized bases); None runs it in the base's compute dtype."""
        check_arguments(base, config, classifier_dtype)
        super().__init__()
        config = copy.deepcopy(config)
        hidden_size = int(text_config(base).hidden_size)  # a VLM's is its language model's
        if config.hidden_size is None:
            config.hidden_size = hidden_size
        elif config.hidden_size != hidden_size:
            raise XLoraConfigError(
                f"XLoraConfig.hidden_size: expected the base model's hidden size {hidden_size}, "
                f"got {config.hidden_size}"
            )
        config.bind_experts(len(experts))  # later assignments are checked against this bound too
        check_scaling_pass_layers(config, base)
        self.config = config
        self.base = base
        self.base_model_id = base_model_id or getattr(base.config, "_name_or_path", None) or None
        self.expert_sources = {e.name: (e.path, e.adapter_config) for e in experts}
        self._expert_names = [e.name for e in experts]
        self.state = ScalingsState()
        self.scalings_log = ScalingsLog()
        self._latest_scalings: torch.Tensor | None = None
        self._experts_disabled = False
        self._expert_mask: torch.Tensor | None = None  # [N] bool, False = masked out
        self._static: torch.Tensor | None = None  # [L, N] fixed scalings instead of the classifier
        self._merged = False  # experts folded into the base weights by a running generation (merge.py)

        ref = base.get_input_embeddings().weight
        layers: list[XLoraLinear] = []
        gather, scales = [], []
        for index, name in enumerate(module_names):
            target = base.get_submodule(name)
            w = target.weight
            # experts in a float compute dtype, never the int8/uint8 storage dtype of a quantized base
            stacked = stack_module(name, experts, dtype=compute_dtype(target, ref.dtype), device=w.device)
            layer = XLoraLinear(target, index, stacked, self.state, trainable=config.use_trainable_adapters)
            _set_submodule(base, name, layer)
            layers.append(layer)
            gather.append(index * len(experts) + stacked.row_expert.cpu())
            scales.append(stacked.row_scale.cpu().float())
        self.module_names = list(module_names)
        self._layers = layers  # plain list: the layers are registered under self.base already
        self._ranks = [layer.rank for layer in layers]
        self.register_buffer("gather_index", torch.cat(gather).to(ref.device), persistent=False)  # [sum R]
        self.register_buffer("row_scale", torch.cat(scales).to(ref.device, ref.dtype), persistent=False)

        head = base.get_output_embeddings()
        if isinstance(head, XLoraLinear):  # an expert adapts lm_head itself
            head = head.base_layer
        head_w = head.weight if head is not None else ref
        float_dtype = head_w.dtype if head_w.is_floating_point() else ref.dtype
        self.classifier = XLoraClassifier(config, config.hidden_size, len(experts), len(layers)).to(
            device=head_w.device, dtype=classifier_dtype or float_dtype
        )
        self._freeze()
        self.eval()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_experts(
        cls,
        base: nn.Module,
        experts: ExpertSpec,
        config: XLoraConfig | None = None,
        base_model_id: str | None = None,
        classifier_dtype: torch.dtype | None = torch.float32,
    ) -> XLoraModel:
        """Wrap `base` with the PEFT LoRA adapters in `experts` ({name: dir} or [(name, dir)]) and a new gate.

        `base` may be fp32, bf16/fp16 or quantized (bitsandbytes 8-bit / 4-bit layers stay as they are),
        or a vision-language model (Qwen2-VL, Idefics3): then only its language model's linears (and
        the LM head) are adapted, and an expert with vision-tower / projector tensors is refused
        (`xlora.core.multimodal`)."""
        config = XLoraConfig() if config is None else config
        check_arguments(base, config, classifier_dtype)  # before the experts are read against the base
        loaded, modules = load_experts(base, experts)
        return cls(
            base,
            loaded,
            modules,
            config,
            base_model_id=base_model_id,
            classifier_dtype=classifier_dtype,
        )

    @classmethod
    def from_pretrained(
        cls,
        base: nn.Module,
        path: str | os.PathLike[str],
        adapters: ExpertSpec | None = None,
        classifier_dtype: torch.dtype | None = torch.float32,
    ) -> XLoraModel:
        """Load a native or PEFT X-LoRA checkpoint onto `base`; `adapters` overrides the stored expert folders.

        Checkpoints hold no base weights, so one saved on any precision loads on fp32, bf16, 8-bit or 4-bit."""
        return _checkpoint_io("load")(base, Path(path), adapters, classifier_dtype=classifier_dtype)

    def save_pretrained(self, path: str | os.PathLike[str], overwrite: bool = True, format: str = "native") -> Path:
        """Write config, classifier and one PEFT adapter folder per expert, atomically.

        `format="native"` is the original package's layout (read by it and by mistral.rs);
        `format="peft"` is a directory that PEFT's `PeftModel.from_pretrained` loads."""
        self._check_not_merged()
        return _checkpoint_io("save")(self, Path(path), overwrite=overwrite, format=format)

    def _freeze(self) -> None:
        """Base frozen, experts frozen unless `use_trainable_adapters`, classifier trainable."""
        for p in self.base.parameters():
            p.requires_grad_(False)
        for layer in self._layers:
            layer.lora_A.requires_grad_(self.config.use_trainable_adapters)
            layer.lora_B.requires_grad_(self.config.use_trainable_adapters)
        for p in self.classifier.parameters():
            p.requires_grad_(True)

    def unload(self) -> nn.Module:
        """Put the original linear layers back and return the plain base model."""
        self._check_not_merged()  # else the returned weights would include the experts
        for name, layer in zip(self.module_names, self._layers):
            _set_submodule(self.base, name, layer.base_layer)
        self._layers = []
        self._unloaded = True  # every later call is refused: it would silently be the plain base model
        return self.base

    # ------------------------------------------------------------------ properties

    @property
    def expert_names(self) -> list[str]:
        return list(self._expert_names)

    @property
    def n_experts(self) -> int:
        return len(self._expert_names)

    @property
    def n_layers(self) -> int:
        """Number of adapted modules L (not transformer blocks)."""
        return len(self._layers)

    @property
    def xlora_layers(self) -> list[XLoraLinear]:
        return list(self._layers)

    @property
    def device(self) -> torch.device:
        return self.gather_index.device

    # ------------------------------------------------------------------ scalings

    def _coef(self, scalings: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Scalings `[..., L, N]` (after top-k) -> per-layer rank-row coefficients, each `[..., R_l]`."""
        g = self.config.global_scaling_weight
        if g == 0:
            return None
        # the classifier may run in float32 beside a bf16 base: coefficients in the experts' dtype
        coef = scalings.flatten(-2).index_select(-1, self.gather_index).to(self.row_scale.dtype)  # [..., sum R]
        return (coef * (self.row_scale * g).to(coef.dtype)).split(self._ranks, dim=-1)

    def _scaling_pass_coef(self) -> tuple[torch.Tensor, ...] | None:
        """Coefficients of the scaling pass: every scaling equal to `scaling_pass_value`."""
        value = self.config.scaling_pass_value
        if value is None:
            value = 1.0 / self.n_experts
        if value == 0:
            return None  # plain base model: skip the expert math entirely
        s = torch.full((1, 1, self.n_layers, self.n_experts), float(value), device=self.device)
        coef = self._coef(select_topk(s.to(self.row_scale.dtype), self.config))
        return None if coef is None else tuple(c[0, 0] for c in coef)  # each [R_l], broadcast over B, T

    def _check_not_merged(self) -> None:
        if getattr(self, "_unloaded", False):
            raise RuntimeError(
                "XLoraModel: unload() gave its base model back, so this mixture no longer exists; "
                "build it again (from_pretrained / from_experts) to use it"
            )
        if self._merged:
            raise RuntimeError(
                "XLoraModel: a generation in progress holds the experts merged into the base weights; "
                "finish or close() its iter_generate generator before using the model otherwise"
            )

    @contextmanager
    def _coefficients(self, coef: Sequence[torch.Tensor | None] | None) -> Iterator[None]:
        self._check_not_merged()
        self.state.coef = coef
        try:
            yield
        finally:
            self.state.coef = None

    def predict_scalings(self, hidden: torch.Tensor) -> torch.Tensor:
        """Classifier over last hidden states `[B, T, H]` -> scalings `[B, T, L, N]`; recorded as latest."""
        mask = None if self._expert_mask is None else self._expert_mask.to(hidden.device)
        scalings = self.classifier(hidden, mask)
        self._latest_scalings = scalings
        self.scalings_log.add(scalings)
        return scalings

    def scaling_pass(self, cache: Any = None, **inputs: Any) -> torch.Tensor:
        """Run the decoder (its first `scaling_pass_layers` blocks) with constant scalings, without
        gradient; return the last hidden state."""
        decoder = self.base.base_model
        k, norm = self.config.scaling_pass_layers, self.config.scaling_pass_norm
        with torch.no_grad(), self._coefficients(self._scaling_pass_coef()), truncated_decoder(decoder, k, norm):
            out = decoder(**inputs, **cache_kwargs(decoder, cache))
        return out.last_hidden_state  # [B, T, H]

    def route(self, cache: Any = None, **inputs: Any) -> torch.Tensor:
        """Scalings `[B, T, L, N]` for these inputs: scaling pass + classifier, or the static ones."""
        if self._static is not None:
            ref = inputs.get("input_ids")
            if ref is None:
                ref = inputs["inputs_embeds"]
            static = self._static.to(self.device)  # [L, N]
            if self._expert_mask is not None:  # masked experts get 0 (no renormalising: the weights are the user's)
                static = static * self._expert_mask.to(static.device, static.dtype)
            return static[None, None].expand(ref.shape[0], ref.shape[1], -1, -1)
        return self.predict_scalings(self.scaling_pass(cache=cache, **inputs))

    @contextmanager
    def static_scalings(self, weights: Sequence[float] | torch.Tensor) -> Iterator[None]:
        """Inside, fixed expert weights replace the classifier (no scaling pass): `[N]` for every
        module, or `[L, N]`. One-hot = that expert alone as a plain LoRA; 1/N each = a uniform mix."""
        w = torch.as_tensor(weights, dtype=self.row_scale.dtype)
        n, layers = self.n_experts, self.n_layers
        if w.dim() not in (1, 2) or w.shape[-1] != n or (w.dim() == 2 and w.shape[0] != layers):
            raise ValueError(f"static_scalings: expected [{n}] or [{layers}, {n}] weights, got {list(w.shape)}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError("static_scalings: weights must be finite (got NaN or inf)")
        previous = self._static
        self._static = w.expand(self.n_layers, self.n_experts).clone() if w.dim() == 1 else w
        try:
            yield
        finally:
            self._static = previous

    @contextmanager
    def apply_scalings(self, scalings: torch.Tensor) -> Iterator[None]:
        """Inside, the adapted layers use `scalings` `[B, T, L, N]` (top-k applied here)."""
        with self._coefficients(self._coef(select_topk(scalings, self.config, self._expert_mask))):
            yield

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Scaling pass, classifier, real pass. Returns the base model's output (logits, loss with labels).

        On a vision-language base the image inputs (`pixel_values`, `image_grid_thw`,
        `pixel_attention_mask`, ...: every `pixel_*`/`image_*`/`video_*`/`mm_*` keyword) go to both
        passes, so the classifier reads the merged text+image sequence (`xlora.core.multimodal`)."""
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
        }
        self._check_not_merged()
        check_labels(labels, input_ids if input_ids is not None else inputs_embeds)
        check_image_keywords([k for k in kwargs if k.startswith(IMAGE_PREFIXES)], self.base, "forward()")
        shared = shared_inputs(self.base, input_ids, kwargs)  # image inputs: both passes
        check_vision_base(self.base, shared)
        check_image_inputs(self.base, input_ids, shared)
        kwargs.update(shared)
        if self._experts_disabled:
            return self.base(**inputs, labels=labels, **kwargs)
        scalings = self.route(**inputs, **shared)
        kwargs.setdefault("use_cache", False)
        with self.apply_scalings(scalings):
            return self.base(**inputs, labels=labels, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Decode with one KV cache per pass; see `xlora.core.generation.generate` for the options."""
        from xlora.core.generation import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    @contextmanager
    def disable_experts(self) -> Iterator[None]:
        """Inside, the model is the plain base model (no scaling pass, no expert math)."""
        previous = self._experts_disabled
        self._experts_disabled = True
        try:
            yield
        finally:
            self._experts_disabled = previous

    def mask_experts(self, names: str | Sequence[str] | None) -> _MaskHandle:
        """Drop experts at inference: their scalings become 0 and the softmax renormalises over the rest
        (under `static_scalings` the masked experts' weights become 0, the others stay as given).

        `names` is one expert name (a str) or a list of names, each one of `expert_names` (else a
        ValueError lists the valid ones); `None` or an empty list removes the mask. Stays in effect
        until `mask_experts(None)`, or use it as a context manager. The scaling pass is not affected
        (it is the constant pass the classifier was trained on).
        """
        previous = self._expert_mask
        if names is None:
            self._expert_mask = None
            return _MaskHandle(self, previous)
        if not isinstance(names, (str, Sequence)):
            raise ValueError(f"mask_experts: expected an expert name or a list of names, got {names!r}")
        chosen = [names] if isinstance(names, str) else list(names)  # a str is one name, not its letters
        wrong = [n for n in chosen if not isinstance(n, str)]
        if wrong:
            raise ValueError(f"mask_experts: expected expert names, got {wrong}; experts are {self._expert_names}")
        unknown = [n for n in chosen if n not in self._expert_names]
        if unknown:
            raise ValueError(f"mask_experts: unknown expert(s) {unknown}; experts are {self._expert_names}")
        if not chosen:
            self._expert_mask = None
            return _MaskHandle(self, previous)
        keep = torch.tensor([n not in chosen for n in self._expert_names], dtype=torch.bool)
        if not keep.any():
            raise ValueError("mask_experts: cannot mask every expert (use disable_experts() instead)")
        self._expert_mask = keep
        return _MaskHandle(self, previous)


class _MaskHandle:
    """Returned by `mask_experts`; as a context manager it restores the previous mask on exit."""

    def __init__(self, model: XLoraModel, previous: torch.Tensor | None) -> None:
        self.model, self.previous = model, previous

    def __enter__(self) -> XLoraModel:
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model._expert_mask = self.previous
