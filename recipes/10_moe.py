# %% [markdown]
# # Lesson 10: mixture of experts. More parameters at the same compute per token.
#
# Explained, with its measured numbers and how it scales to frontier models:
# [docs/lessons/10_moe.md](../docs/lessons/10_moe.md).
#
# Lesson 5's decoder with its feed-forward replaced by ``E`` SwiGLU experts and a router that sends
# each token to ``k`` of them (``hf_models/modeling_moe.py``; Mixtral's architecture, proven equal to
# transformers' ``MixtralForCausalLM`` in tests/test_moe.py). Three trainings on the same data, in
# the same order, at the same token budget and optimizer (lesson 7's tuned defaults: warm-up then
# cosine, and bf16 autocast where this machine measures bf16 matmuls faster than fp32):
#
# 1. **dense**: the modern decoder whose SwiGLU is ``k`` experts wide, so each token uses as many
#    parameters ("active parameters") as in the MoE;
# 2. **MoE + balancing loss**: the Switch Transformer's auxiliary loss (``router_aux_loss_coef``),
#    taken per layer (``router_aux_loss_per_layer``). transformers' Mixtral counts all layers'
#    tokens together, so expert ``e`` of one layer and expert ``e`` of another share one count and
#    the layers' imbalances can cancel: measured here, that form left the busiest expert of the
#    deepest layer at 3.2x its fair share, barely better than no loss at all (3.75x);
# 3. **MoE, no balancing loss**: the same, coefficient 0, to see what the loss is for.
#
# Both MoE runs add ST-MoE's router z-loss (``router_z_loss_coef`` 0.001), which keeps the router's
# logits small and its bf16 softmax stable.
#
# Reported side by side: held-out bits per byte, training tokens/s, total and active parameters,
# and the expert load over training (``hf_models.evaluation.expert_load``), plotted for both MoE runs
# (``expert_load.png``). Then the trained MoE, its conversion to ``MixtralForCausalLM`` and the
# trained dense model are timed on the same training step (forward + backward + AdamW) by
# ``hf_models.benchmarking.time_interleaved``: tokens/s ratios measured in one run. The MoE trained
# with the balancing loss is this lesson's saved model (card: model_cards/moe.md).
#
# **From a pretrained MoE** (``--base_model``: a folder this recipe saved, or a Mixtral-family stock
# checkpoint, a folder or a Hub id): both MoE runs continue pretraining the checkpoint's weights on
# the lesson's corpus, tokenized with the checkpoint's own tokenizer; the dense run is built at the
# checkpoint's shape (its SwiGLU ``k`` experts wide) and trained from scratch on the same batches.
# The checkpoint then sets the shape and the tokenizer: the shape flags are refused beside it.
#
# Run:
#     python recipes/10_moe.py                     # ~5 minutes on 2 idle CPU cores
#     python recipes/10_moe.py --num_local_experts 4 --expert_intermediate_size 128   # smaller experts, top-2 of 4
#     python recipes/10_moe.py --base_model runs/10_moe/moe-shakespeare   # continue a saved MoE (or a Mixtral checkpoint)

# %%
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import torch
from transformers import TrainingArguments, set_seed

from hf_models import ModernDecoderConfig, ModernDecoderForCausalLM, MoEDecoderConfig, MoEDecoderForCausalLM
from hf_models.benchmarking import describe_machine, time_interleaved, use_passive_omp_wait
from hf_models.conversion import moe_to_mixtral
from hf_models.evaluation.expert_load import ExpertLoadCallback, imbalance
from hf_models.recipe_support import (
    DECODER_TRAINING_DEFAULTS,
    DecoderArguments,
    ModelSource,
    build_trainer,
    choose_bf16,
    evaluate_splits,
    finish_lesson,
    flags_given,
    global_batch_size,
    parse_lesson_args,
    prepare_lesson_data,
    resolve_training_model_source,
    show,
)
from hf_models.tokenization import load_tokenizer_for

RECIPE = "recipes/10_moe.py"


