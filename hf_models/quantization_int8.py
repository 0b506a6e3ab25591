"""Lesson 9's int8 plugged into ``from_pretrained`` the way bitsandbytes is: a config and an ``HfQuantizer``.

How a user loads it::

    from transformers import AutoModelForCausalLM
    from hf_models import ZooInt8Config      # or, without hf_models: load a folder saved quantized (below)

    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=ZooInt8Config(scheme="llm_int8"))
    model.save_pretrained("int8-folder")     # int8 weights + fp32 scales (safetensors), config.json
                                             # records {"quantization_config": {"quant_method": "zoo_int8", ...}}
    AutoModelForCausalLM.from_pretrained("int8-folder")                           # loads quantized again
    AutoModelForCausalLM.from_pretrained("int8-folder", trust_remote_code=True)   # ... where hf_models is absent

How transformers finds a quantizer. ``from_pretrained`` reads ``config.quantization_config`` (or the
``quantization_config=`` argument), looks its ``quant_method`` up in two registries,
``AUTO_QUANTIZATION_CONFIG_MAPPING`` (the config class) and ``AUTO_QUANTIZER_MAPPING`` (the
``HfQuantizer``), and lets the quantizer rewrite the model skeleton before the weights stream in.
``register_quantization_config`` / ``register_quantizer`` add entries, so this module registers
``"zoo_int8"`` when it is imported. ``causal_lm.py`` imports it, which matters for remote code: a
saved folder carries this file, and ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` imports the folder's configuration and modeling modules (and so this
one) *before* it resolves the quantizer, so ``"zoo_int8"`` is known by then.

Loading, step by step (the same hooks bitsandbytes uses):

1. ``_process_model_before_weight_loading``: on the empty (meta) model, every ``nn.Linear`` but the
   ones kept in full precision becomes an :class:`~.int8.Int8Linear`. An MoE's experts are 3-D
   weights, not ``nn.Linear``, so they (and the router) stay in full precision, as under bitsandbytes.
2. A full-precision checkpoint: each linear weight, as it is read, goes through
   :class:`Int8QuantizeOp` (``param_needs_quantization`` says which), which returns the int8
   codes and the scale. Layer by layer, so the fp32 model is never whole in memory.
3. An int8 checkpoint (``pre_quantized``): ``weight`` (int8) and ``weight_scale`` load as they are.
"""

from __future__ import annotations

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .int8 import DEFAULT_THRESHOLD, Int8Linear, absmax_quantize, check_scheme, replace_linears, replace_modules

QUANT_METHOD = "zoo_int8"


class ZooInt8Config(QuantizationConfigMixin):
    """What ``from_pretrained(..., quantization_config=ZooInt8Config(...))`` quantizes, and how.

    Args:
        scheme: ``"weight_only"`` (int8 storage, fp compute), ``"w8a8"`` (int8 compute, dynamic
            per-token activation scales) or ``"llm_int8"`` (w8a8 + LLM.int8()'s fp outlier columns).
        threshold: LLM.int8()'s outlier threshold on ``|activation|``; > 0.
        modules_to_not_convert: module names (or suffixes) kept in full precision. ``None``: the
            LM head and its tied embedding, as transformers picks them for bitsandbytes.
    """

    def __init__(
        self,
        scheme: str = "weight_only",
        threshold: float = DEFAULT_THRESHOLD,
        modules_to_not_convert: list[str] | None = None,
        **kwargs,
    ):
        kwargs.pop("quant_method", None)  # present when read back from config.json
        if kwargs:
            raise ValueError(f"ZooInt8Config got unknown field(s) {sorted(kwargs)}; it takes scheme, threshold, modules_to_not_convert.")
        check_scheme(scheme, threshold)
        if modules_to_not_convert is not None and not (
            isinstance(modules_to_not_convert, (list, tuple)) and all(isinstance(name, str) for name in modules_to_not_convert)
        ):
            raise ValueError(f"modules_to_not_convert must be a list of module names, got {modules_to_not_convert!r}.")
        self.quant_method = QUANT_METHOD
        self.scheme = scheme
        self.threshold = float(threshold)
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None


class Int8QuantizeOp(ConversionOps):
    """The loading op for one full-precision linear weight: ``{"x.weight": fp}`` -> ``{"x.weight": int8, "x.weight_scale": fp32}``."""

    def __init__(self, hf_quantizer: HfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, **kwargs) -> dict[str, torch.Tensor]:
        result = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            codes, scale = absmax_quantize(value)
            result[name] = codes
            result[name.removesuffix("weight") + "weight_scale"] = scale
        return result


class ZooInt8Quantizer(HfQuantizer):
    """The ``HfQuantizer`` transformers runs for ``quant_method == "zoo_int8"`` (see the module docstring)."""

    requires_calibration = False
    quantization_config: ZooInt8Config

    @property
    def quantized_element_size(self) -> float:
        return 1

    def _process_model_before_weight_loading(self, model, **kwargs):
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert, model._keep_in_fp32_modules
        )
        config = self.quantization_config
        replace_linears(
            model,
            lambda name, linear: Int8Linear(
                linear.in_features, linear.out_features, linear.bias is not None, config.scheme, config.threshold,
                device=linear.weight.device, dtype=linear.weight.dtype,
            ),
            self.modules_to_not_convert,
        )

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module_name, _, tensor_name = param_name.rpartition(".")
        return tensor_name == "weight" and isinstance(model.get_submodule(module_name), Int8Linear)

    def get_quantize_ops(self) -> Int8QuantizeOp:
        return Int8QuantizeOp(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: every :class:`Int8Linear` back to an ``nn.Linear`` of its dequantized weights."""
        dtype = dtype or torch.float32

        def to_linear(layer: Int8Linear) -> torch.nn.Linear:
            linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=layer.weight.device, dtype=dtype)
            linear.weight.data = layer.dequantized_weight(dtype)
            if layer.bias is not None:
                linear.bias.data = layer.bias.data.to(dtype)
            return linear

        replace_modules(model, lambda name, module: isinstance(module, Int8Linear), lambda name, module: to_linear(module))
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register_with_transformers() -> None:
    """Make ``"zoo_int8"`` known to ``from_pretrained``, once per process.

    Both this installed module and a remote-code copy of it (``transformers_modules.<folder>``)
    may be imported in one process; the first registration wins, and transformers' own
    ``register_*`` would raise on the second.
    """
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(ZooInt8Config)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ZooInt8Quantizer)


register_with_transformers()

__all__ = ["QUANT_METHOD", "Int8QuantizeOp", "ZooInt8Config", "ZooInt8Quantizer", "register_with_transformers"]
