# %% [markdown]
# # Lesson 11: Direct Preference Optimization, written by hand on lesson 7's loop, next to trl's ``DPOTrainer``.
#
# Explained, with its measured numbers and how it scales to frontier models:
# [docs/lessons/11_dpo.md](../docs/lessons/11_dpo.md).
#
# Lesson 8's SFT model learned to answer a speaker's line with a next line. Preference data says
# which of two answers is better: the true next line (chosen) or a line from another play (rejected).
# DPO (Rafailov et al. 2023, ``hf_models/alignment/dpo.py``) turns those pairs into a classification
# loss on the policy's log-probability ratios against the frozen SFT model, with no reward model
# and no sampling. The recipe, top to bottom:
#
# 1. **Data.** The preference pairs (trl's conversational prompt / chosen / rejected format, split by
#    play into train / test), tokenized with the SFT model's chat template exactly as trl does.
# 2. **Models.** Lesson 8's merged SFT model is both the starting policy and the frozen reference. (Or a
#    stock checkpoint, a folder or a Hub id, loaded into the zoo's own class; lesson 8 run on a stock
#    base first gives DPO the SFT model it expects.)
# 3. **Train twice, same data and budget.** With trl's ``DPOTrainer`` (no ``ref_model``: trl rebuilds
#    the reference from ``config._name_or_path``, the folder the policy was loaded from) and with the
#    hand-written ``DPOTrainingLoop``. Held-out reward accuracy and margins are logged during
#    training (``dpo_curves.png``, both methods on one figure); tokens/s side by side.
# 4. **Evaluate.** Before and after, for both: held-out preference accuracy (implicit reward of the
#    chosen completion > rejected), reward margins, the policy's own likelihood preference, and bits
#    per byte on held-out text (DPO must not wreck the language model).
# 5. **Save** the hand-trained DPO model with its card and ``results.json``, read back through pipeline.
#
# Run:
#     python recipes/08_lora_sft.py          # first: the SFT model this lesson starts from
#     python recipes/11_dpo.py               # a few minutes on 2 CPU cores
#     python recipes/11_dpo.py --sft_model path/to/sft --beta 0.1 --label_smoothing 0.1
#     python recipes/08_lora_sft.py --base_model HuggingFaceTB/SmolLM2-135M --output_dir runs/08_smollm2
#     python recipes/11_dpo.py --sft_model runs/08_smollm2    # DPO from a stock base, through lesson 8's SFT

# %%
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import torch
from transformers import AutoModelForCausalLM, TrainingArguments, set_seed
from trl import DPOConfig, DPOTrainer

from hf_models.alignment import DPOTrainingLoop, check_dpo_settings, evaluate_preferences, pair_token_count, tokenize_preference_pair
from hf_models.benchmarking import ThroughputCallback, describe_machine, time_interleaved, use_passive_omp_wait
from hf_models.data import add_chat_template, load_corpus, load_preference_data
from hf_models.evaluation import evaluate_splits
from hf_models.recipe_support import finish_lesson, global_batch_size, parse_lesson_args, resolve_training_model_source, show
from hf_models.tokenization import load_tokenizer_for, token_byte_lengths

SFT_RECIPE = "recipes/08_lora_sft.py"
CURVES = ("rewards/accuracies", "rewards/margins")


@dataclass
class DPOArguments:
    sft_model: str = field(default="runs/08_lora_sft", metadata={"help": (
        f"Lesson 8's SFT model folder (or the run folder holding it; {SFT_RECIPE} writes it), or a stock "
        f"gpt2/llama/qwen2/mixtral checkpoint, a folder or a Hub id (loaded into the zoo's own class).")})
    preference_data: str | None = field(default=None, metadata={"help": "Preference pairs: a name or folder for load_preference_data (default: lesson 8's Shakespeare pairs)."})
    beta: float = field(default=0.1, metadata={"help": "DPO temperature: how far the policy may move from the reference."})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO: probability that a preference label is flipped, in [0, 0.5)."})
    max_length: int = field(default=128, metadata={"help": "Longest prompt + completion in tokens (cut at the end, trl's keep_start)."})
    max_train_pairs: int | None = field(default=None, metadata={"help": "Use only the first N training pairs (default: max_steps x batch, one pass)."})
    max_eval_pairs: int = field(default=512, metadata={"help": "Held-out pairs for the before/after table."})
    curve_eval_pairs: int = field(default=128, metadata={"help": "Held-out pairs for the curves logged during training."})
    timing_rounds: int = field(default=10, metadata={"help": "Interleaved rounds of one training step each, trl vs hand loop."})


