"""Everything a training run needs to continue exactly where it stopped, saved without pickle.

A run killed at step ``n`` and resumed from its last checkpoint should produce, bit for bit on a
CPU, the losses an uninterrupted run produces. That needs more than the weights:

* the **model** weights (``model.safetensors``);
* the **optimizer** state: AdamW's two moment estimates and step count per parameter, and the
  param groups' hyper-parameters (``optimizer.safetensors`` + ``optimizer.json``);
* the **scheduler**, whose whole state is its step count (``trainer_state.json``);
* the **data position**: which micro-batch comes next (``trainer_state.json``);
* every **random number generator** that the rest of the run will draw from, on every process:
  torch's CPU generator (dropout), CUDA's, numpy's and Python's (``rng_state.safetensors`` +
  ``rng_state.json``).

Why not ``torch.save``? It pickles, and unpickling a file can run arbitrary code: a checkpoint
shared on the Hub is untrusted input. Every piece here is a tensor (safetensors) or plain JSON.
(``Trainer``'s checkpoints pickle the optimizer, scheduler and RNG states; the hand loop shows
that nothing forces it.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS, OPTIMIZER_GROUPS = "optimizer.safetensors", "optimizer.json"
STATE_FILE = "trainer_state.json"
RNG_TENSORS, RNG_JSON = "rng_state.safetensors", "rng_state.json"


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


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step in ``output_dir``, if any."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(folders, key=lambda p: int(p.name.split("-")[-1]), default=None)
