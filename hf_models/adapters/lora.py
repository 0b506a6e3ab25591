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

A mixture of experts (lesson 10) keeps its experts as 3-D tensors, ``gate_up_proj`` (E, 2I, C) and
``down_proj`` (E, C, I), not as ``nn.Linear`` modules; ``target_parameters`` names them, and each
expert gets its own rank-``r`` pair (:class:`LoRAExpertWeights`), as peft's ``target_parameters`` does.

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
from torch.nn.utils import parametrize

__all__ = [
    "LoRAConfig",
    "LoRAEmbedding",
    "LoRAExpertWeights",
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
            expression matched against whole module names (as peft does for a string); None for none
            (then ``target_parameters`` must name some).
        exclude_modules: module names (or name suffixes) never adapted.
        target_parameters: 3-D expert weights (E, out, in) to adapt, by full name or dotted suffix of
            ``<module>.<parameter>`` (``["experts.gate_up_proj", "experts.down_proj"]``), as peft's
            ``target_parameters``. The update goes into the weight, so ``dropout`` must then be 0.
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: str | list[str] | None = "all-linear"
    exclude_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    target_parameters: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}.")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.target_modules is None and not self.target_parameters:
            raise ValueError("target_modules is None and target_parameters is empty: nothing to adapt.")
        if self.target_modules is not None and (not isinstance(self.target_modules, (str, list)) or not self.target_modules):
            raise ValueError(f"target_modules must be 'all-linear', a regex, a non-empty list of names or None, got {self.target_modules!r}.")
        if self.target_parameters and self.dropout:
            raise ValueError(f"dropout must be 0 when target_parameters are set (got dropout={self.dropout!r}, "
                             f"target_parameters={self.target_parameters!r}): their update is added to the weight, "
                             "W + BA, so there is no separate adapter input to drop (peft's ParamWrapper refuses it too).")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class _Mergeable(nn.Module):
    """Merge folds the update into the frozen weight (zero cost at inference); unmerge takes it out again."""

    base: nn.Module
    merged: bool

    def frozen_weight(self) -> torch.Tensor:
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.frozen_weight().add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.frozen_weight().sub_(self.delta_weight())
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


class LoRAExpertWeights(_Mergeable):
    """A low-rank update for each expert of a 3-D expert weight (E, out, in): ``W[e] + scaling * B[e] @ A[e]``.

    An MoE's experts are not ``nn.Linear`` modules but one (E, out, in) tensor per projection (lesson
    10's ``MoEExperts``, Mixtral's layout), read inside the experts' own dispatch. So this adapter does
    not wrap a call: it changes the weight. It is a ``torch.nn.utils.parametrize`` parametrization of
    the parameter, so every read of ``experts.gate_up_proj`` returns ``W + scaling * B @ A``, one
    batched matmul over the experts (``baddbmm``), and the dispatch runs unchanged on the adapted
    stack. peft's ``target_parameters`` (``ParamWrapper``) does the same. Two consequences:

    * no dropout: dropout acts on the adapter's input ``x``, and here the update meets ``x`` only inside
      the experts' matmul, added to ``W``; peft refuses ``lora_dropout`` there too.
    * the cost: each forward builds the adapted (E, out, in) stack, a temporary the size of the
      weight, per projection and layer. Applying ``x A_e^T B_e^T`` to each expert's run of tokens
      instead (what multi-adapter servers such as S-LoRA / punica do with grouped kernels) avoids it,
      at the price of reaching into the dispatch.

    ``lora_A`` (E, r, in) and ``lora_B`` (E, out, r): each expert its own rank-``r`` pair, initialised as
    ``LoRALinear``'s (A Kaiming-uniform over ``in``, B zero). peft stores the same numbers as two
    ``nn.Linear`` weights, A (E*r, in) and B (out, r*E) (see :func:`lora_to_peft`).
    """

    def __init__(self, weight: nn.Parameter, rank: int, alpha: float):
        super().__init__()
        num_experts, out_features, in_features = weight.shape
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A.view(num_experts * rank, in_features), a=math.sqrt(5))  # fan-in = in, as LoRALinear
        self.scaling = alpha / rank
        self.merged = False
        # A plain reference for merge/unmerge, not a registered parameter: the owner keeps the weight
        # (as parametrizations.<name>.original), and registering it here too would save it twice.
        self.frozen = [weight]

    def frozen_weight(self) -> torch.Tensor:
        return self.frozen[0]

    def delta_weight(self) -> torch.Tensor:
        return torch.bmm(self.lora_B, self.lora_A) * self.scaling  # (E, out, r) @ (E, r, in) -> (E, out, in)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The parametrization: the frozen (E, out, in) stack in, the adapted one out."""
        if self.merged:
            return weight
        # In the weight's own dtype even under autocast: a parametrization may not change the dtype.
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return torch.baddbmm(weight, self.lora_B, self.lora_A, alpha=self.scaling)  # W + s * B @ A, per expert


_ADAPTABLE = (nn.Linear, nn.Embedding)
_LORA_TYPES = (LoRALinear, LoRAEmbedding, LoRAExpertWeights)


def _is_target(name: str, module: nn.Module, config: LoRAConfig) -> bool:
    if config.target_modules is None or any(name == ex or name.endswith("." + ex) for ex in config.exclude_modules):
        return False
    if config.target_modules == "all-linear":
        return isinstance(module, nn.Linear)
    if isinstance(config.target_modules, str):
        return re.fullmatch(config.target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in config.target_modules)


