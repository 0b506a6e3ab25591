"""Past one process: the Trainer recipes under ``accelerate launch`` on CPU processes, and resuming.

Two processes at per-device batch 2 must train exactly what one process trains at batch 4: the
same examples in every global batch, the same loss at every step, and the same weights on both
ranks at the end (DDP averages the gradients before each step). Every launch here runs a recipe
through this file's ``__main__`` (see :func:`_run_recipe_and_record`), which records what the test
compares (the logged losses and the trained weights, per rank) without the recipes knowing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
TINY_GPT = ["--dataset", "text", "--tokenizer", "bpe", "--vocab_size", "300", "--hidden_size", "32", "--num_hidden_layers", "2",
            "--block_size", "32", "--max_steps", "4", "--logging_steps", "1", "--eval_steps", "2", "--max_eval_tokens", "1500",
            "--sample_tokens", "8", "--disable_tqdm", "true", "--model_name", "tiny"]


def accelerate_launch(*options: str) -> list[str]:
    """``accelerate launch`` on a free port, so that launches in parallel test workers do not collide."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is installed with the package"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [accelerate, "launch", "--main_process_port", str(port), *options]


@pytest.fixture(scope="module")
def small_text_file(tmp_path_factory) -> Path:
    from hf_models.data import load_corpus

    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(load_corpus("shakespeare")["validation"][0]["text"][:40_000])
    return path


def run_recorded(launcher: list[str], recipe: str, args: list[str], tmp_path: Path, record: Path, check: bool = True):
    """Run ``recipe`` with ``args`` under ``launcher`` through this file, recording each rank in ``record``."""
    command = launcher + [__file__, str(REPO / "recipes" / f"{recipe}.py"), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODELS_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", RECORD_TRAINING_TO=str(record))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def recorded(record: Path, rank: int) -> tuple[dict[int, float], dict[str, torch.Tensor], dict]:
    """(loss at each logged step, trained weights, what else was recorded) of one rank."""
    info = json.loads((record / f"rank{rank}.json").read_text())
    losses = {entry["step"]: entry["loss"] for entry in info["log_history"] if "loss" in entry}
    return losses, load_file(record / f"rank{rank}.safetensors"), info


def test_two_cpu_processes_train_what_one_process_trains_at_the_same_global_batch(small_text_file, tmp_path):
    data = ["--data_files", str(small_text_file)]
    run_recorded([sys.executable], "04_gpt", [*TINY_GPT, *data, "--output_dir", str(tmp_path / "one"),
                 "--per_device_train_batch_size", "4"], tmp_path, tmp_path / "one-record")
    two = run_recorded(accelerate_launch("--config_file", str(CONFIGS / "multi_cpu.yaml")), "04_gpt",
                       [*TINY_GPT, *data, "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2"],
                       tmp_path, tmp_path / "two-record")

    one_losses, one_weights, one_info = recorded(tmp_path / "one-record", 0)
    rank0_losses, rank0_weights, rank0_info = recorded(tmp_path / "two-record", 0)
    _, rank1_weights, rank1_info = recorded(tmp_path / "two-record", 1)
    assert (one_info["world_size"], rank0_info["world_size"], rank1_info["world_size"]) == (1, 2, 2)

    # The same examples in each global batch, so the same loss at every step (Trainer averages it over ranks).
    assert sorted(one_losses) == sorted(rank0_losses) == [1, 2, 3, 4]
    for step, loss in one_losses.items():
        assert rank0_losses[step] == pytest.approx(loss, abs=1e-5), f"step {step}"
    # DDP keeps the copies equal bit for bit; against one process, only the reduction order differs.
    for name, tensor in rank0_weights.items():
        torch.testing.assert_close(rank1_weights[name], tensor, rtol=0, atol=0)
        torch.testing.assert_close(tensor, one_weights[name], rtol=0, atol=1e-5)

    # One job, written once: one folder, one results.json, one card, one export, by rank 0 only.
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert "on 2 process(es), cpu" in results["training"]["training throughput"]
    assert results["train_steps"] == 4
    saved = load_file(tmp_path / "two" / "tiny" / "model.safetensors")
    torch.testing.assert_close(saved["model.embed_tokens.weight"], rank0_weights["model.embed_tokens.weight"], rtol=0, atol=0)
    assert two.stdout.count("saved to ") == 1 and two.stdout.count("exported as a plain GPT2LMHeadModel") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [".hf_models.lock", "results.json", "tiny", "tiny-gpt2"]


@pytest.mark.parametrize(
    "config, extra, message",
    [
        # torchrun on a CPU-only machine without use_cpu: every process would train its own model.
        ("multi_cpu.yaml", ["--use_cpu", "false"], "did not join one data-parallel job"),
        # accelerate 1.15 leaves a CPU job as DDP whatever the FSDP config says.
        ("fsdp.yaml", [], "asks for FSDP on CPU processes"),
    ],
)
def test_launches_that_would_not_train_as_asked_are_refused(config, extra, message, small_text_file, tmp_path):
    if torch.accelerator.is_available():
        pytest.skip("with an accelerator the processes join over it")
    result = run_recorded(accelerate_launch("--config_file", str(CONFIGS / config)), "04_gpt",
                          [*TINY_GPT, "--data_files", str(small_text_file), "--output_dir", str(tmp_path / "run"), *extra],
                          tmp_path, tmp_path / "record", check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "record").exists()


def test_resumed_run_ends_where_the_uninterrupted_one_does(small_text_file, tmp_path):
    """Checkpoint at step 2, resume from it: steps 3 and 4 and the final weights are identical."""
    common = [*TINY_GPT, "--data_files", str(small_text_file), "--per_device_train_batch_size", "2",
              "--save_strategy", "steps", "--save_steps", "2"]
    run_recorded([sys.executable], "04_gpt", [*common, "--output_dir", str(tmp_path / "whole")], tmp_path, tmp_path / "whole-record")
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files

    # "true" resumes from the latest checkpoint in --output_dir: here, the step-2 one copied alone.
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    run_recorded([sys.executable], "04_gpt", [*common, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "true"],
                 tmp_path, tmp_path / "resumed-record")

    whole_losses, whole_weights, _ = recorded(tmp_path / "whole-record", 0)
    resumed_losses, resumed_weights, _ = recorded(tmp_path / "resumed-record", 0)
    _, _, resumed_info = recorded(tmp_path / "resumed-record", 0)
    assert resumed_info["steps_run"] == 2  # steps 3 and 4; the log of steps 1 and 2 comes from the checkpoint
    assert resumed_losses == whole_losses  # bit for bit: the same data, RNG states and optimizer state
    for name, tensor in whole_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=0)
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["train_steps"] == 4


