"""Lesson 7's hand loop sharded with FSDP2 (``--fsdp``), in real gloo processes on CPU.

Each check launches ``torchrun`` (or plain ``python`` for one process) on a tiny GPT and compares
what the runs wrote: the logged losses (``metrics.jsonl``), the gathered ``save_pretrained`` folder
and the measured memory per process. Every launch gets a free port and a timeout.

* 2 FSDP processes train what 1 plain process trains at the same global batch (losses to 1e-5 over
  20 steps), hold half of the parameters, gradients and optimizer state each, and save one ordinary
  folder that ``from_pretrained`` loads;
* two single-process "nodes" (``torchrun --nnodes 2 --node_rank 0|1``, rendezvous on localhost) do too;
* a sharded run killed with SIGKILL (every process) and resumed from its ``torch.distributed.checkpoint``
  shards logs the uninterrupted run's losses bit for bit, and ends on the same weights;
* bad ``--fsdp`` settings are refused before any work, naming the flag.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from hf_models import GPTForCausalLM
from hf_models.training.loop import TrainingLoop, check_fsdp_args, read_metrics
from tests.helpers import build_tiny_model
from tests.test_training_loop import token_rows

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_STEPS, GLOBAL_BATCH, ACCUMULATION = 20, 5, 8, 2
TIMEOUT = 120  # seconds per launch; a hung collective fails the test instead of the suite

SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
from transformers import TrainingArguments
from hf_models.training.loop import TrainingLoop
from tests.helpers import build_tiny_model

def token_rows(rows, vocab=30, length=12):  # tests.test_training_loop.token_rows(rows, seed=4, ragged=True), without importing pytest
    import torch
    starts = torch.randint(0, vocab, (rows, 1), generator=torch.Generator().manual_seed(4))
    ids = (starts + torch.arange(length)) % vocab
    labels = ids.clone()
    for i in range(rows):
        if i % 5:
            labels[i, -(i % 5) * 2:] = -100
    return [dict(input_ids=i, labels=l) for i, l in zip(ids, labels)]

output_dir, fsdp, dropout, slow = sys.argv[1], sys.argv[2] == "fsdp", float(sys.argv[3]), float(sys.argv[4])
os.makedirs(output_dir, exist_ok=True)
world = int(os.environ.get("WORLD_SIZE", "1"))
with open(os.path.join(output_dir, "pid-rank" + os.environ.get("RANK", "0")), "w") as f:
    f.write(str(os.getpid()))  # for the test's SIGKILL
args = TrainingArguments(
    output_dir=output_dir, max_steps={steps}, per_device_train_batch_size={global_batch} // ({accumulation} * world),
    gradient_accumulation_steps={accumulation}, learning_rate=1e-2, warmup_steps=2, logging_steps=1, save_strategy="steps",
    save_steps={save_steps}, use_cpu=True, report_to="none", disable_tqdm=True, seed=0, fsdp="full_shard" if fsdp else None,
)
loop = TrainingLoop(build_tiny_model("zoo_gpt", 30, dropout=dropout), token_rows(400), args, shuffle=True)
if slow:
    step = loop.train_step
    def slow_step():
        time.sleep(slow)
        return step()
    loop.train_step = slow_step
result = loop.train(resume_from_checkpoint=any(name.startswith("checkpoint-") for name in os.listdir(output_dir)))
from torch.distributed.fsdp import FSDPModule
units = [name for name, module in loop.model.named_modules() if isinstance(module, FSDPModule)]
model = loop.full_model()  # FSDP: the shards gathered on rank 0 (a collective); None elsewhere
if model is not None:
    model.save_pretrained(os.path.join(output_dir, "saved"))
    with open(os.path.join(output_dir, "memory.json"), "w") as f:
        json.dump(dict(result.memory, sharded_units=units), f)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(script: Path, output_dir: Path, *, processes: int = 1, fsdp: bool = False, dropout: float = 0.0, slow: float = 0.0,
           node_rank: int | None = None, port: int | None = None) -> subprocess.Popen:
    """One process with ``python``; several with ``torchrun`` on this machine; or, with ``node_rank``, one
    "node" of a two-node job (``torchrun --nnodes 2``) whose rendezvous is ``127.0.0.1:port``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1"]
    if node_rank is not None:
        launcher = [*torchrun, "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1", "--master_port", str(port)]
    elif processes > 1:
        launcher = [*torchrun, "--nproc_per_node", str(processes), "--master_port", str(free_port())]
    else:
        launcher = [sys.executable]
    command = [*launcher, str(script), str(output_dir), "fsdp" if fsdp else "plain", str(dropout), str(slow)]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*runs: subprocess.Popen) -> None:
    for run in runs:
        try:
            _, err = run.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            run.kill()
            _, err = run.communicate()
        assert run.returncode == 0, err[-4000:]


def losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same 20 steps at global batch 8: one plain process (batch 4 x 2 accumulation), two FSDP processes
    (2 x 2 x 2), and two FSDP "nodes" of one process each."""
    root = tmp_path_factory.mktemp("fsdp")
    script = root / "train.py"
    script.write_text(SCRIPT.format(repo=str(REPO), steps=STEPS, save_steps=SAVE_STEPS, global_batch=GLOBAL_BATCH, accumulation=ACCUMULATION))
    folders = {name: root / name for name in ("one", "two", "nodes")}
    port = free_port()
    finish(  # at once: independent jobs, each on its own port
        launch(script, folders["one"]),
        launch(script, folders["two"], processes=2, fsdp=True),
        *(launch(script, folders["nodes"], fsdp=True, node_rank=rank, port=port) for rank in (0, 1)),
    )
    return {"script": script, **folders}


def test_two_fsdp_processes_train_what_one_process_trains(runs):
    one, two = losses(runs["one"]), losses(runs["two"])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    worst = max(abs(two[step] - one[step]) for step in one)
    assert worst <= 1e-5, f"largest loss difference {worst:.2e}"
    assert one[STEPS] < one[1]  # it learned
    assert len((runs["two"] / "metrics.jsonl").read_text().splitlines()) == STEPS  # written once, by rank 0


def test_two_nodes_on_localhost_train_what_one_process_trains(runs):
    one, nodes = losses(runs["one"]), losses(runs["nodes"])
    assert sorted(nodes) == list(range(1, STEPS + 1))
    worst = max(abs(nodes[step] - one[step]) for step in one)
    assert worst <= 1e-5, f"largest loss difference {worst:.2e}"


def test_the_gathered_save_is_an_ordinary_folder_that_from_pretrained_loads(runs):
    one = GPTForCausalLM.from_pretrained(runs["one"] / "saved")
    for name in ("two", "nodes"):
        folder = runs[name] / "saved"
        assert sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")) == ["model.safetensors"]
        gathered = GPTForCausalLM.from_pretrained(folder)
        assert type(gathered) is GPTForCausalLM and gathered.config.architectures == ["GPTForCausalLM"]
        whole = load_file(folder / "model.safetensors")
        assert all(not name.startswith("_fsdp") for name in whole)
        for key, tensor in one.state_dict().items():  # whole tensors, every one, within rounding of one process's
            torch.testing.assert_close(gathered.state_dict()[key], tensor, rtol=0, atol=1e-4, msg=key)
        ids = torch.arange(12).unsqueeze(0)
        torch.testing.assert_close(gathered(ids).logits, one(ids).logits, rtol=0, atol=1e-4)


def test_each_process_holds_its_share_of_the_parameters_gradients_and_optimizer_state(runs):
    one = json.loads((runs["one"] / "memory.json").read_text())
    two = json.loads((runs["two"] / "memory.json").read_text())
    model = build_tiny_model("zoo_gpt", 30)
    # Every decoder layer is its own unit (gathered and freed alone), and the root holds the rest.
    layers = [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    assert (one.pop("sharded_units"), two.pop("sharded_units")) == ([], ["", *layers])
    # fully_shard splits every tensor along dim 0 into 2 chunks; rank 0's is the larger, ceil(rows / 2).
    largest_shard = sum(-(-p.shape[0] // 2) * p[0].numel() * p.element_size() for p in model.parameters())
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    assert set(one) == set(two) == {"parameters", "gradients", "optimizer state"}
    for part in one:
        assert one[part]["per_process"] == one[part]["one_process"] == two[part]["one_process"], part  # one process holds all
        assert two[part]["per_process"] < one[part]["per_process"], part
    for part in ("parameters", "gradients"):
        assert (one[part]["per_process"], two[part]["per_process"]) == (whole, largest_shard), part
    assert two["optimizer state"]["per_process"] >= 2 * largest_shard  # AdamW's two moments, per shard


def test_sharded_resume_after_sigkill_is_bitwise(runs, tmp_path):
    """Every process killed with SIGKILL after the second sharded checkpoint; the resumed run logs the
    uninterrupted run's losses at every step and saves the same weights, bit for bit."""
    script, whole, killed = runs["script"], runs["two"], tmp_path / "killed"
    run = launch(script, killed, processes=2, fsdp=True, slow=0.2)
    deadline = time.time() + TIMEOUT
    while not (killed / f"checkpoint-{2 * SAVE_STEPS}").exists():
        assert run.poll() is None and time.time() < deadline, run.communicate()[1][-4000:]
        time.sleep(0.05)
    time.sleep(0.5)  # a step or so past it: the log holds records the resumed run must replace
    pids = [int((killed / f"pid-rank{rank}").read_text()) for rank in (0, 1)]
    for pid in (*pids, run.pid):  # the workers and their torchrun, as a machine dying would
        os.kill(pid, signal.SIGKILL)
    run.wait(timeout=30)
    assert run.returncode == -signal.SIGKILL and not (killed / "saved").exists()
    assert not (killed / f"checkpoint-{STEPS}").exists()

    checkpoint = killed / f"checkpoint-{2 * SAVE_STEPS}"
    shards = sorted(p.name for p in (checkpoint / "sharded").iterdir())
    assert ".metadata" in shards and len([s for s in shards if s.endswith(".distcp")]) == 2  # one per process
    assert not (checkpoint / "model.safetensors").exists()  # no process ever held the whole model to save it
    assert json.loads((checkpoint / "batch_layout.json").read_text())["world_size"] == 2

    finish(launch(script, killed, processes=2, fsdp=True))  # resumes from the newest checkpoint-<step>
    assert losses(killed) == losses(whole)  # bitwise, every step, before and after the kill
    saved, expected = load_file(killed / "saved" / "model.safetensors"), load_file(whole / "saved" / "model.safetensors")
    assert saved.keys() == expected.keys()
    for key in expected:
        assert torch.equal(saved[key], expected[key]), key


