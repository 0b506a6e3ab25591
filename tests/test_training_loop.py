"""Lesson 7's hand-written loop, proven against transformers: the schedule, loss normalisation under
gradient accumulation, the ``Trainer``'s loss curve, mixed precision, and a resume after a real
SIGKILL that continues bit for bit (on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments, default_data_collator, get_cosine_schedule_with_warmup, get_scheduler

from hf_models.training.loop import TrainingLoop, WarmupCosineSchedule, decay_parameter_groups, read_metrics
from tests.helpers import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
VOCAB, LENGTH = 30, 12


def loop_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, warmup_steps=1,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-3}, weight_decay=0.1,
        max_grad_norm=1.0, logging_steps=1, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        seed=0, train_sampling_strategy="sequential",
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def token_rows(rows: int, seed: int = 0, ragged: bool = False) -> Dataset:
    """``rows`` learnable sequences (counting up from a random id, mod the vocabulary); with ``ragged``,
    row i ignores its last ``2 * (i % 5)`` labels (as padding would)."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (rows, 1), generator=generator)
    ids = (starts + torch.arange(LENGTH)) % VOCAB  # (rows, LENGTH)
    labels = ids.clone()
    if ragged:
        for i in range(rows):
            if i % 5:
                labels[i, -(i % 5) * 2 :] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


# --- the schedule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("min_lr", [0.0, 1e-4])
def test_warmup_cosine_equals_transformers_at_every_step(min_lr):
    total, warmup, peak = 120, 12, 2e-3
    parameter = torch.nn.Parameter(torch.zeros(1))
    theirs_optimizer, ours_optimizer = torch.optim.SGD([parameter], lr=peak), torch.optim.SGD([parameter], lr=peak)
    if min_lr == 0.0:
        theirs = get_cosine_schedule_with_warmup(theirs_optimizer, warmup, total)
    else:
        theirs = get_scheduler("cosine_with_min_lr", theirs_optimizer, warmup, total, scheduler_specific_kwargs={"min_lr": min_lr})
    ours = WarmupCosineSchedule(ours_optimizer, warmup, total, min_lr)
    for step in range(total + 1):
        assert abs(ours.get_last_lr()[0] - theirs.get_last_lr()[0]) <= 1e-12, step
        if step < total:
            theirs_optimizer.step(), ours_optimizer.step()
            theirs.step(), ours.step()
    assert ours.get_last_lr()[0] == pytest.approx(min_lr, abs=1e-12)  # the last step ends on the floor


# --- gradient accumulation -------------------------------------------------------------------------


def gradients(loop: TrainingLoop) -> dict[str, torch.Tensor]:
    loop.accumulate_gradients()
    return {n: p.grad.clone() for n, p in loop.model.named_parameters()}


def test_accumulated_micro_batches_give_the_large_batch_gradient_with_ragged_tokens(tmp_path):
    data = token_rows(8, ragged=True)  # micro-batches of 2 hold 22, 16, 20 and 24 real targets
    large = TrainingLoop(build_tiny_model("zoo_gpt", VOCAB), data, loop_args(tmp_path, per_device_train_batch_size=8), shuffle=False)
    accumulated = TrainingLoop(
        build_tiny_model("zoo_gpt", VOCAB), data,
        loop_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=4), shuffle=False,
    )
    expected, actual = gradients(large), gradients(accumulated)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)

    # The test has teeth: averaging each micro-batch's own mean loss (the old bug) is measurably off.
    model = build_tiny_model("zoo_gpt", VOCAB).train()
    for start in range(0, 8, 2):
        batch = default_data_collator([data[i] for i in range(start, start + 2)])
        (model(**batch).loss / 4).backward()
    worst = max((p.grad - expected[n]).abs().max().item() for n, p in model.named_parameters())
    assert worst > 1e-4