def _parameter_targets(model: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Module, str]]:
    """``(full name, owner module, parameter name)`` of every parameter ``target_parameters`` names, in
    ``named_parameters`` order within each owner (the order in which peft nests its wrappers)."""
    targets = []
    for module_name, module in model.named_modules():
        for param_name, parameter in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if any(key == target or key.endswith("." + target) for target in config.target_parameters):
                if parameter.dim() != 3:
                    raise ValueError(f"target_parameters matches {key} of shape {tuple(parameter.shape)}; only 3-D expert "
                                     "weights (E, out, in) are adapted as parameters (a 2-D weight: name its module in target_modules).")
                targets.append((key, module, param_name))
    return targets


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze ``model`` and add an adapter to every targeted ``nn.Linear`` / ``nn.Embedding`` and expert weight (in place).

    Raises:
        ValueError: the targets match no adaptable module or parameter (the message lists the ones there are).
    """
    parameter_targets = _parameter_targets(model, config)
    if config.target_parameters and not parameter_targets:
        stacks = sorted({name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.dim() == 3})
        raise ValueError(f"target_parameters={config.target_parameters!r} matches no parameter; this model's 3-D weights are {stacks}.")
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, _ADAPTABLE) and _is_target(name, module, config)]
    if not targets and config.target_modules is not None:
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
    for _, owner, param_name in parameter_targets:
        parametrize.register_parametrization(owner, param_name, LoRAExpertWeights(getattr(owner, param_name), config.rank, config.alpha))
    model.lora_config = config
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear | LoRAEmbedding | LoRAExpertWeights]]:
    """``(name, adapter)`` for every adapter in ``model``: the module's name, or ``<owner>.<parameter>`` for an expert weight."""
    for name, module in model.named_modules():
        if isinstance(module, _LORA_TYPES):
            # torch keeps a parametrization at <owner>.parametrizations.<parameter>.0; name it by the parameter it adapts.
            yield re.sub(r"(^|\.)parametrizations\.(\w+)\.0$", r"\1\2", name), module


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
        if isinstance(layer, LoRAExpertWeights):  # the merged weight becomes a plain parameter again
            parametrize.remove_parametrizations(model.get_submodule(parent_name), child, leave_parametrized=False)
        else:
            setattr(model.get_submodule(parent_name), child, layer.base)
    model.__dict__.pop("lora_config", None)
    return model


def _factors(name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
    """A layer's A and B under their saved names (``nn.Linear`` factors end in ``.weight``, bare parameters do not)."""
    if isinstance(layer, LoRALinear):
        return {f"{name}.lora_A.weight": layer.lora_A.weight, f"{name}.lora_B.weight": layer.lora_B.weight}
    return {f"{name}.lora_A": layer.lora_A, f"{name}.lora_B": layer.lora_B}


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in lora_layers(model):
        state.update(_factors(name, layer))
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
            for key, factor in _factors(name, layer).items():
                factor.copy_(state[key])
    return model


def lora_to_peft(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters in peft's format, for ``PeftModel.from_pretrained(base, folder)``.

    peft names a layer's weights ``base_model.model.<module>.lora_A.weight`` (the adapter name
    left out on disk) and keeps our A/B shapes and init conventions, so conversion is renaming;
    the targets become an explicit list of module names, and of parameter names for expert weights.

    An expert weight is the one layout change. peft keeps its ``E`` pairs in two ``nn.Linear``
    weights on a ``ParamWrapper`` around the owner module: A (E*r, in), expert-major, and B
    (out, r*E), rank-major (``get_delta_factors`` reads it as (out, r, E)). Two adapted parameters
    of one owner nest two wrappers, the first in ``named_parameters`` order innermost, so its keys
    carry one ``.base_layer`` per wrapper around it.
    """
    from peft import LoraConfig  # peft is a dependency of the package, not of the carried model code

    if not hasattr(model, "lora_config"):
        raise ValueError("the model has no adapters to convert (apply_lora first).")
    config = model.lora_config
    layers = list(lora_layers(model))
    module_names = [name for name, layer in layers if not isinstance(layer, LoRAExpertWeights)]
    parameter_names = [name for name, layer in layers if isinstance(layer, LoRAExpertWeights)]
    state = {}
    for name, layer in layers:
        if isinstance(layer, LoRALinear):
            state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = layer.lora_A.weight, layer.lora_B.weight
        elif isinstance(layer, LoRAEmbedding):  # peft calls an embedding's factors lora_embedding_A / _B (no ".weight")
            state[f"{name}.lora_embedding_A"], state[f"{name}.lora_embedding_B"] = layer.lora_A, layer.lora_B
        else:
            owner, _, _ = name.rpartition(".")
            siblings = [n for n in parameter_names if n.rpartition(".")[0] == owner]
            prefix = owner + ".base_layer" * (len(siblings) - 1 - siblings.index(name))
            num_experts, out_features, rank = layer.lora_B.shape
            state[f"{prefix}.lora_A.weight"] = layer.lora_A.reshape(num_experts * rank, -1)  # (E, r, in) -> (E*r, in)
            state[f"{prefix}.lora_B.weight"] = layer.lora_B.permute(1, 2, 0).reshape(out_features, rank * num_experts)  # (E, out, r) -> (out, r*E)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    peft_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=module_names or None,
        target_parameters=parameter_names or None,
        base_model_name_or_path=base_model_name_or_path,
        task_type="CAUSAL_LM",
    )
    peft_config.save_pretrained(str(folder))
    save_file({f"base_model.model.{key}": value.detach().contiguous() for key, value in state.items()},
              str(folder / "adapter_model.safetensors"))
    return folder