def test_a_sharded_checkpoint_is_not_resumed_without_fsdp(runs, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, use_cpu=True,
                             report_to="none", disable_tqdm=True)
    loop = TrainingLoop(build_tiny_model("zoo_gpt", 30), token_rows(64), args)
    with pytest.raises(ValueError, match="was saved with --fsdp .* this run is without it"):
        loop.train(resume_from_checkpoint=runs["two"] / f"checkpoint-{SAVE_STEPS}")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(fsdp="offload"), r"--fsdp with cpu_offload=True .* Allowed: --fsdp, --fsdp full_shard or --fsdp shard_grad_op"),
        (dict(fsdp="full_shard", fsdp_config={"version": 1}), r"--fsdp with version=1"),
        (dict(fsdp="full_shard"), r"--fsdp shards the model across the launched processes, and this run is 1 process"),
    ],
)
def test_fsdp_settings_the_hand_loop_does_not_honour_are_refused(settings, message, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, use_cpu=True, report_to="none", **settings)
    with pytest.raises(ValueError, match=message):
        check_fsdp_args(args)
    with pytest.raises(ValueError, match=message):  # the loop checks before it builds anything
        TrainingLoop(build_tiny_model("zoo_gpt", 30), token_rows(16), args)


def test_trainer_recipes_refuse_fsdp_on_cpus_before_any_work(tmp_path):
    from hf_models.recipe_support import DecoderArguments, parse_lesson_args

    if torch.accelerator.is_available():
        pytest.skip("on an accelerator, Trainer's FSDP is accelerate's to run")
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--fsdp asks Trainer for FSDP, and this run is on CPUs .* recipes/07_training.py --fsdp full_shard"):
        parse_lesson_args(DecoderArguments, defaults=dict(output_dir=str(output_dir)), args=["--fsdp", "full_shard", "--max_steps", "2"])
    assert not output_dir.exists()


@pytest.mark.slow
def test_lesson_7_trains_sharded_under_torchrun_and_saves_a_whole_folder(tmp_path):
    """The recipe itself: --fsdp without --skip_comparison is refused before any work on CPUs (Trainer cannot
    shard there); with it, 2 FSDP processes train, print and record the memory table, and save one folder."""
    from hf_models.data import load_corpus

    corpus = tmp_path / "plays.txt"
    corpus.write_text(load_corpus("shakespeare")["validation"][0]["text"][:20_000])
    flags = ["--dataset", "text", "--data_files", str(corpus), "--model_name", "tiny", "--tokenizer", "bpe", "--vocab_size", "300",
             "--hidden_size", "32", "--num_hidden_layers", "2", "--block_size", "32", "--max_steps", "4", "--eval_steps", "2",
             "--logging_steps", "2", "--max_eval_tokens", "1500", "--sample_tokens", "8", "--disable_tqdm", "true",
             "--per_device_train_batch_size", "2", "--skip_tricks", "true", "--fsdp", "full_shard", "--output_dir", str(tmp_path / "run")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODELS_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    recipe = str(REPO / "recipes" / "07_training.py")

    refused = subprocess.run([*torchrun, "--master_port", str(free_port()), recipe, *flags], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert refused.returncode != 0 and "Add --skip_comparison true" in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "run").exists()

    ran = subprocess.run([*torchrun, "--master_port", str(free_port()), recipe, *flags, "--skip_comparison", "true"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-4000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    memory = results["memory_per_process"]
    assert (memory["processes"], memory["fsdp"]) == (2, True)
    assert all(0 < part["per_process"] < part["one_process"] for part in memory["bytes"].values())
    assert ran.stdout.count("memory per process, 2 process(es)") == 1  # printed once, by rank 0
    assert "FSDP2" in results["training"]["parallelism"]
    assert GPTForCausalLM.from_pretrained(tmp_path / "run" / "tiny").num_parameters() == results["parameters"]