@dataclass
class MoEArguments(DecoderArguments):
    num_key_value_heads: int = field(default=2, metadata={"help": "Key/value heads (as lesson 5)."})
    num_local_experts: int = field(default=8, metadata={"help": "Experts per layer, E (Mixtral: 8)."})
    num_experts_per_tok: int = field(default=2, metadata={"help": "Experts per token, k (Mixtral: 2)."})
    expert_intermediate_size: int = field(
        default=256, metadata={"help": "Each expert's SwiGLU width; the dense model's is k times this (equal active parameters)."}
    )
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Balancing loss weight of run 2 (Switch: 0.01)."})
    router_aux_loss_per_layer: bool = field(
        default=True, metadata={"help": "Balance each layer (Switch) rather than all layers' counts together (transformers' Mixtral)."}
    )
    router_z_loss_coef: float = field(default=0.001, metadata={"help": "Router z-loss weight of both MoE runs (ST-MoE: 0.001)."})
    load_every: int = field(default=20, metadata={"help": "Record the expert load every N optimizer steps."})
    timing_rounds: int = field(default=8, metadata={"help": "Timed rounds of the training-step comparison."})
    base_model: str = field(default="", metadata={"help": (
        f"Empty (default): all three runs from scratch. Else the MoE to continue pretraining: a zoo_moe folder ({RECIPE} "
        "writes one) or a Mixtral-family stock checkpoint (a folder or a Hub id). It sets the shape and the tokenizer, so "
        "the shape flags are refused beside it; the dense run is built at its shape, from scratch.")})


# Lesson 7's tuned settings (warm-up 100, cosine 2e-3 -> 1e-4; precision chosen by choose_bf16) at the budget that
# fits three trainings in about five minutes here.
MOE_TRAINING = dict(DECODER_TRAINING_DEFAULTS, max_steps=400, logging_steps=50)

DENSE, MOE_AUX, MOE_NO_AUX = "dense", "MoE + balancing loss", "MoE, no balancing loss"

# What --base_model may name: this lesson's own MoE, or transformers' Mixtral (converted to it).
MOE_MODEL_TYPES = ("zoo_moe", "mixtral")

# The flags that choose the model's shape and tokenizer. A checkpoint has both already: its weights only fit its own
# shape and only mean something on its own token ids. So beside --base_model they are refused, not silently ignored.
SHAPE_FLAGS = ["tokenizer", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "num_local_experts", "num_experts_per_tok", "expert_intermediate_size"]

# The fields the dense model copies from the checkpoint's MoE config: everything but the feed-forward, so that only
# the feed-forward differs between the runs.
DENSE_FIELDS_FROM_MOE = ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_frequency_scaling",
                         "attention_bias", "attention_output_bias", "tie_word_embeddings", "initializer_range",
                         "bos_token_id", "eos_token_id", "pad_token_id")


def refuse_shape_flags_beside_base_model(base_model: str) -> None:
    """With ``--base_model`` the checkpoint sets the shape and the tokenizer; a shape flag typed beside it would be
    ignored, and the run would not be the one asked for. Refused before anything is loaded, naming the flags."""
    given = flags_given(MoEArguments, SHAPE_FLAGS)
    if given:
        raise ValueError(
            f"--base_model {base_model!r} sets the model's shape and tokenizer, so {', '.join('--' + name for name in given)} "
            f"cannot be given beside it. Drop them (the dense run is built at the checkpoint's shape), or drop --base_model "
            f"to train from scratch at the shape they set. Allowed beside --base_model: the data, training, routing-loss "
            f"(--router_aux_loss_coef, --router_z_loss_coef, --router_aux_loss_per_layer) and --dropout flags."
        )


def check_block_size_fits(config: MoEDecoderConfig, block_size: int, base: ModelSource) -> None:
    """The training windows must fit the checkpoint's context (its rotary and any trained positions stop there)."""
    if block_size > config.max_position_embeddings:
        raise ValueError(
            f"--block_size {block_size} is longer than the context of --base_model ({base.description}), "
            f"{config.max_position_embeddings} tokens: pass --block_size {config.max_position_embeddings} or less."
        )


def continued_moe_config(base: ModelSource, **training_fields) -> MoEDecoderConfig:
    """The checkpoint's config (its shape), with this run's training choices: the routing losses and dropout."""
    config = MoEDecoderConfig.from_pretrained(base.folder)
    config.update(training_fields)
    config.validate_architecture()
    return config


def dense_config_at(moe_config: MoEDecoderConfig, dropout: float) -> ModernDecoderConfig:
    """The dense decoder of equal active width at the MoE's shape: the same attention stack, one SwiGLU ``k`` experts wide."""
    return ModernDecoderConfig(**{name: getattr(moe_config, name) for name in DENSE_FIELDS_FROM_MOE}, dropout=dropout,
                               intermediate_size=moe_config.num_experts_per_tok * moe_config.intermediate_size)


