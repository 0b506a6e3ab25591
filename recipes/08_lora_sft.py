# %% [markdown]
# # Lesson 8: supervised fine-tuning with LoRA, written by hand on lesson 7's loop, next to trl + peft.
#
# Explained, with its measured numbers and how it scales to frontier models:
# [docs/lessons/08_lora_sft.md](../docs/lessons/08_lora_sft.md).
#
# Lesson 5's model writes Shakespeare-shaped text; it has never been asked a question. Here it
# learns a task from instructions: given a play, the previous line and the next speaker, answer
# with that speaker's line, and stop (``hf_models/data/instructions.py``). Instead of updating its
# 2M weights, we freeze them and train low-rank adapters beside them (LoRA, ``hf_models/adapters``).
# The recipe, top to bottom:
#
# 1. **Data.** The next-line task in trl's conversational format, split by play, through the base's
#    chat template (the zoo's where it has none); answers alone carry the loss (``{% generation %}``).
# 2. **The base.** Lesson 5's saved model by default, or a stock checkpoint (GPT-2, Llama, Qwen2,
#    Mixtral: a folder or a Hub id) loaded into the zoo's own class; scored on the held-out plays
#    before any fine-tuning.
# 3. **Fine-tune twice, same data, budget and settings.** trl's ``SFTTrainer`` with peft's LoRA, and
#    the hand-written LoRA on lesson 7's ``TrainingLoop``. Both adapt every linear layer of the
#    decoder (per projection: this decoder has separate q/k/v; lesson 4's GPT fuses them into one
#    ``qkv_proj``, which LoRA would adapt as one matrix) and leave the tied embedding / LM head alone.
#    On a mixture-of-experts base (a Mixtral checkpoint, lesson 10's model) the experts are not
#    linear layers but 3-D weights (E, out, in); both LoRAs reach them through ``target_parameters``,
#    one rank-r pair per expert, added to the weight (``W + BA``). There is then no adapter input to
#    drop, so peft refuses ``lora_dropout != 0``: on an MoE base the dropout is 0 (printed), and an
#    explicit ``--lora_dropout`` above 0 is refused before anything runs. (peft's config has one
#    dropout for the whole adapter, so the attention layers get 0 too.)
# 4. **Evaluate.** Held-out response loss, the task score of greedy answers (format, exact, near, and
#    the task score: near where the format holds, else 0),
#    trainable parameter share, and tokens/s, for base, hand LoRA and peft LoRA.
# 5. **Save.** The hand adapter merged into the base (a plain zoo model: ``from_pretrained``,
#    ``pipeline``, lesson 11's start), with its card; the adapters alone: the hand format, the same
#    adapter converted to peft's format, and trl's peft adapter.
#
# Run:
#     python recipes/05_modern_gpt.py       # first: the base this lesson starts from
#     python recipes/08_lora_sft.py         # a few minutes on 2 CPU cores
#     python recipes/08_lora_sft.py --base_model path/to/zoo/model --dataset my/trl-dataset
#     python recipes/08_lora_sft.py --base_model HuggingFaceTB/SmolLM2-135M   # a stock base (needs the Hub)

# %%
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import ParamWrapper
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainingArguments, set_seed
from trl import SFTConfig, SFTTrainer

from hf_models.adapters import (
    LoRAConfig,
    LoRAExpertWeights,
    apply_lora,
    lora_layers,
    lora_to_peft,
    merge_lora,
    save_lora,
    trainable_parameters,
)
from hf_models.benchmarking import ThroughputCallback, describe_machine, use_passive_omp_wait
from hf_models.data import load_instruction_data, score_next_lines, use_training_chat_template
from hf_models.evaluation import evaluate_splits, generate_answers, response_loss, tokenize_conversation
from hf_models.recipe_support import (
    choose_bf16,
    finish_lesson,
    global_batch_size,
    load_lesson_corpus,
    parse_lesson_args,
    resolve_training_model_source,
    source_expert_weights,
)
from hf_models.tokenization import load_tokenizer_for, token_byte_lengths
from hf_models.training.loop import TrainingLoop

BASE_RECIPE = "recipes/05_modern_gpt.py"
DENSE_LORA_DROPOUT = 0.05


