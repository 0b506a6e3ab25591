"""Lesson 7: the training loop ``Trainer`` runs for us, written out, on Accelerate, in one file.

One optimizer step, as every LLM trainer does it::

    for each of the `accumulation` micro-batches:          # a large batch that does not fit at once
        with autocast(bf16 or fp16):                      # mixed precision: matmuls in 16 bits
            loss = sum of token losses / tokens in the whole step
        backward(loss)                                    # gradients add up across micro-batches
    clip the gradient norm                                # one bad batch cannot blow up the weights
    optimizer step, learning-rate schedule step           # AdamW; warm-up then cosine (below)

and around it: periodic evaluation, logging, and checkpoints that let a killed run continue bit
for bit. The file reads top to bottom: the schedule, what a step reads (parameter groups, target
tokens, the global micro-batches), sharding the model (FSDP), what a checkpoint holds, then
:class:`TrainingLoop` itself.

Three details are where loops go wrong:

* **Loss normalisation under accumulation.** Averaging each micro-batch's mean loss weighs a token
  in a short micro-batch more than one in a long micro-batch: with padding or packed documents the
  accumulated gradient is not the large batch's gradient (transformers itself shipped this for
  years). The loss here is the *sum* over real (not padding, not ignored) tokens divided by the token
  count of the whole accumulated batch, on every process together, so 4 micro-batches of 2 give
  exactly the gradient of one batch of 8.
* **Mixed precision.** bf16 has fp32's range, so autocast is all it needs; fp16's range is small,
  so its loss is multiplied by a large factor before the backward (gradients would underflow to 0)
  and the gradients divided back before clipping, skipping steps that overflowed
  (``torch.amp.GradScaler``). Weights and optimizer state stay in fp32 either way. On CPUs without
  bf16 matrix units autocast only adds casts: measure before assuming it is faster.
* **Determinism.** The data order is a function of the seed and the position only, never of the
  number of processes: global micro-batch ``k`` holds the same examples whether one process reads
  all of it or each of ``P`` processes reads a ``1/P`` slice. Gradients are averaged across processes
  by DDP, so the loss each process back-propagates is scaled by ``P`` to keep the global token mean.

Accelerate places the model, wraps it for data parallelism (DDP over gloo on CPUs, NCCL on GPUs)
and provides the collectives; everything else is here. ``--fsdp`` shards the model instead, with
torch's ``fully_shard`` (FSDP2, "sharding the model" below), on CPUs over gloo as on GPUs. Frontier
stacks add tensor and pipeline parallelism around it, but their step is this one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm
from transformers import TrainingArguments, default_data_collator

from ..benchmarking import StepClock
from ..benchmarking.memory import training_state_bytes
from ..evaluation import evaluate_blocks
from ..files import batch_layout, check_batch_layout, latest_checkpoint, resolve_checkpoint, save_folder_atomically, write_batch_layout
from ..recipe_support.arguments import global_batch_size

METRICS_FILE = "metrics.jsonl"


@dataclass
class LoopResult:
    """What a run reports: the logged records (as in ``metrics.jsonl``), throughput and the final step."""

    history: list[dict] = field(default_factory=list)
    tokens_per_second: float = float("nan")
    steps: int = 0
    # Parameters, gradients, optimizer state: bytes per process (the largest) and for one process holding all.
    memory: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def losses(self) -> dict[int, float]:
        """Training loss at each logged step."""
        return {r["step"]: r["loss"] for r in self.history if "loss" in r}


# ----------------------------------------------------------------------------- the learning-rate schedule

# Almost every LLM is trained with linear warm-up, then cosine decay to a floor.
#
# Why warm up? At step 0 Adam's second-moment estimates are built from a handful of gradients, so
# its per-parameter step sizes are noisy, and a freshly initialised network has large, badly
# conditioned gradients. Ramping the learning rate from 0 to its peak over the first few hundred
# steps lets those statistics settle before the big steps come. Why cosine? Loss falls fastest at a
# high rate early and needs a small rate late to settle into a minimum; a half cosine goes from one
# to the other smoothly, spending most of the run near the peak and slowing at the end. GPT-2/3,
# LLaMA and nanoGPT all use it, decaying to a floor (often a tenth of the peak) rather than to 0.
#
# For step ``s`` of ``S``, with ``W`` warm-up steps, peak ``lr`` and floor ``min_lr``::
#
#     s < W:   lr * s / W
#     s >= W:  min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (s - W) / (S - W)))
#
# This equals transformers' ``get_cosine_schedule_with_warmup`` (``min_lr = 0``) and the
# ``"cosine_with_min_lr"`` schedule at every step (tests/test_training_loop.py checks to 1e-12).
# Frontier runs use the same shape, sometimes with "warmup-stable-decay" (a long flat middle, decayed
# at the end) so that a run can be extended without restarting the schedule.


def warmup_cosine_lr(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """The learning rate at optimizer step ``step`` (0-based: the rate the ``step``-th update uses)."""
    if step < warmup_steps:
        return peak_lr * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return min_lr + (peak_lr - min_lr) * cosine


class WarmupCosineSchedule(LRScheduler):
    """:func:`warmup_cosine_lr` as a torch scheduler: call ``step()`` once after every optimizer step.

    The rate is a closed form of the step count, so the scheduler's whole state is that count
    (``last_epoch``), which is what a checkpoint saves.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0, last_epoch: int = -1):
        if warmup_steps < 0 or total_steps <= 0:
            raise ValueError(f"warmup_steps must be >= 0 and total_steps > 0, got {warmup_steps} and {total_steps}.")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [
            warmup_cosine_lr(self.last_epoch, base_lr, self.warmup_steps, self.total_steps, self.min_lr)
            for base_lr in self.base_lrs
        ]