def step_timings(trainer: DPOTrainer, loop: DPOTrainingLoop, batch: dict[str, torch.Tensor], rounds: int) -> dict:
    """One optimizer step of each trainer on the same batch, timed in interleaved rounds (fresh copies of the trained models).

    The runs' own tokens/s are measured minutes apart on a machine shared with other jobs; alternating the two steps
    puts both under the same load, so their ratio is the fair comparison.
    """
    contenders = {}
    for name, model, loss in (
        ("trl DPOTrainer", trainer.model, lambda m, b: trainer.compute_loss(m, b)),
        ("hand loop", loop.accelerator.unwrap_model(loop.model), lambda m, b: loop.compute_loss(b, loop.count_items(b))),
    ):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: timed steps leave the trained weights as they are

        def step(model=model, loss=loss, optimizer=optimizer) -> None:
            loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        contenders[name] = step
    timings = time_interleaved(contenders, rounds=rounds, warmup=2)
    tokens = int(batch["attention_mask"].sum())
    for model in (trainer.model, loop.model):
        model.eval()
    return dict(tokens_per_second={name: tokens / seconds for name, seconds in timings.median_seconds.items()},
                hand_over_trl=dataclasses.asdict(timings.speedup("hand loop", "trl DPOTrainer")), timings=timings.to_dict())

# %%
use_passive_omp_wait()  # on a shared machine, OpenMP threads that spin penalise the model with more small ops
args, data_args, lesson_args, training_args = parse_lesson_args(
    DPOArguments,
    defaults=dict(
        output_dir="runs/11_dpo", model_name="dpo-shakespeare",
        max_steps=300, per_device_train_batch_size=8, learning_rate=1e-4, warmup_steps=10,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs='{"min_lr": 1e-5}', weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=10, eval_steps=50, per_device_eval_batch_size=16,
        sample_prompt="", sample_tokens=40, max_eval_tokens=20_000,  # sample prompt "": the first held-out prompt, chat-rendered
    ),
)
check_dpo_settings(args.beta, args.label_smoothing)
output_dir = Path(training_args.output_dir)
sft = resolve_training_model_source(args.sft_model, "--sft_model", SFT_RECIPE, training_args)  # a stock one converted once
sft_folder = sft.folder

# %% [markdown]
# ## 1. Data: preference pairs, rendered by the SFT model's chat template and tokenized as trl does.

# %%
tokenizer = load_tokenizer_for(sft_folder)  # refused if it is not the SFT model's tokenizer
if tokenizer.chat_template is None:
    add_chat_template(tokenizer)  # a pretrained-only model (e.g. lesson 5's) gets the zoo's template
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
pairs = load_preference_data(args.preference_data)  # refuses a dataset without prompt / chosen / rejected, by name
global_batch = global_batch_size(training_args)
n_train = min(len(pairs["train"]), args.max_train_pairs or training_args.max_steps * global_batch)
held_out = "test" if "test" in pairs else "validation"
raw = {"train": pairs["train"].shuffle(seed=training_args.seed).select(range(n_train)),
       "test": pairs[held_out].shuffle(seed=training_args.seed).select(range(min(args.max_eval_pairs, len(pairs[held_out]))))}
raw["curve"] = raw["test"].select(range(min(args.curve_eval_pairs, len(raw["test"]))))
if not lesson_args.sample_prompt:  # the saved model answers a held-out line the way it was trained to
    prompt = raw["test"][0]["prompt"]
    lesson_args.sample_prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) if isinstance(prompt, list) else prompt

def tokenized(split):
    ids = split.map(tokenize_preference_pair, fn_kwargs={"tokenizer": tokenizer}, remove_columns=split.column_names)
    return ids.filter(lambda pair: len(pair["prompt_ids"]) < args.max_length)  # trl drops prompts that fill max_length

tokens = {name: tokenized(split) for name, split in raw.items()}
mean_pair_tokens = sum(pair_token_count(p) for p in tokens["train"]) / len(tokens["train"])
print(f"{len(tokens['train'])} training pairs, {len(tokens['test'])} held-out pairs ({held_out} plays), "
      f"{mean_pair_tokens:.0f} tokens per pair (prompt twice, chosen, rejected)")

# %% [markdown]
# ## 2. Models: the SFT model is the starting policy and the frozen reference.

# %%
def load_sft() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(sft_folder)