def test_weight_decay_only_on_matrices_as_trainer_does(tmp_path):
    model = build_tiny_model("zoo_modern", VOCAB)
    decayed = {id(p) for p in decay_parameter_groups(model, 0.1)[0]["params"]}
    trainer_decayed = set(Trainer(model=model, args=loop_args(tmp_path)).get_decay_parameter_names(model))
    by_trainer = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in trainer_decayed}
    assert decayed == by_trainer and 0 < len(decayed) < len(list(model.parameters()))


# --- the loop against Trainer ----------------------------------------------------------------------


def test_hand_loop_follows_the_trainer_loss_curve(tmp_path):
    data = token_rows(64, seed=1)
    args = loop_args(tmp_path, max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    loop = TrainingLoop(build_tiny_model("zoo_gpt", VOCAB).train(), data, args, shuffle=False)
    ours = loop.train().losses
    trainer = Trainer(model=build_tiny_model("zoo_gpt", VOCAB).train(), args=args, train_dataset=data)
    trainer.train()
    theirs = {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}
    assert sorted(ours) == sorted(theirs) == list(range(1, 9))
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], abs=1e-4), step
    assert ours[8] < ours[1]


def test_trainer_and_hand_loop_train_every_position_of_random_windows(tmp_path):
    """nanoGPT's windows carry pre-shifted targets; Trainer keeps them because forward names ``shift_labels``."""
    from hf_models.data import RandomWindows

    ids = torch.arange(4000) % VOCAB
    windows = RandomWindows(ids, LENGTH, 32, seed=0)
    args = loop_args(tmp_path, max_steps=4)
    ours = TrainingLoop(build_tiny_model("zoo_gpt", VOCAB).train(), windows, args, shuffle=False).train().losses
    trainer = Trainer(model=build_tiny_model("zoo_gpt", VOCAB).train(), args=args, train_dataset=windows)
    trainer.train()
    theirs = {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}
    assert ours == pytest.approx(theirs, abs=1e-6)
    model = build_tiny_model("zoo_gpt", VOCAB)
    batch = default_data_collator([windows[i] for i in range(4)])
    with torch.no_grad():
        all_positions = model(**batch).loss.item()
        without_last = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    assert ours[1] == pytest.approx(all_positions, abs=1e-6) and abs(all_positions - without_last) > 1e-5


def test_bf16_autocast_trains_on_cpu_and_fp16_asks_for_a_gpu(tmp_path):
    data = token_rows(32)
    fp32 = TrainingLoop(build_tiny_model("zoo_gpt", VOCAB), data, loop_args(tmp_path), shuffle=False).train().losses
    bf16 = TrainingLoop(build_tiny_model("zoo_gpt", VOCAB), data, loop_args(tmp_path, bf16=True), shuffle=False).train().losses
    assert all(abs(bf16[s] - fp32[s]) < 5e-2 for s in fp32) and bf16[4] < bf16[1]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--fp16 needs a CUDA device"):
            TrainingLoop(build_tiny_model("zoo_gpt", VOCAB), data, loop_args(tmp_path, fp16=True, use_cpu=True))


def test_metrics_log_and_evaluation(tmp_path):
    blocks = token_rows(8, seed=2)
    loop = TrainingLoop(
        build_tiny_model("zoo_gpt", VOCAB), token_rows(32), loop_args(tmp_path, eval_steps=2, eval_strategy="steps"),
        eval_dataset=blocks, byte_lengths=torch.ones(VOCAB, dtype=torch.long), shuffle=False,
    )
    result = loop.train()
    records = read_metrics(tmp_path / "run")
    assert records == result.history
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    evaluations = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    for r in evaluations:  # one byte per token here, so bits per byte is the loss in bits
        assert r["eval_bits_per_byte"] == pytest.approx(r["eval_loss"] / 0.6931471805599453, rel=1e-6)
    assert result.tokens_per_second > 0


# --- surviving a SIGKILL ---------------------------------------------------------------------------

TRAIN_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
from transformers import TrainingArguments
from hf_models.training.loop import TrainingLoop
from tests.helpers import build_tiny_model
from tests.test_training_loop import token_rows