def choose_lora_dropout(given: float | None, experts: list[str], base_model: str) -> float:
    """The adapters' dropout: ``given``, else 0.05; 0 on a base with expert weights, where an explicit value above 0 is
    refused. Their LoRA is ``W + BA`` on the weight (``target_parameters``), so no input of the adapter alone exists to
    drop, and peft's ``ParamWrapper`` raises on ``lora_dropout != 0``: better named here, before anything runs."""
    if not experts:
        return DENSE_LORA_DROPOUT if given is None else given
    if given:
        raise ValueError(
            f"--lora_dropout {given} cannot be used with --base_model {base_model!r}: it is a mixture of experts, whose "
            f"expert weights ({', '.join(sorted({name.rsplit('.', 2)[-2] + '.' + name.rsplit('.', 1)[-1] for name in experts}))}) "
            "LoRA adapts through target_parameters, adding B @ A to each expert's weight, so there is no adapter input "
            "to drop (peft's ParamWrapper refuses lora_dropout != 0). Allowed on an MoE base: --lora_dropout 0, or no "
            "--lora_dropout (then 0).")
    return 0.0


@dataclass
class LoRAArguments:
    base_model: str = field(default="runs/05_modern_gpt/modern-gpt-shakespeare", metadata={"help": (
        f"The pretrained base: a zoo model folder ({BASE_RECIPE} writes one), or a stock gpt2/llama/qwen2/mixtral "
        f"checkpoint, a folder or a Hub id (loaded into the zoo's own class).")})
    instruction_data: str | None = field(default=None, metadata={"help": "A trl-format dataset id, folder or file (default: the plays' next-line task)."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha: updates are scaled by alpha / r."})
    lora_dropout: float | None = field(default=None, metadata={"help": (
        f"Dropout on the adapters' input; default {DENSE_LORA_DROPOUT} on a dense base, 0 on an MoE base (its experts' "
        "adapters are added to the weight, where dropout cannot apply; above 0 is refused there).")})
    max_length: int = field(default=128, metadata={"help": "Longest conversation in tokens (the base's context)."})
    eval_rows: int = field(default=300, metadata={"help": "Held-out conversations for the response loss and the task score."})
    max_new_tokens: int = field(default=40, metadata={"help": "Longest generated answer."})

# %%
use_passive_omp_wait()
args, data_args, lesson_args, training_args = parse_lesson_args(
    LoRAArguments,
    defaults=dict(
        output_dir="runs/08_lora_sft", model_name="lora-sft-shakespeare",
        max_steps=300, per_device_train_batch_size=16, learning_rate=3e-3, warmup_steps=20,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs='{"min_lr": 3e-4}', weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=25,  # precision: choose_bf16, the same for both runs
        sample_prompt="", sample_tokens=40, max_eval_tokens=20_000,
    ),
)
output_dir = Path(training_args.output_dir)
machine = describe_machine()
precision = choose_bf16(training_args, machine)  # trl's default is bf16; here only where measured faster, or --bf16
experts = source_expert_weights(args.base_model, "--base_model", BASE_RECIPE)  # from the config alone, before converting
lora_dropout = choose_lora_dropout(args.lora_dropout, experts or [], args.base_model)  # refused here if it cannot work
base = resolve_training_model_source(args.base_model, "--base_model", BASE_RECIPE, training_args)  # a stock one converted once
base_folder = base.folder
if experts is None:  # a Hub id whose config could not be read before: the converted folder has it now
    experts = source_expert_weights(str(base_folder), "--base_model", BASE_RECIPE)
    lora_dropout = choose_lora_dropout(args.lora_dropout, experts, args.base_model)
# The experts' 3-D weights by dotted suffix ("experts.gate_up_proj"), for peft's and the hand LoRA's target_parameters.
expert_targets = sorted({".".join(name.split(".")[-2:]) for name in experts})
if expert_targets:
    print(f"MoE base: LoRA also adapts every expert ({', '.join(expert_targets)}: one rank-{args.lora_rank} pair per expert, "
          f"through target_parameters), with lora_dropout {lora_dropout:g}: dropout cannot apply to an update added to the weight")

# %% [markdown]
# ## 1. Data: conversations through the chat template; the answers carry the loss.

# %%
tokenizer = load_tokenizer_for(base_folder)  # refused if it is not the base's tokenizer
chat_template = use_training_chat_template(tokenizer)  # the base's own where it can mark the answers, else the zoo's
print(f"base: {base.description}; chat template: {chat_template}")
tokenizer.padding_side = "right"  # training batches pad after the answer; the saved copy pads left, for generation
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
data = load_instruction_data(args.instruction_data)  # refuses a dataset without messages / prompt+completion, by name
if "messages" not in data["train"].column_names:
    raise ValueError("lesson 8's recipe trains on conversational rows (a 'messages' column); this dataset has prompt/completion.")
steps, batch = training_args.max_steps, global_batch_size(training_args)  # conversations per step, over every process
train = data["train"].shuffle(seed=training_args.seed).select(range(min(len(data["train"]), steps * batch)))
test = data["test"].shuffle(seed=training_args.seed).select(range(min(len(data["test"]), args.eval_rows)))
tokenize = dict(fn_kwargs={"tokenizer": tokenizer, "max_length": args.max_length})
train_ids = train.map(tokenize_conversation, remove_columns=train.column_names, **tokenize)
test_rows = test.map(tokenize_conversation, remove_columns=test.column_names, **tokenize).to_list()
prompts, references = [m[:-1] for m in test["messages"]], [m[-1]["content"] for m in test["messages"]]
mean_tokens = sum(len(r) for r in train_ids["input_ids"]) / len(train_ids)
print(f"{len(train)} training conversations ({mean_tokens:.0f} tokens on average), {len(test)} held-out ones")
if not lesson_args.sample_prompt:
    lesson_args.sample_prompt = tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, tokenize=False)

corpus = load_lesson_corpus(data_args)
held_out = "test" if "test" in corpus else "validation"  # bits per byte on held-out text: did SFT hurt the LM?
byte_lengths = token_byte_lengths(tokenizer)

def evaluate(model: torch.nn.Module) -> dict:
    answers = generate_answers(model, tokenizer, prompts, args.max_new_tokens)
    return dict(response=response_loss(model, test_rows, tokenizer.pad_token_id), task=score_next_lines(answers, references),
                examples=[dict(prompt=p[-1]["content"], reference=r, answer=a) for p, r, a in list(zip(prompts, references, answers))[:3]],
                held_out_text=evaluate_splits(model, tokenizer, corpus, byte_lengths, model.config.max_position_embeddings,
                                              data_args.max_eval_tokens, splits=(held_out,)))

# %% [markdown]
# ## 2. The base, scored before fine-tuning.

# %%
def load_base() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base_folder)

