"""Lesson 6's generation-timing harness: the six ways to generate, the model and prompts they run on,
and what a KV cache costs in memory.

``recipes/06_kv_cache.py`` (the lesson: same tokens six ways, one timing table) and
``benchmarks/kv_cache.py`` (the full harness: per-step clocks over long sequences, a larger model,
several batch sizes, the targets) both import it from here, so the lesson's claims and the
benchmark's numbers come from the same code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, CompileConfig, DynamicCache, StaticCache, StoppingCriteriaList

from ..causal_lm import CACHE_FIELD
from ..configuration_modern import ModernDecoderConfig
from ..kv_cache import GrowingKVCache, StaticKVCache
from ..modeling_modern import ModernDecoderForCausalLM
from ..tokenization import load_tokenizer_for
from .step_clock import StepClock

PROMPT_TEXT = (
    "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
    "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief.\n"
)
# Lesson 5's default model (recipes/05_modern_gpt.py): where it saves it, and its size, used with
# random weights when that folder does not exist yet.
LESSON5_FOLDER = "runs/05_modern_gpt/modern-gpt-shakespeare"
LESSON5_SIZE = dict(vocab_size=2048, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, hidden_size=192)

# ----------------------------------------------------------------------------- the six ways to generate


def compile_config(device: torch.device | str = "cpu") -> CompileConfig:
    """transformers' ``CompileConfig`` for ``generate(..., cache_implementation="static", compile_config=...)``.

    ``generate`` then runs the prompt eagerly and every decoding step through one compiled forward
    (``model.get_compiled_call``): with a static cache the step has the same shapes at every token,
    so it is traced once (``fullgraph``: no graph break, ``dynamic=False``: shapes baked in) and
    replayed. What is left per token is the code that *calls* the step's kernels. On a GPU that is
    what CUDA graphs remove (``mode="reduce-overhead"``, transformers' default). A CPU has no graphs
    to replay, so inductor writes that calling code in C++ instead of Python (``cpp_wrapper``): 15%
    faster decoding of lesson 5's model here, for about 15 s more compilation, once per shape.
    transformers compiles on its own only on accelerators; ``_compile_all_devices`` is its switch to
    compile on a CPU too (the flag its own tests use).
    """
    if torch.device(device).type == "cpu":
        config = CompileConfig(fullgraph=True, dynamic=False, mode=None, options={"cpp_wrapper": True})
    else:
        config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True
    return config


# name -> make_kwargs(model, max_cache_len): the generate() arguments of one variant, with a fresh cache
# per call. "no cache" turns the cache off (use_cache=False): every step re-reads the whole sequence.
# The compiled variant is lesson 6's StaticKVCache again, chosen the way transformers users choose its
# StaticCache (cache_implementation="static", sized prompt + max_new_tokens), with the forward compiled.
CACHES: dict[str, Callable[..., dict]] = {
    "no cache": lambda model, max_len: dict(use_cache=False),
    "GrowingKVCache": lambda model, max_len: {CACHE_FIELD: GrowingKVCache(num_layers=model.config.num_hidden_layers)},  # generate()'s default
    "StaticKVCache": lambda model, max_len: {CACHE_FIELD: StaticKVCache(max_cache_len=max_len, num_layers=model.config.num_hidden_layers)},
    "DynamicCache": lambda model, max_len: {CACHE_FIELD: DynamicCache(config=model.config)},
    "StaticCache": lambda model, max_len: {CACHE_FIELD: StaticCache(config=model.config, max_cache_len=max_len)},
    "StaticKVCache, compiled": lambda model, max_len: dict(cache_implementation="static", compile_config=compile_config(model.device)),
}
HAND_WRITTEN = ("GrowingKVCache", "StaticKVCache", "StaticKVCache, compiled")


def greedy(model, prompt: torch.LongTensor, total_tokens: int, make_kwargs: Callable[..., dict]) -> torch.LongTensor:
    """Greedy generation from ``prompt`` (B, P) to exactly (B, total_tokens) with one variant of :data:`CACHES`."""
    ids = model.generate(prompt, max_new_tokens=total_tokens - prompt.shape[1], do_sample=False,
                         **make_kwargs(model, total_tokens))
    if ids.shape[1] != total_tokens:
        raise RuntimeError(f"generation stopped at {ids.shape[1]} tokens, expected {total_tokens} (an EOS?)")
    return ids


def clocked_generate(model, prompt: torch.LongTensor, total_tokens: int, make_kwargs: Callable[..., dict]) -> tuple[torch.LongTensor, list[float]]:
    """:func:`greedy`, with a :class:`StepClock` as stopping criterion: the ids and each step's seconds.

    generate() calls the clock once per new token, after appending it, so step ``i`` is the time
    to reach length ``prompt + 1 + i`` (the first step includes the prompt's forward).
    """
    kwargs = make_kwargs(model, total_tokens)
    clock = StepClock()
    clock.start()
    ids = model.generate(prompt, max_new_tokens=total_tokens - prompt.shape[1], do_sample=False,
                         stopping_criteria=StoppingCriteriaList([clock]), **kwargs)
    if ids.shape[1] != total_tokens:
        raise RuntimeError(f"generation stopped at {ids.shape[1]} tokens, expected {total_tokens} (an EOS?)")
    return ids, clock.step_seconds


# ----------------------------------------------------------------------------- the model and its prompts


def lesson_model(model_folder: str | os.PathLike | None, max_length: int, seed: int):
    """``(description, model, tokenizer or None)``: the trained model in ``model_folder`` (lesson 5's)
    with its context raised to ``max_length``, or, for ``None``, a random model of lesson 5's
    default size. The callers decide which (``recipe_support.validation.lesson5_model_folder``):
    random weights only when lesson 5 has not been run, never for a folder that was named wrong."""
    if model_folder is not None:
        folder = Path(model_folder)
        # Rotary positions are computed, not looked up, so the model accepts a longer context as is
        # (its text past the context it was trained on is another matter; speed is what we measure).
        config = AutoConfig.from_pretrained(folder)
        if config.model_type == "zoo_gpt":  # learned positions: a table of max_position_embeddings rows, not to be outgrown
            if max_length > config.max_position_embeddings:
                raise ValueError(f"--total_tokens {max_length} exceeds the {config.max_position_embeddings} positions the GPT in {folder} learned.")
            model = AutoModelForCausalLM.from_pretrained(folder)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, max_position_embeddings=max_length)
        tokenizer = load_tokenizer_for(folder) if (folder / "tokenizer_config.json").exists() else None
        description = f"lesson 5's trained model ({folder})"
    else:
        torch.manual_seed(seed)
        model = ModernDecoderForCausalLM(ModernDecoderConfig(max_position_embeddings=max_length, **LESSON5_SIZE))
        tokenizer, description = None, "lesson 5's size, random weights"
    model.eval()
    # Generate exactly to total_tokens. (And no pad_token_id: generate() would mask every prompt
    # token that happens to equal it as padding.)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
    return description, model, tokenizer


def prompts(tokenizer, vocab_size: int, batch_size: int, length: int, seed: int) -> torch.LongTensor:
    """(B, P) prompts: windows of a Shakespeare passage if there is a tokenizer, random ids otherwise."""
    if tokenizer is None:
        return torch.randint(0, vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(seed))
    ids = tokenizer(PROMPT_TEXT)["input_ids"]
    ids = (ids * (1 + (length + batch_size) // len(ids)))[: length + batch_size]  # repeat if the passage is short
    return torch.tensor([ids[row : row + length] for row in range(batch_size)])  # row b starts b tokens in


# ----------------------------------------------------------------------------- what the cache costs in memory


def kv_cache_bytes(config, tokens: int, kv_heads: int | None = None, bytes_per_number: int = 4) -> int:
    """2 x layers x kv_heads x head_dim x tokens x bytes, for one sequence."""
    kv_heads = config.num_key_value_heads if kv_heads is None else kv_heads
    return 2 * config.num_hidden_layers * kv_heads * config.head_dim * tokens * bytes_per_number


def kv_cache_memory(config, tokens: int) -> dict[str, int]:
    """fp32 cache bytes per token and per ``tokens``-token sequence, and what they would be without GQA."""
    return dict(
        bytes_per_token=kv_cache_bytes(config, 1),
        bytes_per_sequence=kv_cache_bytes(config, tokens),
        bytes_per_sequence_without_gqa=kv_cache_bytes(config, tokens, kv_heads=config.num_attention_heads),
    )


__all__ = [
    "CACHES",
    "HAND_WRITTEN",
    "LESSON5_SIZE",
    "PROMPT_TEXT",
    "compile_config",
    "clocked_generate",
    "greedy",
    "kv_cache_bytes",
    "kv_cache_memory",
    "LESSON5_FOLDER",
    "lesson_model",
    "prompts",
]
