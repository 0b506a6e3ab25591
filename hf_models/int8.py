"""Lesson 9: INT8 quantization written by hand. Three schemes, one ``Int8Linear``, one ``quantize()``.

Why quantize
------------
Decoding one token reads every weight once and does two flops with it: at batch 1 a language model
is bound by memory bandwidth, not arithmetic. Storing weights in 8 bits instead of 32 (or 16)
moves 4x (2x) fewer bytes per token and fits a 4x larger model in the same memory. The price is
rounding error, which this lesson measures (``recipes/09_quantization.py``).

Absmax, symmetric, per output channel
-------------------------------------
A row ``w`` of a weight matrix (the weights of one output feature) becomes ``round(w * 127 /
max|w|)`` in [-127, 127], plus one fp32 scale ``s = max|w| / 127``; it is read back as
``codes * s``. One scale per *row* (output channel) rather than one per tensor keeps a single large
row from flattening the resolution of all the others; the rounding error of any weight is at most
``s / 2``. Symmetric (no zero point) because trained weights are centred on zero, and it keeps the
integer matmul free of cross terms. This is bitsandbytes' ``int8_vectorwise_quant`` (the
``SCB`` it stores is ``max|w|``, our ``s * 127``; the codes are identical, tests prove it).

The three schemes (``SCHEMES``)
-------------------------------
* ``"weight_only"``: int8 storage, dequantize-then-matmul in the activations' dtype. Memory 4x
  smaller than fp32, compute unchanged: what weight-only int8/int4 kernels in llama.cpp, GPTQ/AWQ
  and TensorRT-LLM do for batch-1 decoding, where the weight read is the whole cost.
* ``"w8a8"``: activations quantized too, per token (one absmax scale per row of ``x``, computed
  on the fly: "dynamic"), and the matmul runs on int8 with int32 accumulation (``torch._int_mm``:
  VNNI/AMX on x86, IMMA tensor cores on NVIDIA). ``y = (xq @ wq.T) * sx * sw``: the per-row
  activation scale and the per-column weight scale factor out of the sum, which is why they are
  chosen per token and per output channel and not per input feature. This is *int8 compute*
  (SmoothQuant, Xiao et al. 2022, and the W8A8 paths of vLLM / TensorRT-LLM).
* ``"llm_int8"``: LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339). Vector-wise W8A8 as above,
  plus the *outlier decomposition*: beyond ~6.7B parameters, a few hidden features carry
  activations 20-100x larger than the rest, in every layer. One of them in a row makes that
  token's absmax scale huge, and every other value of the row rounds to 0. So input feature
  columns where any ``|x| >= threshold`` (6.0 in the paper and in bitsandbytes) are cut out and
  multiplied in floating point, the rest in int8: ``y = x[:, O] @ W[:, O].T + int8(x[:, ~O]) @
  int8(W[:, ~O]).T``. Under 0.1% of the columns, so the int8 matmul keeps almost all the work.
  As in bitsandbytes' inference path, the weights are stored only in int8, so the outlier columns
  use the dequantized weights: the activations are what the outliers break, not the weights.

Shapes: ``x`` (..., in) is flattened to (N, in) tokens; weights are (out, in) as in ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("weight_only", "llm_int8", "w8a8")
INT8_MAX = 127
DEFAULT_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold on |activation|, as in the paper and bitsandbytes


def check_scheme(scheme: str, threshold: float) -> None:
    """Raise a ValueError naming the field for an unknown scheme or a threshold that is not > 0."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"threshold must be a number > 0 (LLM.int8() uses 6.0), got {threshold!r}.")


# ----------------------------------------------------------------------------- the math


