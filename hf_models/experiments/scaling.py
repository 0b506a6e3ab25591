"""How a lesson's model scales to frontier systems, in numbers computed from configs (no weights, no downloads).

Every figure is read off a config's fields, so a 47B-parameter Mixtral costs nothing to describe::

    scaling_figures(ModernDecoderConfig()).kv_cache_bytes_per_context
    print(scaling_note(ModernDecoderConfig(), "llama-3-8b", name="lesson 5"))   # a Markdown table + what it means
    python -m hf_models.experiments.scaling runs/05_modern_gpt/model --frontier llama-3-8b

* Training compute, ``6 N + 12 L H Q T`` FLOPs per token (PaLM, appendix B). A weight a token is multiplied
  by costs one multiply-add (2 FLOPs) forward and two backward (the gradients for the input and for the
  weight): 6 per weight. ``N`` counts the matmul weights a token uses: not embedding lookups or norms, but
  the LM head (tied or not), and only the routed experts of an MoE. Attention's ``QK^T`` and ``AV`` add
  ``12 L H Q T`` (``L`` layers, ``H`` heads of width ``Q``, context ``T``): the part that grows with context.
* The KV cache, ``2 (K and V) x layers x kv_heads x head_dim x bytes`` per token. Generation keeps every
  past token's keys and values, per sequence, so at long context the cache, not the weights, fills
  memory: the batch a server runs (its throughput) is the memory left after the weights divided by one
  sequence's cache. Grouped-query attention shares each K/V head among ``heads / kv_heads`` query heads,
  shrinking the cache by that factor (Llama-3-8B: 4x). Full attention assumed (a sliding window caps it).
* Total vs active parameters. An MoE stores every expert (memory: ``total``) but runs each token through
  ``k`` of them (compute: ``active``): Mixtral 8x7B needs 47B parameters of memory, the FLOPs of a 13B model.

Weight bytes: fp32 4 B and bf16 2 B per parameter. ``int8`` and ``nf4`` quantize what lesson 9
(``hf_models.int8``) and bitsandbytes do: the weight of every Linear in the blocks (attention,
dense feed-forward, recurrent and hidden projections); embeddings, LM head, norms, biases, the MoE
router and the MoE experts stay bf16 (the experts are Mixtral's fused 3-D tensors, not Linears, and
both swap ``nn.Linear`` only, so an MoE saves little memory by int8 or nf4 here). int8: 1 B per weight + one fp32 scale per output row; nf4: 0.5 B per weight + one fp32
absmax per block of 64 (bitsandbytes' default blocksize, no double quantization).

Recurrent lessons have no KV cache (``kv_cache_bytes_per_token`` is 0): the GRU carries ``layers x hidden``
numbers and the n-gram MLP its window of ``context_size`` embeddings, whatever the length
(``state_bytes_per_sequence``); the bigram needs only the last token id.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from transformers import AutoConfig, GPT2Config, HfArgumentParser, LlamaConfig, MixtralConfig, PreTrainedConfig

import hf_models

ACCELERATOR_BYTES = 80 * 2**30  # one H100/A100 80 GB, the unit "fits on a GPU" is measured in


@dataclass(frozen=True)
class ScalingFigures:
    """What a config costs to train, store and serve; see the module docstring for each formula."""

    name: str
    total_parameters: int
    active_parameters: int  # per token (an MoE counts only top-k experts)
    training_flops_per_token: float  # PaLM appendix B: 6*N_matmul_active + 12*L*H*Q*T (T = context)
    context: int
    kv_cache_bytes_per_token: int  # at kv_bytes per element, whole model, one sequence
    kv_cache_bytes_per_context: int  # per token * context
    weight_bytes: dict[str, int]  # {"fp32":..., "bf16":..., "int8":..., "nf4":...}
    state_bytes_per_sequence: int = 0  # a recurrent model's fixed state, at kv_bytes per element


@dataclass(frozen=True)
class _Group:
    """``count`` parameter tensors of ``rows x cols`` (``cols=1``: a vector), ``active`` of them used per token."""

    rows: int
    cols: int = 1
    count: int = 1
    active: int | None = None  # None: all `count`
    matmul: bool = False  # a token is multiplied by it: 6N counts it
    quantized: bool = False  # a block Linear's weight: int8/nf4 store it
    stored: bool = True  # False: a tied LM head, whose storage is the embedding's


@dataclass(frozen=True)
class _Architecture:
    groups: list[_Group]
    context: int
    layers: int = 0  # attention layers, heads, kv heads, head width: the cache and the 12LHQT term
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    state_elements: int = 0


def _linear(rows: int, cols: int, count: int = 1, active: int | None = None, bias: bool = False,
            quantized: bool = True) -> list[_Group]:
    weight = _Group(rows, cols, count, active, matmul=True, quantized=quantized)
    return [weight, _Group(rows, 1, count, active)] if bias else [weight]


def _decoder(
    vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, context: int, *,
    feed_forward: str = "swiglu", experts: int = 1, top_k: int = 1, qkv_bias: bool = False, o_bias: bool = False,
    mlp_bias: bool = False, norm_bias: bool = False, qk_norm: bool = False, learned_positions: int = 0,
    fused_qkv: bool = False, tied: bool = True,
) -> _Architecture:
    """A decoder-only transformer in the terms every family shares (GPT-2, LLaMA, Qwen2, Mixtral, the zoo's).

    ``feed_forward``: ``"gelu"`` (two matrices), ``"swiglu"`` (three) or ``"moe"`` (``experts`` SwiGLUs and a router,
    ``top_k`` run per token). ``norm_bias``: LayerNorm with a bias (RMSNorm or bias-free LayerNorm: a weight only).
    """
    C, L, q, kv, I = hidden, layers, heads * head_dim, kv_heads * head_dim, intermediate
    norm = 2 if norm_bias else 1  # vectors per norm
    groups = [_Group(vocab, C), _Group(learned_positions, C)]  # token and position tables: lookups, not matmuls
    for rows in [q + 2 * kv] if fused_qkv else [q, kv, kv]:
        groups += _linear(rows, C, L, bias=qkv_bias)
    groups += _linear(C, q, L, bias=o_bias)
    groups.append(_Group(C, 1, 2 * norm * L))  # the two pre-norms of each layer
    if qk_norm:
        groups.append(_Group(head_dim, 1, 2 * norm * L))
    if feed_forward == "gelu":
        groups += _linear(I, C, L, bias=mlp_bias) + _linear(C, I, L, bias=mlp_bias)
    else:  # SwiGLU's gate, up and down, in each of `experts` experts of which `top_k` run per token
        for rows, cols in ((I, C), (I, C), (C, I)):  # an MoE's are 3-D expert stacks: int8/nf4 leave them alone
            groups += _linear(rows, cols, L * experts, L * top_k, bias=mlp_bias, quantized=feed_forward != "moe")
    if feed_forward == "moe":
        groups.append(_Group(experts, C, L, matmul=True))  # the router, kept in full precision
    groups += [_Group(C, 1, norm), _Group(vocab, C, matmul=True, stored=not tied)]  # final norm, LM head
    return _Architecture(groups, context, L, heads, kv_heads, head_dim)


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _llama_like(c, qkv_bias: bool | None = None, o_bias: bool | None = None, moe: bool = False) -> _Architecture:
    attention_bias = getattr(c, "attention_bias", False)
    return _decoder(
        c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, _head_dim(c),
        c.intermediate_size, c.max_position_embeddings, feed_forward="moe" if moe else "swiglu",
        experts=c.num_local_experts if moe else 1, top_k=c.num_experts_per_tok if moe else 1,
        qkv_bias=attention_bias if qkv_bias is None else qkv_bias, o_bias=attention_bias if o_bias is None else o_bias,
        mlp_bias=getattr(c, "mlp_bias", False), tied=c.tie_word_embeddings,
    )


def _gpt2(c) -> _Architecture:
    return _decoder(
        c.vocab_size, c.n_embd, c.n_layer, c.n_head, c.n_head, c.n_embd // c.n_head, c.n_inner or 4 * c.n_embd,
        c.n_positions, feed_forward="gelu", qkv_bias=True, o_bias=True, mlp_bias=True, norm_bias=True,
        learned_positions=c.n_positions, fused_qkv=True, tied=c.tie_word_embeddings,
    )


# What each dedicated zoo decoder fixes, and lesson 12's configurable decoder makes a config field.
_ZOO_FIXED: dict[str, dict[str, object]] = {
    "zoo_gpt": dict(norm="layernorm", positions="learned", feed_forward="gelu", fused_qkv=True),
    "zoo_modern": dict(norm="rmsnorm", positions="rope", feed_forward="swiglu", bias=False),
    "zoo_moe": dict(norm="rmsnorm", positions="rope", feed_forward="moe", bias=False),
}


def _zoo_decoder(c) -> _Architecture:
    names = ("num_key_value_heads", "feed_forward", "bias", "norm", "qk_norm", "positions", "fused_qkv")
    f = {name: getattr(c, name, None) for name in names} | _ZOO_FIXED.get(c.model_type, {})
    moe, bias = f["feed_forward"] == "moe", f["bias"]
    return _decoder(
        c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, f["num_key_value_heads"] or c.num_attention_heads,
        _head_dim(c), c.intermediate_size, c.max_position_embeddings, feed_forward=f["feed_forward"],
        experts=c.num_local_experts if moe else 1, top_k=c.num_experts_per_tok if moe else 1,
        qkv_bias=bias, o_bias=bias, mlp_bias=bias, norm_bias=bias and f["norm"] == "layernorm", qk_norm=bool(f["qk_norm"]),
        learned_positions=c.max_position_embeddings if f["positions"] == "learned" else 0,
        fused_qkv=bool(f["fused_qkv"]), tied=c.tie_word_embeddings,
    )


def _gru(c) -> _Architecture:
    C, L = c.hidden_size, c.num_hidden_layers
    groups = [_Group(c.vocab_size, C)] + 2 * _linear(3 * C, C, L, bias=True)  # input_proj and hidden_proj
    groups.append(_Group(c.vocab_size, C, matmul=True, stored=not c.tie_word_embeddings))
    return _Architecture(groups, c.max_position_embeddings, state_elements=L * C)


def _ngram_mlp(c) -> _Architecture:
    window = c.context_size * c.embedding_dim
    groups = [_Group(c.vocab_size + 1, c.embedding_dim)] + _linear(c.hidden_size, window, bias=True)
    head_inputs = c.hidden_size + (window if c.direct_connection else 0)
    groups += [_Group(c.vocab_size, head_inputs, matmul=True), _Group(c.vocab_size)]  # the LM head and its bias
    return _Architecture(groups, c.max_position_embeddings, state_elements=window)


def _bigram(c) -> _Architecture:
    return _Architecture([_Group(c.vocab_size, c.vocab_size)], c.max_position_embeddings)  # a lookup: no matmul


ARCHITECTURE_READERS: dict[str, Callable[[PreTrainedConfig], _Architecture]] = {
    "zoo_bigram": _bigram, "zoo_ngram_mlp": _ngram_mlp, "zoo_gru": _gru,
    "zoo_gpt": _zoo_decoder, "zoo_modern": _zoo_decoder, "zoo_moe": _zoo_decoder, "zoo_configurable": _zoo_decoder,
    "gpt2": _gpt2, "llama": _llama_like, "mistral": _llama_like,
    "qwen2": partial(_llama_like, qkv_bias=True, o_bias=False),  # Qwen2: biases on q, k, v only
    "mixtral": partial(_llama_like, moe=True),
}

# Published hyperparameters, built offline with transformers' own config classes.
_LLAMA_7B = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, rms_norm_eps=1e-5, tie_word_embeddings=False)
FRONTIER_CONFIGS: dict[str, Callable[[], PreTrainedConfig]] = {
    "gpt2-xl": partial(GPT2Config, n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257),
    "llama-2-7b": partial(LlamaConfig, **_LLAMA_7B, num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                          max_position_embeddings=4096),
    "llama-3-8b": partial(LlamaConfig, **_LLAMA_7B, num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                          max_position_embeddings=8192, rope_theta=500000.0),
    "mixtral-8x7b": partial(MixtralConfig, **_LLAMA_7B, num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
                            num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1e6),
}


def _weight_bytes(groups: list[_Group]) -> dict[str, int]:
    total, int8, nf4 = 0, 0, 0
    for g in (g for g in groups if g.stored):
        numel = g.rows * g.cols
        total += g.count * numel
        int8 += g.count * (numel + 4 * g.rows if g.quantized else 2 * numel)  # + one fp32 scale per output row
        nf4 += g.count * (math.ceil(numel / 2) + 4 * math.ceil(numel / 64) if g.quantized else 2 * numel)
    return {"fp32": 4 * total, "bf16": 2 * total, "int8": int8, "nf4": nf4}


def scaling_figures(config: PreTrainedConfig, name: str | None = None, context: int | None = None, kv_bytes: int = 2) -> ScalingFigures:
    """Parameters, training FLOPs per token, KV cache and weight memory of ``config``, counted from its fields.

    ``context`` defaults to the config's ``max_position_embeddings`` (GPT-2: ``n_positions``); ``kv_bytes``
    is the bytes per cached element (2: fp16/bf16, 1: an fp8 or int8 cache).
    """
    reader = ARCHITECTURE_READERS.get(getattr(config, "model_type", None))
    if reader is None:
        raise ValueError(
            f"scaling_figures does not support model_type {getattr(config, 'model_type', None)!r}; "
            f"supported: {sorted(ARCHITECTURE_READERS)}."
        )
    arch = reader(config)
    context = arch.context if context is None else context
    stored = [g for g in arch.groups if g.stored]
    active = [(g, g.count if g.active is None else g.active) for g in arch.groups]
    matmul = sum(g.rows * g.cols * n for g, n in active if g.matmul)
    kv_per_token = 2 * arch.layers * arch.kv_heads * arch.head_dim * kv_bytes
    return ScalingFigures(
        name=name or getattr(config, "name_or_path", "") or config.model_type,
        total_parameters=sum(g.rows * g.cols * g.count for g in stored),
        active_parameters=sum(g.rows * g.cols * n for g, n in active if g.stored),
        training_flops_per_token=float(6 * matmul + 12 * arch.layers * arch.heads * arch.head_dim * context),
        context=context,
        kv_cache_bytes_per_token=kv_per_token,
        kv_cache_bytes_per_context=kv_per_token * context,
        weight_bytes=_weight_bytes(arch.groups),
        state_bytes_per_sequence=arch.state_elements * kv_bytes,
    )


def _human(n: float, units: tuple[tuple[str, float], ...], sep: str = "") -> str:
    unit, size = next((u, z) for u, z in units if n >= z)
    return f"{n / max(size, 1):.3g}{sep}{unit}"


_count = partial(_human, units=(("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3), ("", 0)))
_bytes = partial(_human, units=(("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 0)), sep=" ")


def scaling_note(config: PreTrainedConfig, frontier: str, name: str = "this lesson's model", context: int | None = None) -> str:
    """A Markdown table of ``config`` beside the frontier model ``frontier`` (a key of FRONTIER_CONFIGS), plus what it means.

    ``context`` applies to ``config`` only; the frontier model is shown at its own published context.
    """
    if frontier not in FRONTIER_CONFIGS:
        raise ValueError(f"frontier must be one of {sorted(FRONTIER_CONFIGS)}, got {frontier!r}.")
    ours, big = scaling_figures(config, name, context), scaling_figures(FRONTIER_CONFIGS[frontier](), frontier)
    rows = [
        ("parameters (total)", lambda f: f.total_parameters, _count),
        ("parameters active per token", lambda f: f.active_parameters, _count),
        ("training FLOPs per token", lambda f: f.training_flops_per_token, lambda v: f"{v:.3g}"),
        ("context (tokens)", lambda f: f.context, lambda v: f"{v:,}"),
        ("KV cache per token (bf16)", lambda f: f.kv_cache_bytes_per_token, _bytes),
        ("cache or state per full-context sequence", lambda f: f.kv_cache_bytes_per_context + f.state_bytes_per_sequence, _bytes),
    ] + [(f"weights, {k}", lambda f, k=k: f.weight_bytes[k], _bytes) for k in ("fp32", "bf16", "int8", "nf4")]
    lines = [f"| | {ours.name} | {frontier} | ratio |", "|---|---:|---:|---:|"]
    for label, value, show in rows:
        a, b = value(ours), value(big)
        lines.append(f"| {label} | {show(a)} | {show(b)} | {f'{b / a:,.0f}x' if a else '-'} |")
    precision = "bf16" if big.weight_bytes["bf16"] < ACCELERATOR_BYTES else "nf4"
    batch = (ACCELERATOR_BYTES - big.weight_bytes[precision]) // max(big.kv_cache_bytes_per_context, 1)
    if batch > 0:
        serving = (f"an 80 GiB GPU holds the {precision} weights ({_bytes(big.weight_bytes[precision])}) and {batch} such "
                   "sequences: the cache caps the batch.")
    else:  # even the smallest weights leave no room (an MoE whose experts 4-bit quantization does not reach)
        serving = (f"the {precision} weights alone ({_bytes(big.weight_bytes[precision])}) leave an 80 GiB GPU no room for "
                   "one: the model is served across several GPUs.")
    flops, our_flops = big.training_flops_per_token, ours.training_flops_per_token
    versus = f"{flops / our_flops:,.0f}x this model's" if our_flops else "this model's table lookup does no matmul"
    means = [
        f"- Training {frontier} costs {flops:.3g} FLOPs per token ({versus}): 6 per active matmul weight "
        f"(2 forward, 4 backward), plus attention over the {big.context:,}-token context.",
        f"- Serving: one full-context sequence holds {_bytes(big.kv_cache_bytes_per_context)} of KV cache; {serving}",
    ]
    if big.active_parameters < big.total_parameters:
        means.append(f"- {frontier} stores {_count(big.total_parameters)} parameters (memory) but runs "
                     f"{_count(big.active_parameters)} per token (compute): an MoE pays memory for capacity.")
    if ours.state_bytes_per_sequence or not ours.kv_cache_bytes_per_token:
        state = f"a {_bytes(ours.state_bytes_per_sequence)} state" if ours.state_bytes_per_sequence else "the last token"
        means.append(f"- {ours.name} keeps no KV cache, only {state} per sequence at any length, where attention's cache "
                     "grows with every token.")
    return "\n".join(lines + [""] + means[:4]) + "\n"


@dataclass
class ScalingArguments:
    """``python -m hf_models.experiments.scaling FOLDER_OR_NAME [--frontier llama-2-7b] [--context N]``."""

    model: str = field(metadata={"help": "A saved model folder (its config.json), a frontier name or a zoo model_type (its default config)."})
    frontier: str = field(default="llama-2-7b", metadata={"help": f"The frontier model to compare with: one of {sorted(FRONTIER_CONFIGS)}."})
    context: int | None = field(default=None, metadata={"help": "Context length for FLOPs and cache; default the config's own."})


def load_config(model: str) -> PreTrainedConfig:
    """The config of a saved folder, a frontier name, or a zoo model_type's defaults."""
    if model in FRONTIER_CONFIGS:
        return FRONTIER_CONFIGS[model]()
    if model in hf_models.MODEL_REGISTRY:
        return hf_models.MODEL_REGISTRY[model][0]()
    if (Path(model) / "config.json").is_file():
        return AutoConfig.from_pretrained(model)
    raise ValueError(
        f"--model {model!r} is not a folder with a config.json; give a saved model folder, a frontier name "
        f"{sorted(FRONTIER_CONFIGS)} or a zoo model_type {sorted(hf_models.MODEL_REGISTRY)}."
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--model", *argv]  # FOLDER_OR_NAME may come first, without --model
    parser = HfArgumentParser(
        ScalingArguments, description="Print a lesson's scaling note beside a frontier model.",
        usage="python -m hf_models.experiments.scaling FOLDER_OR_NAME [--frontier NAME] [--context N]",
    )
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if args.frontier not in FRONTIER_CONFIGS:
        parser.error(f"--frontier must be one of {sorted(FRONTIER_CONFIGS)}, got {args.frontier!r}.")
    try:
        config = load_config(args.model)
    except ValueError as error:
        parser.error(str(error))
    print(scaling_note(config, args.frontier, name=Path(args.model).name or args.model, context=args.context))
    return 0


__all__ = ["ARCHITECTURE_READERS", "FRONTIER_CONFIGS", "ScalingArguments", "ScalingFigures", "load_config", "scaling_figures", "scaling_note"]


if __name__ == "__main__":
    sys.exit(main())