output_dir, resume, slow = sys.argv[1], sys.argv[2] == "resume", float(sys.argv[3])
torch.manual_seed(0)
model = build_tiny_model("zoo_gpt", 30, dropout=0.1)  # dropout: the RNG state must survive the kill too
args = TrainingArguments(
    output_dir=output_dir, max_steps=12, per_device_train_batch_size=4, gradient_accumulation_steps=2,
    learning_rate=1e-2, warmup_steps=2, logging_steps=1, save_strategy="steps", save_steps=3, use_cpu=True,
    report_to="none", disable_tqdm=True, seed=0,
)
loop = TrainingLoop(model, token_rows(200, seed=3), args, shuffle=True)
if slow:
    step = loop.train_step
    def slow_step():
        import time
        time.sleep(slow)
        return step()
    loop.train_step = slow_step
loop.train(resume_from_checkpoint=resume)
"""


def run_training(script: Path, output_dir: Path, mode: str, slow: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(output_dir), mode, str(slow)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_run_killed_mid_way_resumes_bit_for_bit(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT.format(repo=str(REPO)))

    uninterrupted = run_training(script, tmp_path / "whole", "fresh")
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err[-3000:]

    killed = run_training(script, tmp_path / "killed", "fresh", slow=0.3)
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "checkpoint-6").exists():  # wait for the second checkpoint, then kill mid-way
        assert killed.poll() is None and time.time() < deadline, killed.communicate()[1][-3000:]
        time.sleep(0.05)
    time.sleep(0.4)  # a step or so past the checkpoint: the log holds records the resumed run must replace
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "checkpoint-12").exists()

    resumed = run_training(script, tmp_path / "killed", "resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]

    def losses(folder: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(folder) if "loss" in r}

    whole, after_kill = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert sorted(after_kill) == sorted(whole) == list(range(1, 13))
    assert after_kill == whole  # bitwise: every logged loss, before and after the kill
    checkpoint = tmp_path / "killed" / "checkpoint-12"
    assert not [p for p in checkpoint.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]  # nothing pickled
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 12


# --- past one process ------------------------------------------------------------------------------

DDP_SCRIPT = """
import hashlib, sys, torch
sys.path.insert(0, {repo!r})
from transformers import TrainingArguments
from hf_models.training.loop import TrainingLoop
from tests.helpers import build_tiny_model
from tests.test_training_loop import token_rows

output_dir, per_device = sys.argv[1], int(sys.argv[2])
args = TrainingArguments(
    output_dir=output_dir, max_steps=4, per_device_train_batch_size=per_device, gradient_accumulation_steps=2,
    learning_rate=1e-2, warmup_steps=1, logging_steps=1, use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
)
loop = TrainingLoop(build_tiny_model("zoo_gpt", 30), token_rows(64, seed=4, ragged=True), args, shuffle=True)
loop.train()
model = loop.accelerator.unwrap_model(loop.model)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
rank = loop.accelerator.process_index
open(f"{{output_dir}}/weights-rank{{rank}}.txt", "w").write(digest)
"""


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    """Real DDP over gloo: 2 processes x 2 examples = 1 process x 4, at every step; both ranks end equal."""
    import shutil

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO)))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # accelerate's launcher starts several CPU processes through torchrun, which it reaches with --multi_gpu
    # (without it, a machine without GPUs gets one process); use_cpu then makes them one gloo DDP group.
    launch = [accelerate, "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    runs = {"one": (["--num_processes", "1", "--cpu"], 4), "two": (["--multi_gpu", "--num_processes", "2"], 2)}
    for name, (processes, per_device) in runs.items():
        (tmp_path / name).mkdir()
        result = subprocess.run([*launch, *processes, str(script), str(tmp_path / name), str(per_device)],
                                env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    one = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r}
    two = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r}
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    digests = [(tmp_path / "two" / f"weights-rank{rank}.txt").read_text() for rank in (0, 1)]
    assert digests[0] == digests[1]
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 4  # written once, by rank 0
