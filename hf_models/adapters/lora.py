"""LoRA written out: low-rank adapters on a frozen model (Hu et al. 2021, arXiv:2106.09685).

Fine-tuning every weight of a model needs the gradients and Adam moments of every weight: three
more copies of the model. LoRA freezes the pretrained weight ``W`` (out x in) and learns a
low-rank update beside it::

    h = W x + (alpha / r) * B A x          A: (r, in), B: (out, r), r << min(in, out)

Only ``A`` and ``B`` train: ``r * (in + out)`` numbers per matrix instead of ``in * out``.
``B`` starts at zero, so the adapted model starts *exactly* at the pretrained one, and ``A``
starts random (Kaiming-uniform, as ``nn.Linear`` and peft do) so that the gradient of ``B`` is not
zero. ``alpha / r`` keeps the update's scale steady when ``r`` changes. After training the
update folds into the weight (:func:`merge_lora`: ``W += (alpha / r) B A``), so inference costs
nothing extra; or the small ``A``/``B`` are saved alone (:func:`save_lora`, kilobytes) and many
adapters share one base. Frontier practice adds quantized bases (QLoRA: NF4 ``W``, lesson 9),
per-layer ranks and serving thousands of adapters over one base (S-LoRA, punica kernels).

An embedding table is a linear map of one-hot vectors, so it gets the same update; peft stores
it transposed (``A``: (r, vocab), ``B``: (dim, r)), starts ``A`` at zero and ``B`` normal, and so
do we, so that the two are interchangeable (:func:`lora_to_peft`).

Where the model fuses q, k and v into one projection (lesson 4's GPT, ``qkv_proj``), LoRA adapts
the three as *one* matrix with one rank-``r`` update shared by them; the modern decoder's
separate ``q_proj``/``k_proj``/``v_proj`` get one adapter each.

peft's ``LoraModel`` does all of this and more (``tests/test_lora.py`` proves the two equal on
the same weights); this module is the part that teaches.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "LoRAConfig",
    "LoRAEmbedding",
    "LoRALinear",
    "apply_lora",
    "load_lora",
    "lora_layers",
    "lora_to_peft",
    "merge_lora",
    "save_lora",
    "trainable_parameters",
]

CONFIG_NAME = "lora_config.json"
WEIGHTS_NAME = "lora.safetensors"


@dataclass
class LoRAConfig:
    """What to adapt, and how.

    Args:
        rank: ``r``, the rank of the update; > 0.
        alpha: the update is scaled by ``alpha / rank``; > 0.
        dropout: dropout on the adapter's input (not on the frozen path), in [0, 1).
        target_modules: ``"all-linear"`` (every ``nn.Linear`` but the LM head, as peft does), a
            list of module names or name suffixes (``["q_proj", "v_proj"]``), or one regular
            expression matched against whole module names (as peft does for a string).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    exclude_modules: list[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}.")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if not isinstance(self.target_modules, (str, list)) or not self.target_modules:
            raise ValueError(f"target_modules must be 'all-linear', a regex or a non-empty list of names, got {self.target_modules!r}.")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class _Mergeable(nn.Module):
    """Merge folds the update into the frozen weight (zero cost at inference); unmerge takes it out again."""

    base: nn.Module
    merged: bool

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