def time_training_steps(moe: MoEDecoderForCausalLM, dense: ModernDecoderForCausalLM, training_args: TrainingArguments,
                        block_size: int, rounds: int) -> dict:
    """Tokens/s of one training step (forward, backward, AdamW, zero_grad) of each model, interleaved.

    Copies of the trained models, so that the timing's steps do not change them; Mixtral gets the
    MoE's weights through the converter (the same function: checked on the batch first).
    """
    contenders_models = {"zoo MoE": fresh_copy(moe), "transformers Mixtral": moe_to_mixtral(moe), "zoo dense": fresh_copy(dense)}
    batch = torch.randint(0, moe.config.vocab_size, (training_args.per_device_train_batch_size, block_size),
                          generator=torch.Generator().manual_seed(0))
    ours, theirs = contenders_models["zoo MoE"].eval(), contenders_models["transformers Mixtral"]
    with torch.no_grad():
        gap = (ours(batch).logits - theirs(batch).logits).abs().max().item()

    def training_step(model: torch.nn.Module):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=training_args.bf16)

        def step() -> None:
            with precision:
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    timings = time_interleaved({name: training_step(m) for name, m in contenders_models.items()}, rounds=rounds, warmup=2)
    tokens = batch.numel()
    return dict(
        fp32_logits_gap_moe_vs_mixtral=gap,
        mixtral_experts_implementation=theirs.config._experts_implementation,
        precision="bf16 autocast" if training_args.bf16 else "fp32",
        tokens_per_second={name: tokens / seconds for name, seconds in timings.median_seconds.items()},
        moe_vs_mixtral=dataclasses.asdict(timings.speedup("zoo MoE", "transformers Mixtral")),
        moe_vs_dense=dataclasses.asdict(timings.speedup("zoo MoE", "zoo dense")),
        timings=timings.to_dict(),
    )


def fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict())
    return twin


def print_table(runs: dict, timings: dict) -> None:
    with_start = any("start" in run for run in runs.values())  # the start column, where a run did not start from scratch
    print(f"\n  {'run':<24}{'parameters':>12}{'active':>12}{'val bits/byte':>15}{'Trainer tokens/s':>18}{'max load/uniform':>18}"
          + ("  start" if with_start else ""))
    for name, run in runs.items():
        worst = f"{max(run['final_imbalance']):.2f}" if "final_imbalance" in run else "-"
        print(f"  {name:<24}{run['parameters']:>12,}{run['active_parameters']:>12,}{run['validation']['bits_per_byte']:>15.4f}"
              f"{run['train_tokens_per_second']:>18,.0f}{worst:>18}" + (f"  {run['start']}" if with_start else ""))
    speeds = timings["tokens_per_second"]
    print(f"\ntraining step ({timings['precision']}), tokens/s measured interleaved: "
          + ", ".join(f"{name} {value:,.0f}" for name, value in speeds.items()))
    for key, label in (("moe_vs_mixtral", "zoo MoE / transformers Mixtral"), ("moe_vs_dense", "zoo MoE / zoo dense")):
        ratio = timings[key]
        print(f"  {label}: {ratio['median']:.2f}x (q1-q3 {ratio['q1']:.2f}-{ratio['q3']:.2f})")
    print(f"  (same weights: MoE and Mixtral logits differ by at most {timings['fp32_logits_gap_moe_vs_mixtral']:.1e} in fp32; "
          f"Mixtral's experts implementation: {timings['mixtral_experts_implementation']})")


