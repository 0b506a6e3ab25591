# %% [markdown]
# # Lesson 4: the GPT decoder. Attention lets every position look at every earlier one.
#
# Explained, with its measured numbers and how it scales to frontier models:
# [docs/lessons/04_gpt.md](../docs/lessons/04_gpt.md).
#
# The GRU of lesson 3 carries the past in one vector, updated one step at a time, so training is a
# sequential loop and old information fades. A transformer decoder (Vaswani et al. 2017; GPT-2,
# Radford et al. 2019) keeps every position: each one computes a query, a key and a value, attends
# to the values of all earlier positions weighted by query-key similarity, and all positions are
# computed in parallel under a causal mask. The model stacks that with an MLP, LayerNorm and
# residual connections (``hf_models/modeling_gpt.py``, the whole model in one file).
#
# The zoo's GPT is proven equal to ``transformers.GPT2LMHeadModel`` (tests/test_conversion.py), and
# this recipe also exports what it trained as a plain GPT-2 folder that any GPT-2 server can load.
#
# Compare with nanoGPT's published CPU run (tiny-shakespeare, character level, 90/10 split):
#     python recipes/04_gpt.py --dataset text --data_files ../shared/datasets/tinyshakespeare/input.txt \
#         --num_hidden_layers 4 --num_attention_heads 4 --hidden_size 128 --block_size 64 \
#         --per_device_train_batch_size 12 --max_steps 2000 --learning_rate 1e-3 --warmup_steps 100
#     (``--dataset text`` picks the character tokenizer and nanoGPT's random-window sampling, no biases,
#     AdamW betas (0.9, 0.99), weight decay 0.1, cosine decay to 1e-4, exact GELU.)
#
# Run:
#     python recipes/04_gpt.py                 # ~5 minutes on 2 CPU cores
#     accelerate launch recipes/04_gpt.py
#     accelerate launch --config_file recipes/configs/multi_cpu.yaml recipes/04_gpt.py   # 2 CPU processes, one DDP job over gloo

# %%
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hf_models import GPTConfig, GPTForCausalLM
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
class GPTArguments(DecoderArguments):
    bias: bool = field(default=False, metadata={"help": "Biases in Linear and LayerNorm layers (GPT-2: True, nanoGPT: False)."})
    hidden_act: str = field(default="gelu", metadata={"help": "gelu (exact) or gelu_new (GPT-2's tanh approximation)."})

# %%
args, data_args, lesson_args, training_args = parse_lesson_args(
    GPTArguments,
    defaults=dict(
        output_dir="runs/04_gpt",
        model_name="gpt-shakespeare",
        **DECODER_TRAINING_DEFAULTS,
    ),
)

# %% [markdown]
# ## 1. Data: corpus, tokenizer (characters for --dataset text, else the lesson-2 BPE), training windows.

# %%
data = prepare_lesson_data(data_args, training_args, args.tokenizer, args.vocab_size, args.sampling,
                           sample_prompt=lesson_args.sample_prompt)  # the context is --block_size

# %% [markdown]
# ## 2. The model: token + learned position embeddings -> pre-LN attention/MLP blocks -> tied LM head.

# %%
config = GPTConfig(
    vocab_size=len(data.tokenizer),
    max_position_embeddings=data_args.block_size,
    hidden_size=args.hidden_size,
    num_hidden_layers=args.num_hidden_layers,
    num_attention_heads=args.num_attention_heads,
    bias=args.bias,
    hidden_act=args.hidden_act,
    dropout=args.dropout,
    eos_token_id=data.tokenizer.eos_token_id,
)
model = GPTForCausalLM(config)

# %% [markdown]
# ## 3. Train; evaluate whole held-out splits in non-overlapping windows of the context (nanoGPT's measure).

# %%
trainer, results = train_and_evaluate(model, data, training_args, data_args)

# %% [markdown]
# ## 4. Save with card and sample; export a plain GPT2LMHeadModel folder for serving.

# %%
folder, results = finish_lesson(
    model, data.tokenizer, training_args, lesson_args, data_args, results,
    card=dict(
        lesson="4 (GPT decoder)",
        recipe="recipes/04_gpt.py",
        summary=f"A GPT-2-style decoder ({args.num_hidden_layers} layers, {args.num_attention_heads} heads, width "
        f"{args.hidden_size}, context {data_args.block_size}) built from the zoo's hand-written blocks.",
        tokenizer=data.tokenizer_description,
        training={"sampling": args.sampling},
        limitations="A few minutes of CPU training on a few MB of plays: it writes Shakespeare-shaped text "
        f"with real words and speaker turns, but no meaning. Context is {data_args.block_size} tokens.",
        tags=["gpt", "gpt2", "decoder"],
    ),
)
if args.export_for_serving and training_args.process_index == 0:
    export = export_for_serving(model, data.tokenizer, Path(folder).with_name(folder.name + "-gpt2"))
    print(f"exported as a plain GPT2LMHeadModel folder (no remote code): {export}")