def absmax_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 along the last dim: ``(codes int8 (..., K), scale fp32 (...))``.

    ``codes = round(x * (127 / max|x|))``, ``scale = max|x| / 127``, one scale per row: per output
    channel for a weight (out, in), per token for activations (N, in); bitsandbytes' formula, to
    the bit. An all-zero row gets scale 0 and codes 0 (bitsandbytes would divide by zero there).
    Few ops on purpose: at batch 1 each op costs microseconds, more than a small int8 matmul.
    """
    # max|x| per row in fp32 (one fused reduction); the floor keeps an all-zero row at codes 0, not 0/0.
    absmax = torch.linalg.vector_norm(x.detach(), float("inf"), dim=-1, keepdim=True, dtype=torch.float32)  # (..., 1)
    codes = torch.round(x * (INT8_MAX / absmax.clamp(min=1e-30))).to(torch.int8)  # (..., K)
    return codes, absmax.squeeze(-1) / INT8_MAX


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * scale`` row by row: int8 (out, in) and (out,) back to ``dtype`` (out, in)."""
    return codes.to(dtype) * scale.to(dtype).unsqueeze(-1)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for int8 a (N, K) and b (M, K), accumulated exactly in int32: (N, M).

    ``torch._int_mm`` is the int8 GEMM (oneDNN VNNI/AMX on CPU, cuBLASLt IMMA on CUDA). On CUDA it
    wants more than 16 rows and K, M multiples of 8: short inputs (decoding at batch 1) are padded
    with zero rows, other shapes fall back to an exact float64 matmul.
    """
    if a.device.type == "cuda":
        if a.shape[1] % 8 or b.shape[0] % 8:
            return (a.double() @ b.double().T).to(torch.int32)
        rows = a.shape[0]
        if rows <= 16:
            a = F.pad(a, (0, 0, 0, 17 - rows))  # (17, K)
        return torch._int_mm(a, b.T)[:rows]
    return torch._int_mm(a, b.T)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the input features (columns of x (N, K)) where any ``|x| >= threshold``: (n_outliers,)."""
    return torch.nonzero((x.abs() >= threshold).any(dim=0)).flatten()


def w8a8_matmul(x: torch.Tensor, weight_codes: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Vector-wise int8 matmul, ``x`` (N, K) float -> (N, M) fp32: per-token x per-channel scales.

    ``x @ W.T ~= (xq @ wq.T) * sx[:, None] * sw[None, :]``, the integer product exact in int32.
    """
    x_codes, x_scale = absmax_quantize(x)  # (N, K) int8, (N,)
    accumulated = int8_matmul(x_codes, weight_codes)  # (N, M) int32
    return (accumulated * x_scale.unsqueeze(1)).mul_(weight_scale)  # int32 * fp32 -> fp32 (N, M)


def llm_int8_matmul(
    x: torch.Tensor, weight_codes: torch.Tensor, weight_scale: torch.Tensor, threshold: float = DEFAULT_THRESHOLD
) -> torch.Tensor:
    """LLM.int8(): fp matmul on the outlier columns + vector-wise int8 matmul on the rest, (N, K) -> (N, M) fp32."""
    outliers = outlier_columns(x, threshold)
    if outliers.numel() == 0:
        return w8a8_matmul(x, weight_codes, weight_scale)
    regular = x.index_fill(1, outliers, 0)  # outlier columns zeroed: they no longer set the row scales
    out = w8a8_matmul(regular, weight_codes, weight_scale)
    weight_outliers = dequantize(weight_codes[:, outliers], weight_scale)  # (M, n_outliers)
    return out + x[:, outliers].float() @ weight_outliers.T


# ----------------------------------------------------------------------------- the layer


class Int8Linear(nn.Module):
    """A drop-in for ``nn.Linear`` holding int8 weights (out, in) and fp32 per-output-channel scales (out,).

    The parameter names are the checkpoint format: ``weight`` (int8), ``weight_scale`` (fp32),
    ``bias`` (as it was). Frozen: integer tensors have no gradient (QLoRA trains adapters beside them).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        scheme: str = "weight_only",
        threshold: float = DEFAULT_THRESHOLD,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        check_scheme(scheme, threshold)
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.threshold = scheme, float(threshold)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "weight_only", threshold: float = DEFAULT_THRESHOLD) -> "Int8Linear":
        """Quantize a trained ``nn.Linear``'s weight per output channel (its bias stays as it is)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, threshold,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        codes, scale = absmax_quantize(linear.weight.detach())
        layer.weight.data, layer.weight_scale.data = codes, scale
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == "weight_only":
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        flat = x.reshape(-1, self.in_features)  # (..., in) -> (N, in)
        if self.scheme == "w8a8":
            out = w8a8_matmul(flat, self.weight, self.weight_scale)
        else:
            out = llm_int8_matmul(flat, self.weight, self.weight_scale, self.threshold)
        if self.bias is not None:
            out += self.bias
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)  # (N, out) -> (..., out)

    def extra_repr(self) -> str:
        threshold = f", threshold={self.threshold}" if self.scheme == "llm_int8" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, scheme={self.scheme}{threshold}"


# ----------------------------------------------------------------------------- the model


def default_modules_to_not_convert(model: nn.Module) -> list[str]:
    """The output embedding (``lm_head``): what bitsandbytes and the LLM.int8() paper keep in full precision.

    Why: the head is tied to the token embedding in every zoo decoder (one matrix, so int8 there
    would quantize the embedding too or untie them), its error lands directly on the logits with no
    later layer to absorb it, and for a small vocabulary-heavy model it is the single largest
    matrix whose precision shows in perplexity. Embeddings are never converted: a lookup reads
    one row per token, so int8 would save memory but no compute.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules() if head is not None and module is head]


