# %% [markdown]
# # Lesson 5: the modern decoder. What changed between GPT-2 (2019) and LLaMA (2023).
#
# Explained, with its measured numbers and how it scales to frontier models:
# [docs/lessons/05_modern_gpt.md](../docs/lessons/05_modern_gpt.md).
#
# Same skeleton as lesson 4 (``hf_models/modeling_modern.py``, whole in one file), four blocks swapped:
#
# * RMSNorm instead of LayerNorm: rescale by the root mean square, no mean, no bias.
# * SwiGLU instead of the GELU MLP: ``down(silu(gate(x)) * up(x))``, a gate learned per feature.
# * Rotary position embeddings instead of a learned position table: q and k are rotated by an angle
#   proportional to their position, so the attention score of two tokens depends on their distance.
# * Grouped-query attention: pairs of query heads share one key/value head, halving the KV cache
#   that lesson 6 builds, at almost no cost in quality.
#
# Trained with the same data, token budget and optimizer as lesson 4's default run, it reaches a
# lower validation loss; the README's lesson table has both. The trained model is also exported as
# a plain ``LlamaForCausalLM`` folder (tests/test_conversion.py proves the two equal).
#
# Run:
#     python recipes/05_modern_gpt.py          # ~5 minutes on 2 CPU cores
#     accelerate launch recipes/05_modern_gpt.py
#     accelerate launch --config_file recipes/configs/multi_cpu.yaml recipes/05_modern_gpt.py   # 2 CPU processes, one DDP job over gloo
#     python recipes/05_modern_gpt.py --dataset text --data_files ../shared/datasets/tinyshakespeare/input.txt \
#         --num_hidden_layers 4 --num_attention_heads 4 --hidden_size 128 --block_size 64 \
#         --per_device_train_batch_size 12 --max_steps 2000 --learning_rate 1e-3   # nanoGPT's CPU set-up, as in lesson 4

# %%
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hf_models import ModernDecoderConfig, ModernDecoderForCausalLM
from hf_models.conversion import export_for_serving
from hf_models.recipe_support import (
    DECODER_TRAINING_DEFAULTS,
    DecoderArguments,
    finish_lesson,
    parse_lesson_args,
    prepare_lesson_data,
    train_and_evaluate,
)


@dataclass
class ModernArguments(DecoderArguments):
    num_key_value_heads: int = field(default=2, metadata={"help": "Key/value heads (= heads: MHA, 1: MQA)."})
    rope_theta: float = field(default=10000.0, metadata={"help": "Rotary base."})

# %%
args, data_args, lesson_args, training_args = parse_lesson_args(
    ModernArguments,
    defaults=dict(
        output_dir="runs/05_modern_gpt",
        model_name="modern-gpt-shakespeare",
        **DECODER_TRAINING_DEFAULTS,
    ),
)

# %% [markdown]
# ## 1. Data: the same corpus, tokenizer and sampling as lesson 4.

# %%
data = prepare_lesson_data(data_args, training_args, args.tokenizer, args.vocab_size, args.sampling,
                           sample_prompt=lesson_args.sample_prompt)  # the context is --block_size

# %% [markdown]
# ## 2. The model: token embedding -> RMSNorm / GQA+RoPE / SwiGLU blocks -> tied LM head.

# %%
config = ModernDecoderConfig(
    vocab_size=len(data.tokenizer),
    max_position_embeddings=data_args.block_size,
    hidden_size=args.hidden_size,
    num_hidden_layers=args.num_hidden_layers,
    num_attention_heads=args.num_attention_heads,
    num_key_value_heads=args.num_key_value_heads,
    rope_theta=args.rope_theta,
    dropout=args.dropout,
    eos_token_id=data.tokenizer.eos_token_id,
)
model = ModernDecoderForCausalLM(config)

# %% [markdown]
# ## 3. Train; evaluate whole held-out splits.

# %%
trainer, results = train_and_evaluate(model, data, training_args, data_args)

# %% [markdown]
# ## 4. Save with card and sample (generation runs through the hand-written KV cache); export to LLaMA.

# %%
folder, results = finish_lesson(
    model, data.tokenizer, training_args, lesson_args, data_args, results,
    card=dict(
        lesson="5 (modern decoder: RMSNorm, SwiGLU, RoPE, GQA)",
        recipe="recipes/05_modern_gpt.py",
        summary=f"A LLaMA-style decoder ({args.num_hidden_layers} layers, {args.num_attention_heads} query heads, "
        f"{args.num_key_value_heads} key/value heads, width {args.hidden_size}, context {data_args.block_size}) built "
        "from the zoo's hand-written blocks, generating through a hand-written KV cache.",
        tokenizer=data.tokenizer_description,
        training={"sampling": args.sampling},
        limitations="A few minutes of CPU training on a few MB of plays: Shakespeare-shaped text without meaning. "
        f"Trained at a context of {data_args.block_size} tokens; rotary positions extrapolate past it poorly.",
        tags=["llama", "rope", "swiglu", "rmsnorm", "gqa", "decoder"],
    ),
)
if args.export_for_serving and training_args.process_index == 0:
    export = export_for_serving(model, data.tokenizer, Path(folder).with_name(folder.name + "-llama"))
    print(f"exported as a plain LlamaForCausalLM folder (no remote code): {export}")
