# %% [markdown]
# # Lesson 3: a GRU language model: a state that carries the whole past.
#
# Explained, with its measured numbers and how it scales to frontier models:
# [docs/lessons/03_gru.md](../docs/lessons/03_gru.md).
#
# The n-gram MLP of lesson 2 forgets everything older than its window. A recurrent network reads the
# text one token at a time and folds everything it has read into a state vector ``h``; a GRU (Cho et
# al. 2014) uses two learned gates to decide, at every step, how much of ``h`` to keep and how much
# to overwrite. Its context is unbounded in principle, and each new token costs one step, whatever
# the length of the past: generation carries the state forward instead of re-reading the prefix.
#
# The GRU cells are written by hand from ``nn.Linear`` layers (``hf_models/modeling_gru.py``), in
# ``torch.nn.GRU``'s weight layout, so ``--gru_implementation`` switches the same weights between the
# readable loop (``eager``, which ``peft`` can adapt) and the fused ``torch.gru`` kernel (``torch``).
# The tests prove the two equal ``torch.nn.GRU`` to 1e-5.
#
# Run:
#     python recipes/03_gru.py                 # ~5 minutes on 2 CPU cores
#     accelerate launch recipes/03_gru.py
#     accelerate launch --config_file recipes/configs/multi_cpu.yaml recipes/03_gru.py   # 2 CPU processes, one DDP job over gloo

# %%
from __future__ import annotations

from dataclasses import dataclass, field

from hf_models import GRULMConfig, GRULMForCausalLM
from hf_models.recipe_support import finish_lesson, parse_lesson_args, prepare_lesson_data, train_and_evaluate


@dataclass
class GRUArguments:
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size (reuses lesson 2's tokenizer if cached)."})
    hidden_size: int = field(default=256, metadata={"help": "Width of the embeddings and GRU states."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Stacked GRU layers."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout between layers."})
    gru_implementation: str = field(default="torch", metadata={"help": "eager (hand-written loop) or torch (fused kernel)."})

# %%
args, data_args, lesson_args, training_args = parse_lesson_args(
    GRUArguments,
    defaults=dict(
        output_dir="runs/03_gru",
        model_name="gru-shakespeare",
        block_size=64,
        max_steps=600,
        per_device_train_batch_size=32,
        learning_rate=4e-3,
        lr_scheduler_type="cosine",
        warmup_steps=30,
        weight_decay=0.01,
        max_grad_norm=1.0,
        eval_steps=200,
        logging_steps=50,
    ),
)

# %% [markdown]
# ## 1. Data: the same hand-trained BPE as lesson 2 (reused from the cache when it was trained already).

# %%
data = prepare_lesson_data(data_args, training_args, "bpe", args.vocab_size)

# %% [markdown]
# ## 2. The model: embedding -> stacked GRU layers -> tied output projection.

# %%
config = GRULMConfig(
    vocab_size=len(data.tokenizer),
    hidden_size=args.hidden_size,
    num_hidden_layers=args.num_hidden_layers,
    dropout=args.dropout,
    gru_implementation=args.gru_implementation,
    eos_token_id=data.tokenizer.eos_token_id,
)
model = GRULMForCausalLM(config)

# %% [markdown]
# ## 3. Train, evaluate whole held-out splits, save, sample (generation carries the state forward).

# %%
trainer, results = train_and_evaluate(model, data, training_args, data_args)
finish_lesson(
    model, data.tokenizer, training_args, lesson_args, data_args, results,
    card=dict(
        lesson="3 (GRU)",
        recipe="recipes/03_gru.py",
        summary=f"A {args.num_hidden_layers}-layer GRU language model (width {args.hidden_size}) with hand-written "
        f"GRU cells, over a hand-trained byte-level BPE vocabulary of {len(data.tokenizer)} tokens.",
        tokenizer=data.tokenizer_description,
        training={"GRU kernel": args.gru_implementation, "backpropagation through time": f"truncated at {data_args.block_size} tokens"},
        limitations="Trained for a few minutes on a CPU with truncated backpropagation through "
        f"{data_args.block_size} tokens: it learns local syntax and the shape of a play, not meaning. Evaluation "
        f"restarts the state every {data_args.block_size} tokens, like the other lessons.",
        tags=["gru", "rnn", "bpe"],
    ),
)