def should_convert(name: str, modules_to_not_convert: list[str]) -> bool:
    """False if ``name`` is, lies under, or ends with any of ``modules_to_not_convert`` ("lm_head", "model.layers.0")."""
    return not any(name == skip or name.startswith(skip + ".") or name.endswith("." + skip) for skip in modules_to_not_convert)


def replace_modules(model: nn.Module, select: Callable[[str, nn.Module], bool], build: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Swap every submodule ``select(name, module)`` picks for ``build(name, module)``; returns the swapped names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if name and select(name, module):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, build(name, module))
            swapped.append(name)
    return swapped


def replace_linears(model: nn.Module, build: Callable[[str, nn.Module], nn.Module], modules_to_not_convert: list[str]) -> list[str]:
    """Swap every ``nn.Linear`` not skipped for ``build(name, linear)``; returns the converted names."""
    return replace_modules(model, lambda name, m: type(m) is nn.Linear and should_convert(name, modules_to_not_convert), build)


def quantize(
    model: nn.Module,
    scheme: str = "weight_only",
    modules_to_not_convert: list[str] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` in place to :class:`Int8Linear` and return the model.

    Args:
        scheme: one of ``SCHEMES`` (see the module docstring).
        modules_to_not_convert: names (or name suffixes) kept in full precision; default the LM
            head (:func:`default_modules_to_not_convert` says why).
        threshold: LLM.int8()'s outlier threshold on ``|activation|`` (``scheme="llm_int8"``).

    This is the whole algorithm; ``ZooInt8Config`` (``quantization_int8.py``) runs the same
    per-layer quantization inside ``from_pretrained``, as bitsandbytes does.
    """
    check_scheme(scheme, threshold)
    skip = default_modules_to_not_convert(model) if modules_to_not_convert is None else list(modules_to_not_convert)
    converted = replace_linears(model, lambda name, linear: Int8Linear.from_linear(linear, scheme, threshold), skip)
    if not converted:
        raise ValueError(f"quantize found no nn.Linear to convert in {type(model).__name__} (modules_to_not_convert={skip}).")
    return model


__all__ = [
    "DEFAULT_THRESHOLD",
    "INT8_MAX",
    "SCHEMES",
    "Int8Linear",
    "absmax_quantize",
    "check_scheme",
    "default_modules_to_not_convert",
    "dequantize",
    "int8_matmul",
    "llm_int8_matmul",
    "outlier_columns",
    "quantize",
    "replace_linears",
    "replace_modules",
    "should_convert",
    "w8a8_matmul",
]