def test_accelerate_configs_load_with_accelerates_own_loader():
    """Every config in recipes/configs is one accelerate itself reads, with what recipes/configs/README.md says."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {
        "cpu.yaml": (DistributedType.NO, 1),
        "multi_cpu.yaml": (DistributedType.MULTI_GPU, 2),  # torchrun; use_cpu makes it gloo (see the file)
        "multi_gpu.yaml": (DistributedType.MULTI_GPU, 2),
        "two_nodes.yaml": (DistributedType.MULTI_GPU, 2),  # 2 machines x 1 process (tests/test_fsdp.py runs the torchrun twin)
        "fsdp.yaml": (DistributedType.FSDP, 2),
        "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 2),
        "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, 2),
    }
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(expected)
    readme = (CONFIGS / "README.md").read_text()
    for name, (distributed_type, num_processes) in expected.items():
        config = load_config_from_file(str(CONFIGS / name))
        assert (config.distributed_type, config.num_processes) == (distributed_type, num_processes), name
        assert config.mixed_precision == "no" and name in readme  # precision is the recipe's flag (--bf16 true)
    assert load_config_from_file(str(CONFIGS / "multi_cpu.yaml")).use_cpu
    two_nodes = load_config_from_file(str(CONFIGS / "two_nodes.yaml"))
    assert (two_nodes.num_machines, two_nodes.machine_rank, two_nodes.main_process_ip, two_nodes.use_cpu) == (2, 0, "127.0.0.1", True)
    assert load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config["fsdp_version"] == 2
    stages = {name: load_config_from_file(str(CONFIGS / name)).deepspeed_config["zero_stage"] for name in ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml")}
    assert stages == {"deepspeed_zero2.yaml": 2, "deepspeed_zero3.yaml": 3}


def _run_recipe_and_record() -> None:
    """``python tests/test_distributed.py <recipe.py> <flags>``: run the recipe, and after training write
    each rank's logged history and trained weights to ``$RECORD_TRAINING_TO/rank<r>.{json,safetensors}``.

    The recipe runs unchanged (as ``__main__``); ``Trainer.train`` is wrapped for the run only.
    """
    import runpy

    from safetensors.torch import save_file
    from transformers import Trainer, TrainerCallback

    record = Path(os.environ["RECORD_TRAINING_TO"])
    train = Trainer.train

    class CountSteps(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    def train_and_record(self, *args, **kwargs):
        counter = CountSteps()
        self.add_callback(counter)
        output = train(self, *args, **kwargs)
        rank = self.args.process_index
        record.mkdir(parents=True, exist_ok=True)
        weights = {name: tensor.detach().cpu().contiguous() for name, tensor in self.model.state_dict().items()}
        weights = {name: tensor for name, tensor in weights.items() if not name.endswith("lm_head.weight")}  # tied
        save_file(weights, record / f"rank{rank}.safetensors")
        info = {"world_size": self.args.world_size, "log_history": self.state.log_history, "steps_run": counter.steps,
                "distributed_type": str(self.accelerator.distributed_type).split(".")[-1]}
        (record / f"rank{rank}.json").write_text(json.dumps(info))
        return output

    Trainer.train = train_and_record
    recipe, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(recipe, run_name="__main__")


if __name__ == "__main__":
    _run_recipe_and_record()