results: dict = {"machine": machine.to_dict(), "precision": precision, "base_model": str(base_folder), "base": base.description,
                  "chat_template": chat_template, "before": evaluate(load_base())}

# 3a. trl's SFTTrainer + peft LoRA: every linear layer of the decoder, the tied LM head left alone; on an MoE base
#     every expert's weights too (target_parameters).
lora = dict(rank=args.lora_rank, alpha=args.lora_alpha, dropout=lora_dropout)
settings = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
settings["eval_strategy"] = "no"  # the held-out numbers come from evaluate() before and after
config = SFTConfig(**settings, assistant_only_loss=True, max_length=args.max_length, packing=False)
set_seed(training_args.seed)
throughput = ThroughputCallback(int(batch * mean_tokens))
trainer = SFTTrainer(
    model=load_base(), args=dataclasses.replace(config, output_dir=str(output_dir / "trl")), train_dataset=train,
    processing_class=tokenizer, callbacks=[throughput],
    peft_config=LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules="all-linear",
                           target_parameters=expert_targets or None),
)
trainer.train()
peft_model = trainer.model.eval()

# 3b. The hand-written LoRA on lesson 7's loop, same rows in the same order, same settings object.
set_seed(training_args.seed)
hand_model = apply_lora(load_base(), LoRAConfig(rank=lora["rank"], alpha=lora["alpha"], dropout=lora["dropout"], target_modules="all-linear",
                                                target_parameters=expert_targets))