class LoRALinear(_Mergeable):
    """``nn.Linear`` plus a trainable low-rank update: ``base(x) + scaling * B(A(dropout(x)))``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init, as in peft
        nn.init.zeros_(self.lora_B.weight)  # the adapted model starts as the base model

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class LoRAEmbedding(_Mergeable):
    """``nn.Embedding`` plus a low-rank update of the table: ``E[ids] + scaling * A.T[ids] @ B.T``.

    Stored as peft stores it: ``lora_A`` (r, vocab) starts at zero, ``lora_B`` (dim, r) normal.
    Dropout does not apply (an id is not a feature vector to drop).
    """

    def __init__(self, base: nn.Embedding, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.zeros(rank, base.num_embeddings, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.randn(base.embedding_dim, rank, device=base.weight.device, dtype=base.weight.dtype))
        self.scaling = alpha / rank
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).T * self.scaling  # (dim, r) @ (r, vocab) -> (vocab, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        if self.merged:
            return out
        return out + F.embedding(ids, self.lora_A.T) @ self.lora_B.T * self.scaling  # (..., r) @ (r, dim)


_ADAPTABLE = (nn.Linear, nn.Embedding)
_LORA_TYPES = (LoRALinear, LoRAEmbedding)


def _is_target(name: str, module: nn.Module, config: LoRAConfig) -> bool:
    if any(name == ex or name.endswith("." + ex) for ex in config.exclude_modules):
        return False
    if config.target_modules == "all-linear":
        return isinstance(module, nn.Linear)
    if isinstance(config.target_modules, str):
        return re.fullmatch(config.target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in config.target_modules)


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze ``model`` and wrap every targeted ``nn.Linear`` / ``nn.Embedding`` in an adapter (in place).

    Raises:
        ValueError: the targets match no adaptable module (the message lists the ones there are).
    """
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, _ADAPTABLE) and _is_target(name, module, config)]
    if not targets:
        available = sorted({name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, _ADAPTABLE)})
        raise ValueError(f"target_modules={config.target_modules!r} matches no nn.Linear or nn.Embedding; this model has {available} "
                         f"(exclude_modules={config.exclude_modules!r} are always left out).")
    # A tied weight (the LM head is the embedding table) has two modules: merging an adapter of one
    # would silently change the other, so refuse it (peft warns about the same, `ensure_weight_tying`).
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, _ADAPTABLE):
            owners.setdefault(id(module.weight), []).append(name)
    for name, module in targets:
        shared = [other for other in owners[id(module.weight)] if other != name]
        if shared:
            raise ValueError(f"{name} shares its weight with {shared[0]} (tied embeddings): an adapter on it would change both. "
                             "Leave it out of target_modules, or untie the embeddings (tie_word_embeddings=False).")
    model.requires_grad_(False)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapper = LoRALinear if isinstance(module, nn.Linear) else LoRAEmbedding
        setattr(parent, child, wrapper(module, config.rank, config.alpha, config.dropout))
    model.lora_config = config
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear | LoRAEmbedding]]:
    """``(module name, adapter)`` for every adapter in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _LORA_TYPES):
            yield name, module


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable, total


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put the plain module back (peft's ``merge_and_unload``)."""
    for name, layer in list(lora_layers(model)):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    model.__dict__.pop("lora_config", None)
    return model


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in lora_layers(model):
        if isinstance(layer, LoRALinear):
            state[f"{name}.lora_A.weight"] = layer.lora_A.weight
            state[f"{name}.lora_B.weight"] = layer.lora_B.weight
        else:
            state[f"{name}.lora_A"] = layer.lora_A
            state[f"{name}.lora_B"] = layer.lora_B
    return {key: value.detach().contiguous() for key, value in state.items()}


def save_lora(model: nn.Module, folder: str | Path) -> Path:
    """Write the adapters alone: ``lora.safetensors`` (A and B of every layer) and ``lora_config.json``."""
    if not hasattr(model, "lora_config"):
        raise ValueError("the model has no adapters to save (apply_lora first).")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_adapter_state(model), str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(asdict(model.lora_config), indent=2) + "\n")
    return folder


def load_lora(model: nn.Module, folder: str | Path) -> nn.Module:
    """Add the adapters saved in ``folder`` to ``model`` (the same base they were trained on)."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; it is not a folder written by save_lora.")
    apply_lora(model, LoRAConfig(**json.loads((folder / CONFIG_NAME).read_text())))
    state = load_file(str(folder / WEIGHTS_NAME))
    expected = _adapter_state(model)
    if set(state) != set(expected):
        raise ValueError(f"{folder} holds adapters for other modules: missing {sorted(set(expected) - set(state))[:4]}, "
                         f"unexpected {sorted(set(state) - set(expected))[:4]}.")
    with torch.no_grad():
        for name, layer in lora_layers(model):
            if isinstance(layer, LoRALinear):
                layer.lora_A.weight.copy_(state[f"{name}.lora_A.weight"])
                layer.lora_B.weight.copy_(state[f"{name}.lora_B.weight"])
            else:
                layer.lora_A.copy_(state[f"{name}.lora_A"])
                layer.lora_B.copy_(state[f"{name}.lora_B"])
    return model


def lora_to_peft(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters in peft's format, for ``PeftModel.from_pretrained(base, folder)``.

    peft names a layer's weights ``base_model.model.<module>.lora_A.weight`` (the adapter name
    left out on disk) and keeps our A/B shapes and init conventions, so conversion is renaming;
    the targets become an explicit list of module names.
    """
    from peft import LoraConfig  # peft is a dependency of the package, not of the carried model code

    if not hasattr(model, "lora_config"):
        raise ValueError("the model has no adapters to convert (apply_lora first).")
    config = model.lora_config
    names = [name for name, _ in lora_layers(model)]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    peft_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=names,
        base_model_name_or_path=base_model_name_or_path,
        task_type="CAUSAL_LM",
    )
    peft_config.save_pretrained(str(folder))
    # peft calls an embedding's factors lora_embedding_A / lora_embedding_B (no ".weight").
    renamed = {re.sub(r"\.lora_([AB])$", r".lora_embedding_\1", key): value for key, value in _adapter_state(model).items()}
    save_file({f"base_model.model.{key}": value for key, value in renamed.items()}, str(folder / "adapter_model.safetensors"))
    return folder
