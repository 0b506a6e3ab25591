"""What several test files share: plain functions and constants, imported as ``from tests.helpers import ...``.

Fixtures live in ``tests/conftest.py`` (and may wrap what is here); test files import nothing from conftest.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.cache_utils import Cache

import hf_models
from hf_models.configuration_configurable import ConfigurableDecoderConfig
from hf_models.modeling_configurable import ConfigurableAttention
from hf_models.modeling_modern import RotaryEmbedding, build_causal_mask, mask_lengths

# ----------------------------------------------------------------------------- tiny zoo models


# The tiny configuration of every registered model type. A model joins the integration matrix by
# registering in hf_models.MODEL_REGISTRY and adding its line here (a test checks none is missing).
TINY_CONFIGS: dict[str, dict] = {
    "zoo_bigram": dict(initializer_range=0.5),
    "zoo_ngram_mlp": dict(context_size=3, embedding_dim=8, hidden_size=16),
    "zoo_gru": dict(hidden_size=16, num_hidden_layers=2),
    "zoo_gpt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "zoo_modern": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "zoo_moe": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=3,  # k=3 of 4: every expert sees tokens, so LoRA on each gets a gradient in the matrix
    ),
    # Lesson 12: a combination no other lesson builds (its presets are the three above, tested in test_configurable).
    "zoo_configurable": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, norm="rmsnorm", qk_norm=True,
        positions="rope", feed_forward="gelu", fused_qkv=True, bias=False, tie_word_embeddings=False,
    ),
}

# Every registered type with a backbone (``base_model_class``, loaded by ``AutoModel``): all but the bigram table.
BACKBONE_TYPES = sorted(t for t, (_, model_class) in hf_models.MODEL_REGISTRY.items() if model_class.base_model_class is not None)

TINY_TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"

# The zoo's end-of-text token, spelled out here rather than read from hf_models, so a rename shows.
EOS = "<|endoftext|>"


def build_tiny_model(model_type: str, vocab_size: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """The tiny model of ``model_type`` (context 64), seeded, in eval mode; ``overrides`` update its config (the context too)."""
    config_class, model_class = hf_models.MODEL_REGISTRY[model_type]
    torch.manual_seed(seed)
    config = config_class(vocab_size=vocab_size, **{"max_position_embeddings": 64, **TINY_CONFIGS[model_type], **overrides})
    return model_class(config).eval()


def save_tiny_model(model_type: str, tokenizer, folder, **overrides) -> torch.nn.Module:
    """Save the tiny model of ``model_type`` (vocabulary: ``tokenizer``'s) with ``tokenizer`` in ``folder``; returns the model."""
    model = build_tiny_model(model_type, len(tokenizer), **overrides)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def sample_ids(tokenizer, batch: int = 2) -> torch.LongTensor:
    """(batch, L): the first 24 characters of ``TINY_TEXT``, tokenized, in every row."""
    return torch.tensor([tokenizer(TINY_TEXT[:24])["input_ids"]] * batch)


def tiny_decoder(model_type: str, vocab_size: int, attn_implementation: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """:func:`build_tiny_model` for an attention decoder (``zoo_gpt``, ``zoo_modern``, ...), running
    ``attn_implementation`` ("eager" is the readable reference, "sdpa" the default)."""
    model = build_tiny_model(model_type, vocab_size, seed=seed, **overrides)
    model.config._attn_implementation = attn_implementation
    return model


# ----------------------------------------------------------------------------- padding


def left_padding_mask(batch_size: int, length: int, pads: list[int]) -> torch.Tensor:
    """(B, L) mask of 1/0 where row b starts with pads[b] padding tokens."""
    mask = torch.ones(batch_size, length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate derives them: count real tokens, padding at 0."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


# ----------------------------------------------------------------------------- single blocks


# The block tests' attention layer: 4 heads of 8 on a 32-wide residual stream.
HIDDEN, HEADS, HEAD_DIM = 32, 4, 8
ATOL = 1e-5


def llama_config(num_kv_heads: int = 2, **kwargs) -> LlamaConfig:
    """A LLaMA config of the blocks' dimensions, for the transformers reference modules."""
    defaults = dict(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=num_kv_heads,
        num_hidden_layers=2,
        intermediate_size=64,
        vocab_size=97,
        max_position_embeddings=128,
        attention_bias=False,
    )
    defaults.update(kwargs)
    return LlamaConfig(**defaults)


def prepare_inputs(
    query_length: int, mask_2d: torch.Tensor | None, cache: Cache | None, rope: RotaryEmbedding | None
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """What a model computes once per forward, before any layer updates the cache: mask and (cos, sin)."""
    past_length, key_length = mask_lengths(cache, query_length)
    mask = build_causal_mask(mask_2d, query_length, key_length, past_length)
    position_embeddings = None
    if rope is not None:
        if mask_2d is None:
            position_ids = torch.arange(past_length, past_length + query_length)[None]
        else:
            position_ids = positions_from_mask(mask_2d)[:, past_length : past_length + query_length]
        position_embeddings = rope(position_ids, torch.float32)
    return mask, position_embeddings


def run_attention(
    attention: ConfigurableAttention,
    x: torch.Tensor,
    mask_2d: torch.Tensor | None,
    cache: Cache | None,
    rope: RotaryEmbedding | None,
    attn_implementation: str,
) -> torch.Tensor:
    """One forward of a single attention layer on x (B, T, C); the output only (the layer also returns weights)."""
    mask, position_embeddings = prepare_inputs(x.shape[1], mask_2d, cache, rope)
    output, _ = attention(
        x,
        attention_mask=mask,
        position_embeddings=position_embeddings,
        past_key_values=cache,
        attn_implementation=attn_implementation,
    )
    return output


def attention_layer(
    hidden_size: int,
    num_attention_heads: int,
    num_key_value_heads: int | None = None,
    bias: bool = True,
    layer_idx: int = 0,
    fused_qkv: bool = False,
    qk_norm: bool = False,
) -> ConfigurableAttention:
    """One attention block with every lesson's choices as arguments: lesson 12's, the most general one
    (lessons 4, 5 and 10's blocks are its presets, proven equal in test_configurable.py)."""
    config = ConfigurableDecoderConfig(
        vocab_size=16, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, bias=bias, fused_qkv=fused_qkv, qk_norm=qk_norm,
        norm="rmsnorm", positions="rope", num_hidden_layers=max(1, layer_idx + 1),
    )
    return ConfigurableAttention(config, layer_idx)


# ----------------------------------------------------------------------------- stock checkpoints (random-weight twins)

# A chat template in the shape of Mixtral-Instruct's ([INST] ... [/INST]), written here: no {% generation %} markers,
# and none that trl knows how to add, so lesson 8 falls back to the zoo's template for it.
INST_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def stock_twin_config(model_type: str, vocab_size: int, **overrides):
    """A tiny config of transformers' own class for ``model_type``, with the features the loader must carry exactly:
    GQA everywhere; explicit head_dim (llama, mixtral); untied heads (llama, mixtral) and tied ones (gpt2, qwen2);
    attention and MLP biases (llama), Qwen2's q/k/v biases; a non-default rope_theta (qwen2, mixtral); and Llama 3's
    rotary scaling, with a pretraining context (256) that puts head_dim 16's frequencies in all three of its bands."""
    from transformers import GPT2Config, MixtralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    if model_type == "gpt2":
        config = dict(vocab_size=vocab_size, n_positions=1024, n_embd=32, n_layer=2, n_head=4, bos_token_id=vocab_size - 1,
                      eos_token_id=vocab_size - 1)
        return GPT2Config(**{**config, **overrides})
    if model_type == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256}
        return LlamaConfig(**{**common, "head_dim": 16, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False,
                              "rope_parameters": rope, **overrides})
    if model_type == "qwen2":
        return Qwen2Config(**{**common, "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                              **overrides})
    if model_type == "mixtral":
        return MixtralConfig(**{**common, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "tie_word_embeddings": False,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, **overrides})
    raise ValueError(f"no stock twin for {model_type!r}")


def stock_twin_tokenizer(model_type: str):
    """A real byte-level BPE ``tokenizer.json`` trained on ``TINY_TEXT``, with the family's kind of chat template:
    Qwen2.5's (which trl can mark for training), an [INST] template for Mixtral (which it cannot), none for GPT-2 and Llama."""
    from pathlib import Path

    import trl

    from hf_models.tokenization import ByteLevelBPE

    tokenizer = ByteLevelBPE.train([TINY_TEXT * 4], vocab_size=256 + 40 + 1, min_frequency=1).to_fast_tokenizer()
    if model_type == "qwen2":
        tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    elif model_type == "mixtral":
        tokenizer.chat_template = INST_CHAT_TEMPLATE
    return tokenizer


def save_stock_twin(model_type: str, folder, seed: int = 0, **overrides):
    """A random-weight stock checkpoint in the Hub layout (config.json, model.safetensors, tokenizer files); returns the
    transformers model. Every parameter is drawn at random, biases and norms included (transformers zeroes biases,
    which would hide a bias that is not carried)."""
    from transformers import AutoModelForCausalLM

    tokenizer = stock_twin_tokenizer(model_type)
    config = stock_twin_config(model_type, len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model
