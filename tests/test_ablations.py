"""Lesson 12's ablation runner: grid files are checked before training, runs are bitwise reproducible, a killed grid resumes.

The end-to-end tests run ``recipes/12_ablations.py`` itself on a tiny grid: once straight through,
once killed mid-cell and run again. The second must skip the cells that had finished, continue the
cell that was running from its checkpoint, and end with exactly the first run's curves.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_models.experiments import load_grid, summarise
from hf_models.experiments.ablation import NOISE_STANDARD_ERRORS
from hf_models.data import load_corpus

REPO = Path(__file__).resolve().parents[1]
TINY_GRID = """
question: does RoPE help a tiny model?
seeds: [0, 1]
base: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, bias: false}
training: {block_size: 32, max_steps: 8, per_device_train_batch_size: 2, eval_steps: 2, logging_steps: 1, warmup_steps: 1,
           max_eval_tokens: 1500, max_eval_blocks: 4}
cells:
  GPT-2 blocks: {}
  + RoPE: {positions: rope}
"""
# Runs the recipe with every optimizer step slowed down, so the test can kill it between two checkpoints.
SLOW_RUN = """
import runpy, sys, time
from hf_models.training.loop import TrainingLoop
step = TrainingLoop.train_step
def slow_step(self):
    time.sleep(0.25)
    return step(self)
TrainingLoop.train_step = slow_step
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("ablation")
    (folder / "grid.yaml").write_text(TINY_GRID)
    (folder / "plays.txt").write_text(load_corpus("shakespeare")["validation"][0]["text"][:30_000])
    (folder / "slow.py").write_text(SLOW_RUN)
    return dict(folder=folder, grid=folder / "grid.yaml", text=folder / "plays.txt", slow=folder / "slow.py")