# ----------------------------------------------------------------------------- what a step reads


def decay_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (embeddings, projections), not on biases and norm gains.

    Decay pulls weights toward 0; a norm's gain or a bias has no scale freedom to regularise, and
    pulling a gain to 0 switches its layer off. ``Trainer`` excludes the same parameters by name.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def count_target_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens the loss is taken over: ``shift_labels`` as given, else ``labels[:, 1:]``, without -100."""
    targets = batch["shift_labels"] if "shift_labels" in batch else batch["labels"][:, 1:]
    return (targets != -100).sum()


class GlobalBatches:
    """Deterministic micro-batches: global micro-batch ``k`` is a function of (seed, k) only.

    Each of ``world_size`` processes takes its contiguous slice of ``per_device`` examples, so the
    examples a global step sees do not depend on how many processes share them. ``shuffle=False``
    reads the dataset in order, which is right when the dataset itself was drawn at random
    (``RandomWindows``, nanoGPT's sampling); otherwise each epoch is a seeded permutation.
    """

    def __init__(self, dataset, per_device: int, world_size: int, rank: int, seed: int, shuffle: bool, collate: Callable):
        self.dataset, self.per_device, self.world_size, self.rank = dataset, per_device, world_size, rank
        self.seed, self.shuffle, self.collate = seed, shuffle, collate
        self.global_size = per_device * world_size
        self.per_epoch = len(dataset) // self.global_size
        if self.per_epoch == 0:
            raise ValueError(
                f"The training set has {len(dataset)} examples, fewer than one global micro-batch of "
                f"{per_device} x {world_size} processes = {self.global_size}."
            )
        self._order: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)) if self.shuffle else torch.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        """This process's slice of global micro-batch ``k`` (counting across epochs)."""
        epoch, within = divmod(k, self.per_epoch)
        start = within * self.global_size + self.rank * self.per_device
        indices = self.order(epoch)[start : start + self.per_device]
        return self.collate([self.dataset[int(i)] for i in indices])


# ----------------------------------------------------------------------------- sharding the model: FSDP

# Why shard? Data parallelism (DDP) copies everything onto every process: the weights, their
# gradients and AdamW's two moments, 16 bytes per parameter in fp32, before any activation. A 7B
# model needs 112 GB for that alone, more than one GPU holds, however many GPUs there are. Fully
# sharded data parallelism (FSDP; ZeRO-3 in DeepSpeed's words) keeps 1/N of each of the three on
# each of N processes, so the per-process cost falls as processes are added.
#
# What moves, per sharded unit (here: each decoder layer, and the model's remaining weights):
#
# * **all-gather before its forward**: every process sends its shard and receives the others',
#   runs the layer with the whole weights, then frees the gathered copy (``reshard_after_forward``);
# * **all-gather again before its backward** (the copy was freed), then a **reduce-scatter** of the
#   gradients: each process receives the sum of its own shard's gradient over every process
#   (averaged, as DDP averages) and drops the rest;
# * the optimizer steps on shards only: AdamW is per element, so no communication at all.
#
# The cost: DDP's all-reduce moves 2x the parameters per step; FSDP moves 3x (two all-gathers and a
# reduce-scatter), overlapped with compute by prefetching the next layer while this one runs, and at
# any moment one or two layers are whole in memory besides the shards. ``--fsdp shard_grad_op``
# (``reshard_after_forward=False``) keeps the gathered weights from forward to backward: one all-gather
# fewer, more memory (ZeRO-2-like). Gradient accumulation keeps gradients local and whole until the last
# micro-batch, as DDP's ``no_sync`` does.
#
# The arithmetic is DDP's: the same global batch gives the same loss at every step on 1 process or
# N, to float rounding (tests/test_fsdp.py). Saving needs the whole weights in one place: the
# shards are gathered to the main process (:meth:`TrainingLoop.full_model`) for an ordinary
# ``save_pretrained`` folder; a checkpoint instead lets every process write its own shards
# (``torch.distributed.checkpoint``, "what a checkpoint holds" below).
#
# At frontier scale FSDP is one axis of a mesh. Gathering every layer across thousands of GPUs is
# slow, so HSDP shards within a node (fast links) and replicates across nodes (a 2-D device mesh,
# ``fully_shard(mesh=mesh_2d)``); tensor parallelism splits each matmul across the GPUs of a node
# and pipeline parallelism splits the layers into stages across nodes; FSDP shards what is left.
# The switch here is the same ``--fsdp`` flag that ``Trainer`` reads, with the same meaning.

# What ``TrainingArguments`` makes of ``--fsdp [full_shard|shard_grad_op|offload]`` (the string is turned
# into ``fsdp=True`` plus ``fsdp_config`` entries) and what the hand loop does with each entry.
FSDP_CONFIG_HONOURED = {"reshard_after_forward", "version", "min_num_params", "xla", "xla_fsdp_v2", "xla_fsdp_grad_ckpt"}


def check_fsdp_args(args: TrainingArguments) -> None:
    """Refuse, before any work, ``--fsdp`` settings the hand loop would not honour, naming each.

    Honoured: ``--fsdp`` or ``--fsdp full_shard`` (gather each layer for its forward, free it after),
    ``--fsdp shard_grad_op`` (keep it gathered until its backward), with ``--bf16`` or fp32, gradient
    accumulation and activation checkpointing.

    Raises:
        ValueError: ``--fsdp offload`` or any other ``--fsdp_config`` entry than ``reshard_after_forward``,
            FSDP version 1, a single process, or ``--fp16`` (loss scaling over shards is not written here: use ``--bf16``).
    """
    if not args.fsdp:
        return
    config = args.fsdp_config or {}
    unhonoured = {key: value for key, value in config.items() if key not in FSDP_CONFIG_HONOURED}
    defaults = {"version": 2, "min_num_params": 0, "xla": False, "xla_fsdp_v2": False, "xla_fsdp_grad_ckpt": False}
    unhonoured.update({key: config[key] for key, value in defaults.items() if key in config and config[key] != value})
    if unhonoured:
        settings = ", ".join(f"{key}={value!r}" for key, value in sorted(unhonoured.items()))
        raise ValueError(
            f"--fsdp with {settings} (from --fsdp or --fsdp_config) is not what lesson 7's hand loop does: it shards "
            f"with FSDP2 (torch's fully_shard), every decoder layer and then the whole model, on the processes' own "
            f"device. Allowed: --fsdp, --fsdp full_shard or --fsdp shard_grad_op, and nothing else in --fsdp_config."
        )
    if args.world_size < 2:
        raise ValueError(
            f"--fsdp shards the model across the launched processes, and this run is {args.world_size} process: launch "
            f"several, e.g. torchrun --nproc_per_node 2 <script> --fsdp full_shard (docs/lessons/07_training.md), or drop --fsdp."
        )
    if args.fp16:
        raise ValueError("--fsdp with --fp16 is not supported by the hand loop (its loss scaler is not written for "
                         "sharded gradients); use --bf16, which needs no loss scaling, or fp32.")


def shard_model(model: torch.nn.Module, device: torch.device, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard ``model`` over every process with FSDP2: each decoder layer, then the whole model.

    The decoder layers are the classes named in ``model._no_split_modules`` (the blocks transformers
    and accelerate wrap with ``TRANSFORMER_BASED_WRAP``). Each becomes one unit gathered and freed
    as a whole; the root unit holds the rest (embeddings, final norm, head; a tied head shares the
    embedding's shard). Parameters become ``DTensor`` shards (dim 0 split across processes), so
    the optimizer must be built *after* this.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))  # 1-D: every process, one shard each
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class in _no_split_modules, so --fsdp has no layers to shard.")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


# ----------------------------------------------------------------------------- what a checkpoint holds

# Everything a training run needs to continue exactly where it stopped, saved without pickle.
#
# A run killed at step ``n`` and resumed from its last checkpoint should produce, bit for bit on a
# CPU, the losses an uninterrupted run produces. That needs more than the weights:
#
# * the **model** weights (``model.safetensors``);
# * the **optimizer** state: AdamW's two moment estimates and step count per parameter, and the
#   param groups' hyper-parameters (``optimizer.safetensors`` + ``optimizer.json``);
# * the **scheduler**, whose whole state is its step count (``trainer_state.json``);
# * the **data position**: which micro-batch comes next (``trainer_state.json``);
# * every **random number generator** that the rest of the run will draw from, on every process:
#   torch's CPU generator (dropout), CUDA's, numpy's and Python's (``rng_state.safetensors`` +
#   ``rng_state.json``).
#
# Why not ``torch.save``? It pickles, and unpickling a file can run arbitrary code: a checkpoint
# shared on the Hub is untrusted input. Every piece here is a tensor (safetensors) or plain JSON.
# (``Trainer``'s checkpoints pickle the optimizer, scheduler and RNG states; the hand loop shows
# that nothing forces it.)
#
# Under FSDP no process holds the whole model or optimizer state, and gathering them to save would
# cost what sharding saved. Every process writes its own shards instead, in parallel, with
# ``torch.distributed.checkpoint`` (DCP) into one ``sharded/`` folder (a ``.distcp`` file per process
# plus a ``.metadata`` index of which slice of which tensor lies where), in place of
# ``model.safetensors`` and the optimizer files. On several machines that folder must be on a shared
# filesystem. DCP writes its index with pickle (the tensors are raw bytes): like ``Trainer``'s, resume
# only from sharded checkpoints you made yourself. The finished model is still saved whole, as safetensors.
#
# Resuming is refused rather than silently wrong (``hf_models.files.checkpoints``): a damaged file is
# named (and ``resume_from_checkpoint=True`` falls back to the newest checkpoint that reads back whole),
# and ``batch_layout.json`` records the global batch (processes x per-device batch x accumulation)
# that the data position and schedule are counted in, so a resume with another one stops.


MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS, OPTIMIZER_GROUPS = "optimizer.safetensors", "optimizer.json"
STATE_FILE = "trainer_state.json"
RNG_TENSORS, RNG_JSON = "rng_state.safetensors", "rng_state.json"
SHARDED_STATE = "sharded"  # FSDP: the model and optimizer shards of every process (torch.distributed.checkpoint)


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Per-parameter state tensors to safetensors (``"<param index>.<name>"``), param groups to JSON."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().contiguous().cpu() if torch.is_tensor(value) else torch.tensor(value)
        for index, entries in state["state"].items()
        for name, value in entries.items()
    }
    save_file(tensors, folder / OPTIMIZER_TENSORS)
    (folder / OPTIMIZER_GROUPS).write_text(json.dumps(state["param_groups"], indent=1))


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    tensors = load_file(folder / OPTIMIZER_TENSORS)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = json.loads((folder / OPTIMIZER_GROUPS).read_text())
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's generators, as (tensors, JSON-able values)."""
    mt_name, mt_keys, mt_pos, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(mt_keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = cuda_state
    version, python_state, gauss = random.getstate()
    values = {
        "numpy": [mt_name, int(mt_pos), int(has_gauss), float(cached_gaussian)],
        "python": [version, list(python_state), gauss],
    }
    return tensors, values


def restore_rng_state(tensors: dict[str, torch.Tensor], values: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda_states = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda_states])
    mt_name, mt_pos, has_gauss, cached_gaussian = values["numpy"]
    np.random.set_state((mt_name, tensors["numpy_keys"].numpy().astype(np.uint32), mt_pos, has_gauss, cached_gaussian))
    version, python_state, gauss = values["python"]
    random.setstate((version, tuple(python_state), gauss))