loop = TrainingLoop(hand_model, train_ids, dataclasses.replace(config, output_dir=str(output_dir / "hand")),
                    collate=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt"))
hand = loop.train()
hand_model = loop.accelerator.unwrap_model(loop.model).eval()

# %% [markdown]
# ## 4. Evaluate both, side by side with the base.

# %%
trainable = {"peft": list(peft_model.get_nb_trainable_parameters()), "hand": list(trainable_parameters(hand_model))}
results["after_peft"], results["after_hand"] = evaluate(peft_model), evaluate(hand_model)
results["trainable_parameters"] = trainable
results["lora_dropout"] = lora_dropout
results["expert_adapters"] = {"peft": sum(isinstance(m, ParamWrapper) for m in peft_model.modules()),
                              "hand": sum(isinstance(layer, LoRAExpertWeights) for _, layer in lora_layers(hand_model))}
results["tokens_per_second"] = {"trl + peft": throughput.tokens_per_second, "hand loop + hand LoRA": hand.tokens_per_second,
                                "hand_over_trl": hand.tokens_per_second / throughput.tokens_per_second}
header = "| model | response loss | response perplexity | format | exact | near | task score | trainable | tokens/s | held-out bits/byte |"
table = [header, "|---|---|---|---|---|---|---|---|---|---|"]
for label, key, params, speed in ((f"base ({base.description})", "before", None, None),
                                  ("trl SFTTrainer + peft LoRA", "after_peft", trainable["peft"], throughput.tokens_per_second),
                                  ("hand LoRA + lesson 7 loop", "after_hand", trainable["hand"], hand.tokens_per_second)):
    row = results[key]
    share = f"{params[0]:,} ({params[0] / params[1]:.1%})" if params else "-"
    table.append(f"| {label} | {row['response']['loss']:.3f} | {row['response']['perplexity']:.1f} | {row['task']['format']:.1%} | "
                 f"{row['task']['exact']:.1%} | {row['task']['near']:.3f} | {row['task']['task']:.3f} | {share} | {f'{speed:,.0f}' if speed else '-'} | "
                 f"{row['held_out_text'][held_out]['bits_per_byte']:.4f} |")
results["table"] = table = "\n".join(table)
print(f"\nheld-out plays, {len(test)} conversations:\n{table}")
for example in results["after_hand"]["examples"]:
    print(f"\n{example['prompt']}\n  true:   {example['reference']}\n  answer: {example['answer']}")

# %% [markdown]
# ## 5. Save: the adapters alone (three formats), then the hand adapter merged into the base, with its card.

# %%
adapters = output_dir / "adapters"
save_lora(hand_model, adapters / "hand")
lora_to_peft(hand_model, adapters / "hand-peft", base_model_name_or_path=str(base_folder))
peft_model.save_pretrained(adapters / "trl-peft")
results["adapters"] = {name: str(adapters / name) for name in ("hand", "hand-peft", "trl-peft")}
merged = merge_lora(hand_model)
results[held_out] = results["after_hand"]["held_out_text"][held_out]
after, before = results["after_hand"], results["before"]
card = dict(
    summary=(f"The base {base.description} (`{base_folder}`) fine-tuned on the plays' next-line task with a hand-written LoRA "
             f"(rank {lora['rank']}, alpha {lora['alpha']:g}, every linear layer but the tied LM head"
             f"{', and every expert through target_parameters, dropout 0' if expert_targets else ''}; "
             f"{trainable['hand'][0]:,} trainable parameters, {trainable['hand'][0] / trainable['hand'][1]:.1%}) on lesson 7's loop, "
             f"then merged. On held-out plays its answers keep the task's format {after['task']['format']:.0%} of the time "
             f"(base {before['task']['format']:.0%}), task score {after['task']['task']:.3f} (base {before['task']['task']:.3f}), "
             f"response loss {after['response']['loss']:.3f} (base {before['response']['loss']:.3f}).\n\n{table}"),
    lesson="8 (supervised fine-tuning with LoRA)", recipe="recipes/08_lora_sft.py", tags=["lora", "sft", "peft", "trl"],
    tokenizer=f"the base's ({len(tokenizer)} tokens), with {chat_template}",
    limitations=(f"A {merged.num_parameters():,}-parameter model fine-tuned on one small task: the default base learns the answer "
                 f"format and the voice of a reply, rarely Shakespeare's exact line; the model knows only this one task."),
    training=dict(method="LoRA SFT, answers only", steps=steps, conversations_per_step=batch, learning_rate=training_args.learning_rate,
                  base=str(base_folder)),
)
finish_lesson(merged, tokenizer, training_args, lesson_args, data_args, results, card)