def recipe_command(setup: dict, output_dir: Path, slow: bool = False) -> tuple[list[str], dict]:
    recipe = str(REPO / "recipes" / "12_ablations.py")
    command = [sys.executable, *([str(setup["slow"])] if slow else []), recipe, "--grid", str(setup["grid"]), "--dataset", "text",
               "--data_files", str(setup["text"]), "--vocab_size", "300", "--output_dir", str(output_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODELS_CACHE=str(setup["folder"] / "cache"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return command, env


def run_recipe(setup: dict, output_dir: Path) -> str:
    command, env = recipe_command(setup, output_dir)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def cell_results(output_dir: Path) -> dict[tuple[str, int], dict]:
    results = {}
    for path in sorted((output_dir / "cells").glob("*/seed-*/result.json")):
        result = json.loads(path.read_text())
        results[(result["cell"], result["seed"])] = result
    return results


@pytest.mark.slow
def test_a_grid_killed_mid_cell_resumes_and_ends_bitwise_equal_to_an_uninterrupted_one(setup, tmp_path):
    stdout = run_recipe(setup, tmp_path / "whole")
    whole = cell_results(tmp_path / "whole")
    assert set(whole) == {("GPT-2 blocks", 0), ("GPT-2 blocks", 1), ("+ RoPE", 0), ("+ RoPE", 1)}
    assert "beyond seed noise" in stdout and "| GPT-2 blocks |" in stdout

    # Kill the slowed-down run once the third run (+ RoPE, seed 0) has written its second checkpoint.
    command, env = recipe_command(setup, tmp_path / "killed", slow=True)
    killed = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    third = tmp_path / "killed" / "cells" / "plus-rope" / "seed-0"
    deadline = time.time() + 300
    while not (third / "checkpoint-4").exists():
        assert killed.poll() is None and time.time() < deadline, killed.communicate()[1][-3000:]
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert not (third / "result.json").exists()
    finished = {path: path.stat().st_mtime_ns for path in (tmp_path / "killed" / "cells").glob("*/seed-*/result.json")}
    assert len(finished) == 2  # both seeds of the baseline

    run_recipe(setup, tmp_path / "killed")
    after = cell_results(tmp_path / "killed")
    assert {path: path.stat().st_mtime_ns for path in finished} == finished  # finished cells were not re-run
    assert after[("+ RoPE", 0)]["resumed_from_step"] >= 4  # the half-finished cell continued from its checkpoint
    assert after[("+ RoPE", 1)]["resumed_from_step"] is None
    for key, result in whole.items():  # and every curve is bitwise the uninterrupted one
        assert after[key]["losses"] == result["losses"], key
        assert after[key]["curve"] == result["curve"], key
        assert after[key]["validation"] == result["validation"], key
    assert not list((tmp_path / "killed" / "cells").glob("*/seed-*/checkpoint-*"))  # checkpoints go once a cell is done

    # The same seed and config, run again from nothing: the same bits.
    rerun = tmp_path / "rerun"
    run_recipe(setup, rerun)
    assert cell_results(rerun)[("GPT-2 blocks", 0)]["losses"] == whole[("GPT-2 blocks", 0)]["losses"]
    # ...and a different seed a different curve (so the equality above is not vacuous).
    assert whole[("GPT-2 blocks", 0)]["losses"] != whole[("GPT-2 blocks", 1)]["losses"]

    # What the recipe writes: tables, plot, the leaderboard's results.json, one TensorBoard run per cell.
    for name in ("results.md", "results.csv", "curves.png", "results.json"):
        assert (tmp_path / "whole" / name).is_file(), name
    results = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert 0 < results["validation"]["bits_per_byte"] < 16 and results["best_cell"] in ("GPT-2 blocks", "+ RoPE")
    assert [row["cell"] for row in results["rows"]] == ["GPT-2 blocks", "+ RoPE"]
    pytest.importorskip("tensorboard")  # optional for users; installed with the dev extras, so CI checks it
    assert list((tmp_path / "whole" / "cells" / "plus-rope" / "seed-0" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_cell_folder_run_with_other_settings_is_refused(setup, tmp_path):
    run_recipe(setup, tmp_path / "run")
    command, env = recipe_command(setup, tmp_path / "run")
    result = subprocess.run([*command, "--learning_rate", "1e-3"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "run with other settings (different: ['training'])" in result.stderr and "Delete that folder" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--eval_steps", "3"], r"--eval_steps 3 must be a multiple of --logging_steps 2"),
     (["--eval_steps", "0.5"], r"--eval_steps must be a positive number of steps.*got 0.5")],
)
def test_flags_that_would_break_resuming_are_refused_before_training(flags, message, setup, tmp_path):
    command, env = recipe_command(setup, tmp_path / "run")
    result = subprocess.run([*command, "--logging_steps", "2", *flags], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and re.search(message, result.stderr), result.stderr[-2000:]
    assert not (tmp_path / "run" / "cells").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cells: {a: {positionz: rope}}", r"cells.a.positionz is not a ConfigurableDecoderConfig field"),
        ("cells: {a: {max_steps: 10}}", r"cells.a.max_steps: a cell sets model fields only; the token budget"),
        ("cells: {a: {positions: alibi}}", r"cell 'a' does not build: ConfigurableDecoderConfig.positions must be one of"),
        ("seeds: [0, 0]\ncells: {a: {}}", r"seeds must be distinct, got \[0, 0\]"),
        ("seeds: []\ncells: {a: {}}", r"seeds must be a non-empty list of integers"),
        ("cells: {}", r"cells must be a non-empty mapping"),
        ("cells: {a: {}}\nmodel: {}", r"unknown key\(s\) \['model'\]"),
        ("training: {lr: 1}\ncells: {a: {}}", r"training.lr is not a TrainingArguments or DataArguments field"),
        ("cells: {+ rope: {}, plus rope: {}}", r"would share the folder 'plus-rope'"),
    ],
)
def test_grid_file_errors_name_the_file_and_the_key(text, message, tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_grid(path)
    assert str(path) in str(pytest.raises(ValueError, load_grid, path).value)


def test_json_grids_load_and_other_suffixes_are_refused(tmp_path):
    (tmp_path / "grid.json").write_text(json.dumps({"seeds": [1, 2], "cells": {"a": {}, "b": {"norm": "rmsnorm"}}}))
    grid = load_grid(tmp_path / "grid.json")
    assert grid.seeds == [1, 2] and grid.baseline == "a" and grid.cells["b"] == {"norm": "rmsnorm"}
    (tmp_path / "grid.toml").write_text("")
    with pytest.raises(ValueError, match=r"ends in .yaml, .yml or .json, not '.toml'"):
        load_grid(tmp_path / "grid.toml")


def test_default_grid_builds_every_cell():
    grid = load_grid(REPO / "recipes" / "grids" / "modern_blocks.yaml")
    assert len(grid.seeds) >= 3 and grid.baseline == "GPT-2 blocks"
    assert {"positions", "norm", "feed_forward", "num_key_value_heads", "qk_norm"} == \
        {key for changes in grid.cells.values() for key in changes}


def run(bpb: list[float], cell: str) -> list[dict]:
    return [dict(cell=cell, seed=i, validation={"bits_per_byte": v}, parameters=10, tokens_per_second=1.0,
                 memory_bytes={"total": 2**20}) for i, v in enumerate(bpb)]


def test_a_difference_is_beyond_noise_only_when_it_exceeds_two_standard_errors(tmp_path):
    (tmp_path / "grid.json").write_text(json.dumps({"cells": {"base": {}, "clear": {"norm": "rmsnorm"}, "noisy": {"qk_norm": True}}}))
    grid = load_grid(tmp_path / "grid.json")
    rows = summarise(grid, {"base": run([2.00, 2.01, 2.02], "base"), "clear": run([1.90, 1.91, 1.92], "clear"),
                            "noisy": run([1.95, 2.05, 2.00], "noisy")})
    base, clear, noisy = rows
    assert base["bpb_mean"] == pytest.approx(2.01) and base["bpb_std"] == pytest.approx(0.01)
    assert clear["delta_bpb"] == pytest.approx(-0.10) and clear["beyond_noise"]
    assert clear["delta_standard_errors"] == pytest.approx(0.10 / ((0.01**2 / 3 + 0.01**2 / 3) ** 0.5))
    assert noisy["delta_bpb"] == pytest.approx(-0.01) and not noisy["beyond_noise"]
    assert noisy["delta_standard_errors"] < NOISE_STANDARD_ERRORS and not base["beyond_noise"]


@pytest.mark.slow
def test_the_grid_runs_data_parallel_under_accelerate_launch_like_one_process(setup, tmp_path):
    """Two gloo processes with 2 windows each follow the curve of one process with 4 (same global batch, same windows)."""
    import shutil

    grid = tmp_path / "grid.yaml"
    grid.write_text(TINY_GRID.replace("seeds: [0, 1]", "seeds: [0]").replace("  + RoPE: {positions: rope}\n", ""))
    one = {**setup, "grid": grid}
    command, env = recipe_command(one, tmp_path / "one")
    result = subprocess.run([*command, "--per_device_train_batch_size", "4"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    command, env = recipe_command(one, tmp_path / "two")
    launch = [accelerate, "launch", "--config_file", str(REPO / "recipes" / "configs" / "multi_cpu.yaml"), *command[1:]]
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    single, double = cell_results(tmp_path / "one")[("GPT-2 blocks", 0)], cell_results(tmp_path / "two")[("GPT-2 blocks", 0)]
    settings = json.loads((tmp_path / "two" / "cells" / "gpt-2-blocks" / "seed-0" / "cell.json").read_text())
    assert settings["world_size"] == 2 and single["train_tokens"] == double["train_tokens"]
    assert single["losses"]["step"] == double["losses"]["step"]
    assert max(abs(a - b) for a, b in zip(single["losses"]["loss"], double["losses"]["loss"])) < 1e-4
    assert double["validation"]["bits_per_byte"] == pytest.approx(single["validation"]["bits_per_byte"], abs=1e-4)