def save_rng_states(states: list[tuple[dict[str, torch.Tensor], dict]], folder: Path) -> None:
    """Every process's generators (index = process rank) in one pair of files."""
    save_file(
        {f"{rank}.{name}": tensor.contiguous() for rank, (tensors, _) in enumerate(states) for name, tensor in tensors.items()},
        folder / RNG_TENSORS,
    )
    (folder / RNG_JSON).write_text(json.dumps([values for _, values in states]))


def load_rng_state(folder: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    values = json.loads((folder / RNG_JSON).read_text())
    if rank >= len(values):
        raise ValueError(
            f"{folder} holds the random states of {len(values)} process(es); this run has a process of rank {rank}. "
            f"Resume with the number of processes the checkpoint was saved with."
        )
    prefix = f"{rank}."
    tensors = {key[len(prefix):]: value for key, value in load_file(folder / RNG_TENSORS).items() if key.startswith(prefix)}
    return tensors, values[rank]


# ----------------------------------------------------------------------------- the loop


class TrainingLoop:
    """Train ``model`` on ``train_dataset`` with the settings of ``args`` (transformers' ``TrainingArguments``).

    The same flags drive this loop and ``Trainer``, so the two can be compared run for run. Read:
    ``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``max_steps``,
    ``learning_rate``, ``warmup_steps``/``warmup_ratio``, ``lr_scheduler_kwargs["min_lr"]`` (the
    cosine floor), ``weight_decay``, ``adam_beta1/2``, ``adam_epsilon``, ``optim`` (fused AdamW or
    not), ``max_grad_norm``, ``bf16``/``fp16``, ``gradient_checkpointing``, ``logging_steps``,
    ``eval_steps``, ``save_steps`` (with ``save_strategy="steps"``), ``seed``, ``output_dir``,
    ``use_cpu``, ``disable_tqdm`` and ``fsdp`` (:func:`check_fsdp_args`: the model is sharded with
    :func:`shard_model` instead of copied by DDP).

    Writes ``metrics.jsonl`` (one JSON record per logged step and per evaluation), TensorBoard
    events when ``tensorboard`` is installed, and ``checkpoint-<step>`` folders (see "what a checkpoint holds" above).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_dataset,
        args: TrainingArguments,
        eval_dataset=None,
        byte_lengths: torch.LongTensor | None = None,
        shuffle: bool = True,
        collate: Callable = default_data_collator,
        eval_batch_size: int = 16,
    ):
        if args.max_steps is None or args.max_steps <= 0:
            raise ValueError(f"The hand-written loop trains for --max_steps steps; got max_steps={args.max_steps}, expected a positive integer.")
        if args.bf16 and args.fp16:
            raise ValueError("Pass at most one of --bf16 and --fp16.")
        self.args = args
        self.accelerator = Accelerator(cpu=args.use_cpu or not torch.cuda.is_available())
        self.device = self.accelerator.device
        if args.fp16 and self.device.type != "cuda":
            raise ValueError(
                f"--fp16 needs a CUDA device (fp16 with loss scaling is a GPU recipe); this run is on {self.device.type}. "
                f"Use --bf16 for mixed precision on a CPU."
            )
        self.precision = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        self.scaler = torch.amp.GradScaler(self.device.type) if args.fp16 else None

        # transformers 5.24 renamed the flag to activation_checkpointing; either turns it on.
        if args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
            model.gradient_checkpointing_enable()
        self.eval_dataset, self.byte_lengths, self.eval_batch_size = eval_dataset, byte_lengths, eval_batch_size
        check_fsdp_args(args)
        self.sharded = bool(args.fsdp)
        self.model_class = type(model)  # fully_shard swaps the class for an FSDP subclass; the save builds this one
        if self.sharded:  # FSDP: each process keeps 1/N of the weights; the optimizer is built over those shards
            model = shard_model(model.to(self.device), self.device, (args.fsdp_config or {}).get("reshard_after_forward", True))
        optimizer = torch.optim.AdamW(
            decay_parameter_groups(model, args.weight_decay),
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            fused=str(getattr(args.optim, "value", args.optim)) == "adamw_torch_fused",  # what Trainer builds for that name
        )
        if self.sharded:
            self.model, self.optimizer = model, optimizer
        else:  # DDP: every process a whole copy, gradients all-reduced
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        min_lr = (args.lr_scheduler_kwargs or {}).get("min_lr", 0.0) if isinstance(args.lr_scheduler_kwargs, dict) else 0.0
        self.scheduler = WarmupCosineSchedule(self.optimizer, args.get_warmup_steps(args.max_steps), args.max_steps, min_lr)
        state = self.accelerator.state
        self.batches = GlobalBatches(train_dataset, args.per_device_train_batch_size, state.num_processes, state.process_index, args.seed, shuffle, collate)
        self.output_dir = Path(args.output_dir)
        self.step = 0  # optimizer steps done
        self.history: list[dict] = []
        self.memory: dict[str, dict[str, int]] = {}  # measured at the first step (training_state_bytes)

    # ------------------------------------------------------------------ one optimizer step

    def autocast(self):
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns (loss, grad norm), unsynced."""
        step_loss = self.accumulate_gradients()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skipped if the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if not self.memory:
            self.memory = self.measure_memory()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over every shard, as one tensor
            grad_norm = grad_norm.full_tensor()
        return step_loss, grad_norm

    def accumulate_gradients(self) -> torch.Tensor:
        """Forward and backward over this step's micro-batches; returns the step's loss (global token mean)."""
        accumulation = self.args.gradient_accumulation_steps
        first = self.step * accumulation
        micro_batches = [{k: v.to(self.device) for k, v in self.batches[first + i].items()} for i in range(accumulation)]
        # The denominator is the token count of the whole step, on every process: a token weighs the same
        # wherever it sits.
        tokens = self.accelerator.reduce(sum(self.count_items(b) for b in micro_batches), "sum")
        world = self.accelerator.num_processes
        step_loss = torch.zeros((), device=self.device)
        self.model.train()
        for i, batch in enumerate(micro_batches):
            # Gradients are all-reduced (DDP) or reduce-scattered (FSDP) only after the last micro-batch.
            sync = self.gradients_kept_local() if i < accumulation - 1 else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    loss = self.compute_loss(batch, num_items_in_batch=tokens)  # sum of token losses / tokens
                scaled = loss * world  # DDP and FSDP average gradients over processes; the global mean wants their sum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            step_loss += loss.detach()
        return step_loss

    @contextlib.contextmanager
    def gradients_kept_local(self):
        """Accumulate this micro-batch's gradients locally, without communicating: DDP's ``no_sync``, or
        FSDP2's ``set_requires_gradient_sync(False)`` (which keeps them whole until the last micro-batch)."""
        if not self.sharded:
            with self.accelerator.no_sync(self.model):
                yield
            return
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def measure_memory(self) -> dict[str, dict[str, int]]:
        """Bytes of parameters, gradients and optimizer state held by the largest process, and by one
        process holding them whole (``hf_models.benchmarking.memory.training_state_bytes``)."""
        parts = training_state_bytes(self.model, self.optimizer)
        held = torch.tensor([part["per_process"] for part in parts.values()], device=self.device)
        largest = self.accelerator.gather(held).view(self.accelerator.num_processes, -1).amax(0)
        return {name: {"per_process": int(n), "one_process": part["one_process"]} for (name, part), n in zip(parts.items(), largest.tolist())}

    # The three seams a loop with another objective overrides (lesson 11's DPO loop counts preference
    # pairs, not tokens, and scores a policy against a reference).

    def count_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the step's loss is averaged over, in one micro-batch: target tokens for language modelling."""
        return count_target_tokens(batch)

    def compute_loss(self, batch: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor) -> torch.Tensor:
        """One micro-batch's summed loss divided by ``num_items_in_batch``, the whole step's item count."""
        return self.model(**batch, num_items_in_batch=num_items_in_batch).loss

    def tokens_per_example(self) -> float:
        """Tokens one training example puts through the model, for tokens/s (the mean over up to 1,000 rows,
        so that rows of different lengths, as in lesson 8's conversations, count what they hold)."""
        dataset = self.batches.dataset
        if not isinstance(dataset, datasets.Dataset):  # fixed-length windows (RandomWindows) or a list of rows
            return len(dataset[0]["input_ids"])
        rows = dataset[: min(1000, len(dataset))]["input_ids"]
        return sum(len(row) for row in rows) / len(rows)

    # ------------------------------------------------------------------ the run

    def train(self, resume_from_checkpoint: str | Path | bool | None = None) -> LoopResult:
        args, accelerator = self.args, self.accelerator
        if resume_from_checkpoint:
            self.load_state(resolve_checkpoint(self.output_dir, resume_from_checkpoint))
        writer = self._tensorboard()
        main = accelerator.is_main_process
        progress = tqdm(total=args.max_steps, initial=self.step, disable=args.disable_tqdm or not main, desc="training")
        tokens_per_step = global_batch_size(args) * self.tokens_per_example()
        running_loss, logged_steps = torch.zeros((), device=self.device), 0
        # nanoGPT's per-iteration time: everything between two steps, except steps that also evaluated or saved.
        clock = StepClock(tokens_per_step, skip_first_steps=min(5, args.max_steps // 10))
        clock.start()
        while self.step < args.max_steps:
            loss, grad_norm = self.train_step()
            running_loss += loss
            logged_steps += 1
            progress.update(1)
            interrupted = False
            if self.step % max(1, args.logging_steps) == 0 or self.step == args.max_steps:
                mean_loss = accelerator.reduce(running_loss, "sum").item() / logged_steps  # global token mean per step
                self._log({"step": self.step, "loss": mean_loss, "learning_rate": self.scheduler.get_last_lr()[0],
                           "grad_norm": float(grad_norm)}, writer)
                running_loss.zero_()
                logged_steps = 0
            if self.eval_dataset is not None and args.eval_steps and (self.step % args.eval_steps == 0 or self.step == args.max_steps):
                self._log({"step": self.step, **{f"eval_{k}": v for k, v in self.evaluate().items()}}, writer)
                interrupted = True
            if str(args.save_strategy) in ("steps", "SaveStrategy.STEPS") and args.save_steps and self.step % int(args.save_steps) == 0:
                self.save_state(self.output_dir / f"checkpoint-{self.step}")
                interrupted = True
            clock.step_done(interrupted)
        progress.close()
        if writer is not None:
            writer.close()
        return LoopResult(history=self.history, tokens_per_second=clock.tokens_per_second, steps=self.step, memory=self.memory)

    def full_model(self) -> torch.nn.Module | None:
        """The trained model, whole, as an ordinary ``PreTrainedModel`` to ``save_pretrained``.

        Without FSDP every process already holds it. With FSDP this is a collective (every process
        must call it): the shards are gathered into a full state dict on the main process's CPU
        (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``), loaded there into a fresh
        model of the same class; the other processes get ``None``. At frontier scale even one whole
        copy may not fit: there the sharded checkpoint is what is kept, and converted offline.
        """
        if not self.sharded:
            return self.accelerator.unwrap_model(self.model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.accelerator.is_main_process:
            return None
        model = self.model_class(self.model.config)
        model.load_state_dict(weights)
        return model.eval()

    def evaluate(self) -> dict[str, float]:
        """Loss, perplexity and bits per byte on the evaluation blocks (``hf_models.evaluation``)."""
        model = self.accelerator.unwrap_model(self.model)
        with self.autocast():
            return evaluate_blocks(model, self.eval_dataset, self.byte_lengths, self.eval_batch_size)

    # ------------------------------------------------------------------ records

    def _tensorboard(self):
        if not self.accelerator.is_main_process or importlib.util.find_spec("tensorboard") is None:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))

    def _log(self, record: dict, writer) -> None:
        self.history.append(record)
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / METRICS_FILE, "a") as f:  # one line per record, flushed: a killed run keeps its log
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in record.items():
                if key != "step":
                    writer.add_scalar(f"{'eval' if key.startswith('eval_') else 'train'}/{key.removeprefix('eval_')}", value, record["step"])

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, folder: Path) -> None:
        """Model, optimizer, scheduler, data position and every process's RNGs, atomically, without pickle
        (with FSDP, the model and optimizer as every process's shards through DCP, whose index is pickled:
        see :meth:`save_shards`)."""
        accelerator = self.accelerator
        rng_states = gather_object([capture_rng_state()])  # one entry per process, in rank order
        shards = self.save_shards(folder) if self.sharded else None
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(self.model)
            state = {"step": self.step, "next_micro_batch": self.step * self.args.gradient_accumulation_steps,
                     "scheduler": self.scheduler.state_dict(), "num_processes": accelerator.num_processes, "fsdp": self.sharded}

            def write(tmp: Path) -> None:
                if shards is not None:
                    os.replace(shards, tmp / SHARDED_STATE)
                else:
                    save_model(model, str(tmp / MODEL_FILE), metadata={"format": "pt"})  # tied weights stored once
                    save_optimizer(self.optimizer, tmp)
                save_rng_states(rng_states, tmp)
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
                write_batch_layout(tmp, self.batch_layout())

            save_folder_atomically(folder, write)
        accelerator.wait_for_everyone()

    def save_shards(self, folder: Path) -> Path:
        """FSDP: every process writes its shards of the weights and AdamW state at once (a collective), into
        a folder beside ``folder`` that :meth:`save_state` then moves into the checkpoint, whole or not at all."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        staging = folder.parent / f".{folder.name}.{SHARDED_STATE}"  # hidden: never taken for a checkpoint-<step>
        if self.accelerator.is_main_process and staging.exists():
            shutil.rmtree(staging)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)  # DTensor shards, keyed by name
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging)
        return staging

    def batch_layout(self) -> dict[str, int]:
        """This run's global batch, as a checkpoint records it: processes x per-device batch x accumulation."""
        return batch_layout(self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps, self.accelerator.num_processes)

    def load_state(self, folder: Path) -> None:
        """Continue exactly where ``save_state`` stopped (the same global batch: see ``check_batch_layout``)."""
        state = json.loads((folder / STATE_FILE).read_text())
        if state.get("fsdp", False) != self.sharded:
            raise ValueError(
                f"{folder} was saved {'with' if state.get('fsdp') else 'without'} --fsdp (its model and optimizer are "
                f"{'sharded' if state.get('fsdp') else 'whole'}); this run is {'with' if self.sharded else 'without'} it. "
                f"Resume with the checkpoint's setting, or start afresh in another --output_dir."
            )
        check_batch_layout(folder, self.batch_layout())
        if state["num_processes"] != self.accelerator.num_processes:  # a checkpoint saved before batch_layout.json
            raise ValueError(
                f"{folder} was saved by {state['num_processes']} process(es); this run has {self.accelerator.num_processes}. "
                f"Resume with the same number of processes (the data order and RNG streams are per process)."
            )
        if self.sharded:
            self.load_shards(folder / SHARDED_STATE)
        else:
            load_model(self.accelerator.unwrap_model(self.model), str(folder / MODEL_FILE), device=str(self.device))
            load_optimizer(self.optimizer, folder)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        restore_rng_state(*load_rng_state(folder, self.accelerator.process_index))
        if self.accelerator.is_main_process:
            # Records the killed run logged after this checkpoint are replayed by this run.
            log = self.output_dir / METRICS_FILE
            if log.exists():
                kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
                log.write_text("".join(line + "\n" for line in kept))
        self.history = []

    def load_shards(self, folder: Path) -> None:
        """FSDP: each process reads back its own shards of the weights and AdamW state (a collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)  # the shapes to fill, shard by shard
        dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
        set_state_dict(self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` in ``output_dir``."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


__all__ = [
    "LoopResult",
    "TrainingLoop",
    "WarmupCosineSchedule",
    "check_fsdp_args",
    "count_target_tokens",
    "decay_parameter_groups",
    "latest_checkpoint",
    "read_metrics",
    "shard_model",
    "warmup_cosine_lr",
]
