"""What a training step holds in memory, measured rather than guessed.

A step holds four things: the weights, their gradients, the optimizer's state (AdamW: two fp32
moments per weight) and the activations the forward saved for the backward. The first three are
a fixed multiple of the parameter count; the activations grow with batch x context x width x
layers and are what activation checkpointing and bf16 shrink. On a GPU the allocator's peak
(``torch.cuda.max_memory_allocated``) counts all four; a CPU has no such counter, so the
activations are counted here directly: every tensor autograd saves during one forward, once each.
"""

from __future__ import annotations

import torch


def activation_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor], bf16: bool = False, checkpointing: bool = False) -> int:
    """Bytes the forward of ``batch`` keeps for the backward (parameters excluded), under bf16 autocast and checkpointing as asked."""
    if checkpointing:
        model.gradient_checkpointing_enable()
    was_training = model.training
    model.train()
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    if checkpointing:
        model.gradient_checkpointing_disable()
    model.train(was_training)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in seen.items() if pointer not in parameters)


def training_step_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor], bf16: bool = False, checkpointing: bool = False) -> dict[str, int]:
    """The peak of one AdamW training step on ``batch``, by part: weights, gradients, optimizer state, activations, total."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    parts = {
        "weights": weights,
        "gradients": trainable,
        "optimizer": 2 * trainable,  # AdamW's first and second moments
        "activations": activation_bytes(model, batch, bf16, checkpointing),
    }
    parts["total"] = sum(parts.values())
    return parts


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, int]]:
    """Parameters, gradients and optimizer state, in bytes, counted from the tensors themselves (call
    it after a backward, while the gradients exist): ``per_process`` is what this process holds (its
    shards under FSDP, everything under DDP), ``one_process`` what one process holding all of it does.

    FSDP's ``DTensor`` parameters report the whole tensor's shape and hold a shard (``to_local()``);
    a tied weight is counted once. The activations and FSDP's transient whole layers come on top.
    """
    from torch.distributed.tensor import DTensor

    def counted(tensors) -> dict[str, int]:
        tensors = [t for t in tensors if torch.is_tensor(t)]
        held = sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)
        return {"per_process": held, "one_process": sum(t.numel() * t.element_size() for t in tensors)}

    parameters = list(model.parameters())
    return {
        "parameters": counted(parameters),
        "gradients": counted(p.grad for p in parameters if p.grad is not None),
        "optimizer state": counted(value for state in optimizer.state.values() for value in state.values()),
    }


__all__ = ["activation_bytes", "training_state_bytes", "training_step_bytes"]
