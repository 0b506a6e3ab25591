"""An ablation grid as a file a person edits: the question, the seeds, the shared settings and one line per cell.

::

    question: Which of RoPE, RMSNorm, SwiGLU, GQA and QK-norm buys most at this size?
    seeds: [0, 1, 2]
    base:                     # ConfigurableDecoderConfig fields every cell shares
      hidden_size: 128
      num_hidden_layers: 4
    training:                 # the token budget and optimizer, the same for every cell
      max_steps: 300
      per_device_train_batch_size: 16
    cells:                    # name -> the fields where this cell differs from base; the first is the baseline
      gpt-2: {}
      + rope: {positions: rope}

YAML (``.yaml``/``.yml``) or JSON (``.json``). Everything is checked before anything trains, and
an error names the file, the key and what is allowed: a grid that fails after an hour of training
on a typo in its last cell is the failure this module exists to prevent.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from ..configuration_configurable import ConfigurableDecoderConfig
from ..recipe_support.arguments import DataArguments

TOP_LEVEL_KEYS = ("question", "seeds", "base", "training", "cells")
# Set by the grid per cell, or fixed by the runner: a cell may not change them.
MODEL_FIELDS_SET_BY_DATA = ("vocab_size", "max_position_embeddings", "eos_token_id", "bos_token_id", "pad_token_id")


def config_fields() -> set[str]:
    """The fields a cell may set: every field ``ConfigurableDecoderConfig`` declares, except what the data decides."""
    return set(ConfigurableDecoderConfig.__annotations__) - set(MODEL_FIELDS_SET_BY_DATA)


def training_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainingArguments)} | {f.name for f in dataclasses.fields(DataArguments)}


def slug(name: str) -> str:
    """A cell name as a folder name: ``"+ QK-norm"`` -> ``"plus-qk-norm"``."""
    text = name.strip().lower().replace("+", "plus ").replace("-", " ")
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "cell"


@dataclass
class Grid:
    """A parsed grid file. ``cells`` keeps the file's order; the first cell is the baseline the others are compared with."""

    path: Path
    question: str
    seeds: list[int]
    base: dict[str, Any]
    training: dict[str, Any]
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def baseline(self) -> str:
        return next(iter(self.cells))

    def cell_config(self, name: str, **data_fields) -> ConfigurableDecoderConfig:
        """The model config of cell ``name``: ``base``, then the cell's fields, then what the data fixes (vocabulary, context)."""
        try:
            return ConfigurableDecoderConfig(**{**self.base, **self.cells[name], **data_fields})
        except (ValueError, TypeError) as error:
            raise ValueError(f"{self.path}: cell {name!r} does not build: {error}") from error


def _fail(path: Path, message: str) -> None:
    raise ValueError(f"{path}: {message}")


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        _fail(path, "no such grid file (recipes/grids/ holds the examples).")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        raw = yaml.safe_load(text)
    elif path.suffix == ".json":
        raw = json.loads(text)
    else:
        _fail(path, f"a grid file ends in .yaml, .yml or .json, not {path.suffix!r}.")
    if not isinstance(raw, dict):
        _fail(path, f"a grid file holds a mapping with the keys {list(TOP_LEVEL_KEYS)}, got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        _fail(path, f"unknown key(s) {unknown}; a grid file has {list(TOP_LEVEL_KEYS)}.")

    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        _fail(path, f"seeds must be a non-empty list of integers, got {seeds!r}.")
    if len(set(seeds)) != len(seeds):
        _fail(path, f"seeds must be distinct, got {seeds!r}.")

    allowed_model = config_fields()
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        _fail(path, f"base must map ConfigurableDecoderConfig fields to values, got {base!r}.")
    for key in base:
        if key not in allowed_model:
            _fail(path, f"base.{key} is not a ConfigurableDecoderConfig field a grid may set; allowed: {sorted(allowed_model)}.")

    training = raw.get("training") or {}
    if not isinstance(training, dict):
        _fail(path, f"training must map TrainingArguments / DataArguments fields to values, got {training!r}.")
    allowed_training = training_fields()
    for key in training:
        if key not in allowed_training:
            _fail(path, f"training.{key} is not a TrainingArguments or DataArguments field.")

    cells = raw.get("cells")
    if not isinstance(cells, dict) or not cells:
        _fail(path, "cells must be a non-empty mapping of cell name -> fields (the first cell is the baseline).")
    slugs: dict[str, str] = {}
    for name, fields in cells.items():
        fields = fields or {}
        if not isinstance(fields, dict):
            _fail(path, f"cells.{name} must map ConfigurableDecoderConfig fields to values, got {fields!r}.")
        for key in fields:
            if key in allowed_training:  # the token budget (max_steps, batch, block_size) among them
                _fail(path, f"cells.{name}.{key}: a cell sets model fields only; the token budget and optimizer are the grid's "
                            f"`training`, the same for every cell.")
            if key not in allowed_model:
                _fail(path, f"cells.{name}.{key} is not a ConfigurableDecoderConfig field; allowed: {sorted(allowed_model)}.")
        if slug(str(name)) in slugs:
            _fail(path, f"cells {slugs[slug(str(name))]!r} and {name!r} would share the folder {slug(str(name))!r}; rename one.")
        slugs[slug(str(name))] = str(name)
        cells[name] = fields
    grid = Grid(path=path, question=str(raw.get("question", "")), seeds=seeds, base=base, training=training,
                cells={str(k): v for k, v in cells.items()})
    for name in grid.cells:  # every cell builds, before any trains
        grid.cell_config(name, vocab_size=256, max_position_embeddings=int(training.get("block_size", 128)))
    return grid


__all__ = ["Grid", "load_grid", "slug"]
