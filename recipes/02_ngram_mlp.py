# %% [markdown]
# # Lesson 2: a byte-level BPE tokenizer written by hand, and the n-gram MLP of Bengio et al. (2003).
#
# Explained, with its measured numbers and how it scales to frontier models:
# [docs/lessons/02_ngram_mlp.md](../docs/lessons/02_ngram_mlp.md).
#
# Two ideas, both still at the bottom of every LLM:
#
# 1. Tokenization by byte-pair encoding (Sennrich et al. 2016, GPT-2's byte-level variant). Start
#    from the 256 bytes, count adjacent pairs, merge the most frequent pair into a new token, repeat.
#    Frequent words become single tokens, rare words fall back to pieces, and any UTF-8 text can be
#    encoded. The merge loop is ``hf_models.tokenization.bpe``; this recipe trains it on the training
#    split, then exports it as a ``tokenizers`` BPE model so ``AutoTokenizer`` loads it anywhere.
# 2. Distributed token representations. The model embeds each of the last ``n - 1`` tokens as a
#    learned vector, concatenates them and predicts the next token through one tanh layer. Unlike a
#    count table, what it learns about one token transfers to tokens with similar vectors.
#
# Bits per byte lets this model, with its 2048-token vocabulary, be compared with lesson 1's
# character model on the same held-out plays.
#
# Run:
#     python recipes/02_ngram_mlp.py                 # ~3 minutes on 2 CPU cores
#     accelerate launch recipes/02_ngram_mlp.py
#     accelerate launch --config_file recipes/configs/multi_cpu.yaml recipes/02_ngram_mlp.py   # 2 CPU processes, one DDP job over gloo

# %%
from __future__ import annotations

from dataclasses import dataclass, field

from hf_models import NGramMLPConfig, NGramMLPForCausalLM
from hf_models.recipe_support import finish_lesson, parse_lesson_args, prepare_lesson_data, train_and_evaluate


@dataclass
class NGramMLPArguments:
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size (256 bytes + merges + specials)."})
    context_size: int = field(default=6, metadata={"help": "Previous tokens the model sees (n - 1)."})
    embedding_dim: int = field(default=64, metadata={"help": "Size of each token vector."})
    hidden_size: int = field(default=256, metadata={"help": "Width of the tanh layer."})
    direct_connection: bool = field(default=False, metadata={"help": "Bengio's linear shortcut to the logits."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout on the hidden layer."})

# %%
args, data_args, lesson_args, training_args = parse_lesson_args(
    NGramMLPArguments,
    defaults=dict(
        output_dir="runs/02_ngram_mlp",
        model_name="ngram-mlp-shakespeare",
        block_size=128,
        max_steps=800,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=50,
        weight_decay=0.01,
        eval_steps=200,
        logging_steps=50,
    ),
)

# %% [markdown]
# ## 1. Data, and the hand-written BPE trained on the training split only (timed: it is half the lesson).

# %%
data = prepare_lesson_data(data_args, training_args, "bpe", args.vocab_size, retrain_tokenizer=True)
print(f"hand-written BPE: {len(data.tokenizer)} tokens trained in {data.tokenizer_seconds:.1f} s")

# %% [markdown]
# ## 2. The model: embed the last n-1 tokens, concatenate, one tanh layer, logits.

# %%
config = NGramMLPConfig(
    vocab_size=len(data.tokenizer),
    context_size=args.context_size,
    embedding_dim=args.embedding_dim,
    hidden_size=args.hidden_size,
    direct_connection=args.direct_connection,
    dropout=args.dropout,
    eos_token_id=data.tokenizer.eos_token_id,
)
model = NGramMLPForCausalLM(config)

# %% [markdown]
# ## 3. Train with Trainer, evaluate whole held-out splits, save, sample.

# %%
trainer, results = train_and_evaluate(model, data, training_args, data_args)
results.update(bpe_training_seconds=data.tokenizer_seconds)
finish_lesson(
    model, data.tokenizer, training_args, lesson_args, data_args, results,
    card=dict(
        lesson="2 (BPE tokenizer + n-gram MLP)",
        recipe="recipes/02_ngram_mlp.py",
        summary=f"An n-gram MLP language model (Bengio et al. 2003) over a hand-trained byte-level BPE "
        f"vocabulary of {len(data.tokenizer)} tokens: it sees the previous {args.context_size} tokens.",
        tokenizer=f"{data.tokenizer_description}, trained in {data.tokenizer_seconds:.0f} s",
        limitations=f"The model sees exactly {args.context_size} previous tokens and nothing before them, so it "
        "cannot keep a speaker, a sentence or a rhyme going for longer than that.",
        tags=["ngram", "mlp", "bpe"],
    ),
)