reference = load_sft().eval().requires_grad_(False)
# One settings object drives both trainers. trl 1.16's sigmoid loss ignores label_smoothing (only its robust, exo and
# aot losses read it), so with --label_smoothing > 0 its run is plain DPO while the hand loop runs cDPO.
config = DPOConfig(
    **{f.name: getattr(training_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init},
    beta=args.beta, label_smoothing=args.label_smoothing, loss_type=["sigmoid"], max_length=args.max_length,
)
results: dict = {"machine": describe_machine().to_dict(), "sft_model": str(sft_folder), "start": sft.description,
                 "settings": dict(beta=args.beta, label_smoothing=args.label_smoothing, steps=training_args.max_steps,
                                  pairs_per_step=global_batch, training_pairs=len(tokens["train"]))}

def preference_table(policy: torch.nn.Module) -> dict[str, float]:
    return evaluate_preferences(policy, reference, tokens["test"], tokenizer.pad_token_id, args.beta, args.label_smoothing,
                                training_args.per_device_eval_batch_size, args.max_length)

corpus = load_corpus(data_args.dataset) if data_args.dataset == "shakespeare" else None
byte_lengths = token_byte_lengths(tokenizer)

def bits_per_byte(model: torch.nn.Module) -> dict:
    if corpus is None:
        return {}
    return evaluate_splits(model, tokenizer, corpus, byte_lengths, model.config.max_position_embeddings,
                           data_args.max_eval_tokens, splits=("test",))

results["before"] = {**preference_table(reference), "held_out_text": bits_per_byte(reference)}

# 3a. trl's DPOTrainer. No ref_model: trl loads the reference from policy.config._name_or_path (the SFT folder).
set_seed(training_args.seed)
throughput = ThroughputCallback(int(global_batch * mean_pair_tokens))
trainer = DPOTrainer(
    model=load_sft(), args=dataclasses.replace(config, output_dir=str(output_dir / "trl")), train_dataset=raw["train"],
    eval_dataset=raw["curve"], processing_class=tokenizer, callbacks=[throughput],
)
trainer_ids = trainer.train_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
if trainer_ids.to_list() != tokens["train"].to_list():
    raise RuntimeError("trl tokenized the training pairs differently from hf_models.alignment: the comparison would not be fair.")
trainer.train()
trl_policy = trainer.model.eval()
trl_curves = [log for log in trainer.state.log_history if "eval_rewards/accuracies" in log]

# 3b. The hand-written loop: lesson 7's TrainingLoop with the DPO objective, same settings object.
set_seed(training_args.seed)
loop = DPOTrainingLoop(
    load_sft(), load_sft(), tokens["train"], dataclasses.replace(config, output_dir=str(output_dir / "hand")), tokenizer.pad_token_id,
    eval_dataset=tokens["curve"], beta=args.beta, label_smoothing=args.label_smoothing, max_length=args.max_length,
    eval_batch_size=training_args.per_device_eval_batch_size,
)
hand = loop.train()
hand_policy = loop.accelerator.unwrap_model(loop.model).eval()
hand_curves = [log for log in hand.history if "eval_rewards/accuracies" in log]

# %% [markdown]
# ## 4. Evaluate: the before/after table, for both.

# %%
for name, policy in (("trl", trl_policy), ("hand", hand_policy)):
    results[f"after_{name}"] = {**preference_table(policy), "held_out_text": bits_per_byte(policy)}
results["tokens_per_second"] = {"trl": throughput.tokens_per_second, "hand": hand.tokens_per_second,
                                "hand_over_trl": hand.tokens_per_second / throughput.tokens_per_second}
batch = loop.batches.collate([tokens["train"][i] for i in range(training_args.per_device_train_batch_size)])
results["interleaved_step"] = step_timings(trainer, loop, batch, args.timing_rounds)
results["train_tokens_per_second"] = hand.tokens_per_second
results["curves"] = {"trl": [{k: log[k] for k in ("step", "eval_rewards/accuracies", "eval_rewards/margins")} for log in trl_curves],
                     "hand": [{k: log[k] for k in ("step", "eval_rewards/accuracies", "eval_rewards/margins")} for log in hand_curves]}
# Both draw the pairs in the same seeded order (lesson 7's loop matches Trainer's sampler), so the curves should agree.
margins = {name: {log["step"]: log["eval_rewards/margins"] for log in curve} for name, curve in results["curves"].items()}
common = sorted(set(margins["trl"]) & set(margins["hand"]))
results["curves_max_margin_difference"] = max((abs(margins["trl"][s] - margins["hand"][s]) for s in common), default=float("nan"))

figure, axes = plt.subplots(1, 2, figsize=(10, 4))
for axis, key in zip(axes, CURVES):
    for label, curve, style in (("trl DPOTrainer", trl_curves, dict(marker="o", linewidth=3, alpha=0.5)),
                                ("hand-written loop", hand_curves, dict(marker="x", linestyle="--", color="black"))):
        # Step 0: the policy is its reference, every reward is 0 (and ties count as wrong).
        axis.plot([0] + [log["step"] for log in curve], [0.0] + [log[f"eval_{key}"] for log in curve], label=label, **style)
    axis.set_xlabel("optimizer step")
    axis.set_title(f"held-out {key.split('/')[1]} ({len(tokens['curve'])} pairs)")
    axis.legend()
figure.tight_layout()
output_dir.mkdir(parents=True, exist_ok=True)
figure.savefig(output_dir / "dpo_curves.png", dpi=120)
results["plot"] = str(show(output_dir / "dpo_curves.png"))

rows = [(f"start: {sft.description} (before)", results["before"]), ("DPO, trl DPOTrainer", results["after_trl"]), ("DPO, hand loop", results["after_hand"])]
table = ["| model | reward accuracy | reward margin | likelihood accuracy | test bits per byte |", "|---|---|---|---|---|"]
for label, row in rows:
    bpb = row["held_out_text"].get("test", {}).get("bits_per_byte", float("nan"))
    table.append(f"| {label} | {row['rewards/accuracies']:.3f} | {row['rewards/margins']:.3f} | {row['likelihood_accuracy']:.3f} | {bpb:.4f} |")
table = "\n".join(table)
print(f"\nheld-out preference pairs ({len(tokens['test'])}):\n{table}")
step = results["interleaved_step"]
print(f"tokens/s over the runs: trl {throughput.tokens_per_second:,.0f}, hand loop {hand.tokens_per_second:,.0f}; "
      f"one step each in interleaved rounds: trl {step['tokens_per_second']['trl DPOTrainer']:,.0f}, hand loop "
      f"{step['tokens_per_second']['hand loop']:,.0f}, hand / trl = {step['hand_over_trl']['median']:.2f} "
      f"({step['hand_over_trl']['q1']:.2f}-{step['hand_over_trl']['q3']:.2f})")
print(f"held-out margin curves, trl vs hand loop: largest difference {results['curves_max_margin_difference']:.1e} "
      f"over {len(common)} evaluations; plot: {results['plot']}")
results["table"] = table

# %% [markdown]
# ## 5. Save the hand-trained DPO model with its card; results.json next to it.

# %%
if "test" in results["after_hand"]["held_out_text"]:
    results["test"] = results["after_hand"]["held_out_text"]["test"]
else:  # a non-Shakespeare preference set: report the held-out DPO loss in the card's place
    results["test"] = {"loss": results["after_hand"]["loss"], "perplexity": float("nan"), "bits_per_byte": float("nan"), "tokens": 0}
before, after = results["before"], results["after_hand"]
card = dict(
    summary=(f"The {sft.description} (`{sft_folder}`) aligned with DPO (beta {args.beta}) on Shakespeare preference pairs (the true next "
             f"line preferred over a line from another play), with the hand-written DPO loop of `hf_models.alignment`. "
             f"On held-out plays its implicit reward (beta * log pi / pi_SFT) ranks the chosen line first on "
             f"{after['rewards/accuracies']:.3f} of the pairs (mean margin {after['rewards/margins']:.3f}); the SFT model's "
             f"own likelihood ranked it first on {before['likelihood_accuracy']:.3f}, this model's on "
             f"{after['likelihood_accuracy']:.3f}. (Reward accuracy is 0 for the SFT model by construction: it is its own "
             f"reference, so every reward is 0 and ties count as wrong.)\n\n{table}"),
    lesson="11 (alignment: DPO)",
    tags=["dpo", "trl", "alignment"],
    recipe="recipes/11_dpo.py",
    tokenizer=f"the start model's, with its chat template ({len(tokenizer)} tokens)",
    limitations=("A few-million-parameter model on one small corpus: the preference it learns is 'a plausible next line "
                 "of this play', not helpfulness or safety. Implicit rewards are relative to the SFT reference."),
    training=dict(method="DPO, sigmoid loss" + (f", cDPO label smoothing {args.label_smoothing}" if args.label_smoothing else ""),
                  steps=training_args.max_steps, pairs_per_step=global_batch, learning_rate=training_args.learning_rate,
                  reference=str(sft_folder)),
)
finish_lesson(hand_policy, tokenizer, training_args, lesson_args, data_args, results, card)
(output_dir / "curves.json").write_text(json.dumps(results["curves"], indent=1))
