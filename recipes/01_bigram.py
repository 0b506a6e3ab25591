# %% [markdown]
# # Lesson 1: the bigram language model, and why gradient descent finds the counting answer.
#
# Explained, with its measured numbers and how it scales to frontier models:
# [docs/lessons/01_bigram.md](../docs/lessons/01_bigram.md).
#
# A bigram model predicts the next character from the current one alone: it is a table of
# ``vocab x vocab`` logits. There are two ways to fill the table:
#
# 1. Count. ``P(b | a) = (count(a, b) + 1) / (count(a) + V)`` is the maximum-likelihood estimate with
#    add-one smoothing, computed in closed form from the training text.
# 2. Learn. Start from all-zero logits (the uniform distribution), and minimise the cross-entropy of
#    the next character with AdamW, exactly as every later lesson trains its model.
#
# Each row of the table is a free softmax, so the cross-entropy minimum is the empirical
# distribution: the learned table must land on the counted one. The recipe prints both validation
# losses side by side; they agree to within 0.02 nats. Everything after this lesson keeps this
# training loop and swaps in a more expressive function from ids to logits.
#
# Run:
#     python recipes/01_bigram.py                 # ~1-2 minutes on 2 CPU cores
#     accelerate launch recipes/01_bigram.py
#     accelerate launch --config_file recipes/configs/multi_cpu.yaml recipes/01_bigram.py   # 2 CPU processes, one DDP job over gloo
#     python recipes/01_bigram.py --help

# %%
from __future__ import annotations

from dataclasses import dataclass, field

from hf_models import BigramConfig, BigramForCausalLM
from hf_models.data import split_token_ids
from hf_models.recipe_support import evaluate_splits, finish_lesson, parse_lesson_args, prepare_lesson_data, train_and_evaluate


@dataclass
class BigramArguments:
    smoothing: float = field(default=1.0, metadata={"help": "Add-k smoothing of the counted bigram table."})

# %%
args, data_args, lesson_args, training_args = parse_lesson_args(
    BigramArguments,
    defaults=dict(
        output_dir="runs/01_bigram",
        model_name="bigram-shakespeare",
        block_size=256,
        max_steps=1000,
        per_device_train_batch_size=32,
        learning_rate=0.2,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        eval_steps=500,
        logging_steps=100,
    ),
)

# %% [markdown]
# ## 1. Data: the corpus, a character tokenizer built from the training text, packed blocks.

# %%
data = prepare_lesson_data(data_args, training_args, tokenizer_kind="char")

# %% [markdown]
# ## 2. The counting answer, in closed form: add-k smoothed pair counts of the training text.

# %%
config = BigramConfig(vocab_size=len(data.tokenizer), eos_token_id=data.tokenizer.eos_token_id)
train_ids = split_token_ids(data.corpus["train"], data.tokenizer)
counted_model = BigramForCausalLM.from_counts(train_ids, config, args.smoothing)

# %% [markdown]
# ## 3. The learning answer: a zero-initialised logits table trained with AdamW by Trainer.

# %%
model = BigramForCausalLM(config)
trainer, results = train_and_evaluate(model, data, training_args, data_args)

# %% [markdown]
# ## 4. The comparison the lesson is about, both measured on the whole validation split.

# %%
counted = evaluate_splits(
    counted_model, data.tokenizer, data.corpus, data.byte_lengths, data_args.block_size, data_args.max_eval_tokens, ("validation",)
)["validation"]["loss"]
learned = results["validation"]["loss"]
print(f"\nvalidation loss, counted (add-{args.smoothing:g} smoothing): {counted:.4f} nats")
print(f"validation loss, learned by gradient descent:          {learned:.4f} nats")
print(f"difference: {abs(learned - counted):.4f} nats")
results.update(counted_validation_loss=counted, learned_minus_counted=learned - counted)

# %% [markdown]
# ## 5. Save, write the model card, read a sample back through pipeline().

# %%
finish_lesson(
    model, data.tokenizer, training_args, lesson_args, data_args, results,
    card=dict(
        lesson="1 (bigram)",
        recipe="recipes/01_bigram.py",
        summary="A character-level bigram language model: a table of next-character logits, trained by gradient "
        "descent until it matches the add-one-smoothed counting solution.",
        tokenizer=data.tokenizer_description,
        extra={"closed-form add-one validation loss": f"{counted:.4f} nats", "learned minus counted": f"{learned - counted:+.4f} nats"},
        limitations="A bigram model sees one character of context: it learns spelling statistics, not words. "
        "Its samples look like Shakespeare's letter frequencies and nothing more.",
        tags=["bigram", "character-level"],
    ),
)