def plot_expert_load(runs: dict, path: Path) -> None:
    """Per MoE run: each layer's busiest expert's share of the routing slots, over the uniform share, by step."""
    moe_runs = {name: run for name, run in runs.items() if "expert_load" in run}
    figure, axes = plt.subplots(1, len(moe_runs), figsize=(6.4 * len(moe_runs), 4.2), sharey=True, squeeze=False)
    for ax, (name, run) in zip(axes[0], moe_runs.items()):
        steps = sorted(run["expert_load"])
        shares = torch.tensor([run["expert_load"][step] for step in steps])  # (snapshots, layers, E)
        worst = imbalance(shares)  # (snapshots, layers)
        for layer in range(worst.shape[1]):
            ax.plot(steps, worst[:, layer].tolist(), label=f"layer {layer}")
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{name} ({run['validation']['bits_per_byte']:.3f} val bits/byte)")
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("busiest expert's load / uniform load (1 = balanced)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)

# %%
# An MoE step is many small ops (a few matmuls per expert): on a shared machine, OpenMP threads
# spinning at each op's end would slow it by its op count, not its work (see hf_models.benchmarking).
use_passive_omp_wait()
args, data_args, lesson_args, training_args = parse_lesson_args(
    MoEArguments,
    defaults=dict(output_dir="runs/10_moe", model_name="moe-shakespeare", **MOE_TRAINING),
)
output_dir = Path(training_args.output_dir)
base = None  # from scratch; else the pretrained MoE both MoE runs continue (refused first if it cannot be)
if args.base_model:
    refuse_shape_flags_beside_base_model(args.base_model)
    base = resolve_training_model_source(args.base_model, "--base_model", RECIPE, training_args, model_types=MOE_MODEL_TYPES)
    check_block_size_fits(MoEDecoderConfig.from_pretrained(base.folder), data_args.block_size, base)
    print(f"start: MoE from {base.description}; dense from scratch")
machine = describe_machine()
precision = choose_bf16(training_args, machine)  # --bf16 wins; else bf16 only where measured faster here

# %% [markdown]
# ## 1. Data: the lessons' corpus, BPE tokenizer (or the checkpoint's own) and random windows; every run sees the same batches.

# %%
data = prepare_lesson_data(data_args, training_args, args.tokenizer, args.vocab_size, args.sampling,
                           sample_prompt=lesson_args.sample_prompt,  # the context is --block_size
                           tokenizer=load_tokenizer_for(base.folder) if base else None)  # the checkpoint's ids, or a new tokenizer

# %% [markdown]
# ## 2. The models: one attention stack, two feed-forwards of equal active width.
#
# From scratch, the flags set the shape; from ``--base_model``, the checkpoint's config does, and
# only the routing losses and dropout are this lesson's.

# %%
routing = {name: dict(output_router_logits=True, router_aux_loss_coef=coef, router_aux_loss_per_layer=args.router_aux_loss_per_layer,
                      router_z_loss_coef=args.router_z_loss_coef)
           for name, coef in ((MOE_AUX, args.router_aux_loss_coef), (MOE_NO_AUX, 0.0))}
shared = dict(
    vocab_size=len(data.tokenizer), max_position_embeddings=data_args.block_size, hidden_size=args.hidden_size,
    num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
    num_key_value_heads=args.num_key_value_heads, dropout=args.dropout, eos_token_id=data.tokenizer.eos_token_id,
)
if base is None:
    configs = {
        DENSE: ModernDecoderConfig(**shared, intermediate_size=args.num_experts_per_tok * args.expert_intermediate_size),
        **{
            name: MoEDecoderConfig(
                **shared, intermediate_size=args.expert_intermediate_size, num_local_experts=args.num_local_experts,
                num_experts_per_tok=args.num_experts_per_tok, **routing[name],
            )
            for name in (MOE_AUX, MOE_NO_AUX)
        },
    }
else:
    moe_configs = {name: continued_moe_config(base, dropout=args.dropout, **routing[name]) for name in (MOE_AUX, MOE_NO_AUX)}
    configs = {DENSE: dense_config_at(moe_configs[MOE_AUX], args.dropout), **moe_configs}
starts = {DENSE: "from scratch", MOE_AUX: "from scratch", MOE_NO_AUX: "from scratch"}
if base is not None:
    starts.update({MOE_AUX: f"from {base.description}", MOE_NO_AUX: f"from {base.description}"})
moe_shape = configs[MOE_AUX]  # the saved model's shape, for the card

# %% [markdown]
# ## 3. Train each on the same batches; measure held-out bits per byte and the expert load.

# %%
models, runs = {}, {}
for name, config in configs.items():
    set_seed(training_args.seed)
    if name != DENSE and base is not None:  # continued pretraining: the checkpoint's weights, this run's routing losses
        model = MoEDecoderForCausalLM.from_pretrained(base.folder, config=config)
    else:
        model = (ModernDecoderForCausalLM if name == DENSE else MoEDecoderForCausalLM)(config)
    # The whole held-out splits are measured after training, so no periodic evaluation; under DDP an
    # expert that no token of a micro-batch chose has no gradient, so DDP must look for unused parameters.
    run_args = dataclasses.replace(
        training_args, output_dir=str(output_dir / "runs" / str(len(runs))), save_strategy="no", eval_strategy="no",
        ddp_find_unused_parameters=name != DENSE,
    )
    trainer, throughput = build_trainer(
        model, data.tokenizer, data.train_dataset, data.eval_dataset, run_args, data.byte_lengths, data_args.max_eval_blocks
    )
    load = ExpertLoadCallback(every=args.load_every) if name != DENSE else None
    if load is not None:
        trainer.add_callback(load)
    trainer.train()
    held_out = evaluate_splits(model, data.tokenizer, data.corpus, data.byte_lengths, data_args.block_size, data_args.max_eval_tokens)
    active = model.num_active_parameters() if name != DENSE else model.num_parameters()
    runs[name] = dict(
        **held_out, parameters=model.num_parameters(), active_parameters=active,
        train_tokens_per_second=throughput.tokens_per_second,
        losses={log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log},
    )
    if base is not None:
        runs[name]["start"] = starts[name]
    if load is not None:
        runs[name]["expert_load"] = {step: shares.tolist() for step, shares in load.load.history}
        runs[name]["final_imbalance"] = imbalance(load.load.history[-1][1]).tolist()
    models[name] = model
    print(f"{name}{f' ({starts[name]})' if base else ''}: validation bits per byte {held_out['validation']['bits_per_byte']:.4f}, "
          f"{throughput.tokens_per_second:,.0f} tokens/s")

# %% [markdown]
# ## 4. Training speed side by side: our MoE, the same weights as transformers' Mixtral, the dense model.

# %%
timings = time_training_steps(models[MOE_AUX], models[DENSE], training_args, data_args.block_size, args.timing_rounds)

# %% [markdown]
# ## 5. Report, plot, save the MoE trained with the balancing loss, with its card.

# %%
moe, dense = runs[MOE_AUX], runs[DENSE]
results = {
    **{split: moe[split] for split in ("validation", "test") if split in moe},
    "train_tokens_per_second": moe["train_tokens_per_second"],
    "train_steps": training_args.max_steps,
    "parameters": moe["parameters"],
    "active_parameters": moe["active_parameters"],
    "runs": runs,
    "training_step_timing": timings,
    "moe_beats_dense": moe["validation"]["bits_per_byte"] < dense["validation"]["bits_per_byte"],
    "token_budget": training_args.max_steps * global_batch_size(training_args) * data_args.block_size,
    "machine": machine.to_dict(),
    "precision": precision,
}
if base is not None:  # where the MoE runs started (the dense one always starts from scratch)
    results.update(base_model=str(base.folder), base=base.description, start=f"MoE from {base.description}; dense from scratch")
print_table(runs, timings)
if training_args.process_index == 0:
    plot_expert_load(runs, output_dir / "expert_load.png")
    show(output_dir / "expert_load.png")
finish_lesson(
    models[MOE_AUX], data.tokenizer, training_args, lesson_args, data_args, results,
    card=dict(
        lesson="10 (mixture of experts)",
        recipe="recipes/10_moe.py",
        summary=f"A Mixtral-style decoder ({moe_shape.num_hidden_layers} layers, width {moe_shape.hidden_size}, context "
        f"{data_args.block_size}): each layer routes every token to {moe_shape.num_experts_per_tok} of "
        f"{moe_shape.num_local_experts} SwiGLU experts, {moe['parameters']:,} parameters of which {moe['active_parameters']:,} "
        "are active per token. Converts to transformers' MixtralForCausalLM with identical logits."
        + (f" Continued pretraining: MoE from {base.description} (`{base.folder}`), on this corpus with its own tokenizer; "
           "the dense model it is compared with is built at its shape and trained from scratch on the same batches."
           if base else ""),
        tokenizer=data.tokenizer_description,
        training={
            "parameters": f"{moe['parameters']:,} ({moe['active_parameters']:,} active per token)",
            "steps": training_args.max_steps,
            "batch": f"{global_batch_size(training_args)} x {data_args.block_size} tokens",
            "precision": "bf16 autocast" if training_args.bf16 else "fp32",
            "balancing loss": f"router_aux_loss_coef {args.router_aux_loss_coef} "
            f"({'per layer' if args.router_aux_loss_per_layer else 'all layers counted together'}), "
            f"router_z_loss_coef {args.router_z_loss_coef}",
            "training throughput": f"{moe['train_tokens_per_second']:,.0f} tokens/s",
            **({"start": f"MoE from {base.description}; dense from scratch"} if base else {}),
        },
        extra={
            f"dense model{' from scratch' if base else ''}, equal active parameters, validation bits per byte":
                round(dense["validation"]["bits_per_byte"], 4),
            "MoE without balancing loss, validation bits per byte": round(runs[MOE_NO_AUX]["validation"]["bits_per_byte"], 4),
        },
        limitations="Minutes of CPU training on a few MB of plays: Shakespeare-shaped text without meaning. At this scale "
        "the router has seen few tokens per expert; generation runs every expert on each new token (no host sync), "
        "which is the right trade only for small batches.",
        tags=["mixtral", "moe", "mixture-of-experts", "decoder"],
    ),
)
