"""A run never destroys what the user had: the model name, the save, the card copy, two runs on one
folder, a killed save's leftovers, and resuming from damaged or mismatched checkpoints (issue 17, section 1).

Each data-loss test plants a file the user had and checks it is still there, byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import TrainingArguments

from hf_models.data import load_corpus
from hf_models.files import SAVE_MARKER, atomic, save_folder_atomically
from hf_models.recipe_support import parse_lesson_args
from hf_models.training.loop import TrainingLoop
from tests.helpers import build_tiny_model
from tests.test_training_loop import token_rows

REPO = Path(__file__).resolve().parents[1]
USER_BYTES = b"the user's notes \x00\xff, kept byte for byte\n"
BIGRAM_TINY = ["--max_steps", "2", "--eval_steps", "2", "--logging_steps", "2", "--per_device_train_batch_size", "2",
               "--max_eval_tokens", "1500", "--sample_tokens", "8", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def small_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(load_corpus("shakespeare")["validation"][0]["text"][:40_000])
    return path


def environment(tmp_path: Path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_MODELS_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(REPO))


def run_bigram(small_text_file: Path, tmp_path: Path, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "recipes" / "01_bigram.py"), "--dataset", "text", "--data_files", str(small_text_file),
               *BIGRAM_TINY, *flags]
    result = subprocess.run(command, cwd=tmp_path, env=environment(tmp_path), capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def plant_user_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(USER_BYTES)
    return path


# ----------------------------------------------------------------------------- --model_name


def test_model_name_dot_is_refused_before_training_and_the_output_dir_keeps_its_files(small_text_file, tmp_path):
    notes = plant_user_file(tmp_path / "run" / "notes.txt")
    result = run_bigram(small_text_file, tmp_path, "--output_dir", str(tmp_path / "run"), "--model_name", ".", check=False)
    assert result.returncode != 0
    assert "--model_name '.'" in result.stderr and "one plain folder name" in result.stderr, result.stderr[-2000:]
    assert "training" not in result.stdout.lower()  # refused at parse time
    assert notes.read_bytes() == USER_BYTES


@dataclass
class NoModelArguments:
    hidden_size: int = 8


@pytest.mark.parametrize("name", ["", ".", "..", "/tmp/elsewhere", "a/b", "a\\b", "../sibling"])
def test_a_model_name_that_is_not_one_plain_folder_name_is_refused(name, tmp_path):
    with pytest.raises(ValueError) as error:
        parse_lesson_args(NoModelArguments, defaults=dict(output_dir=str(tmp_path / "run"), model_name="model"),
                          args=["--model_name", name])
    assert f"--model_name {name!r}" in str(error.value) and "plain folder name" in str(error.value)


def test_a_plain_model_name_is_accepted(tmp_path):
    _, _, lesson_args, _ = parse_lesson_args(NoModelArguments, defaults=dict(output_dir=str(tmp_path / "run"), model_name="m"),
                                             args=["--model_name", "tiny-model_v1.0"])
    assert lesson_args.model_name == "tiny-model_v1.0"


# ----------------------------------------------------------------------------- what a save may replace


def test_a_save_refuses_to_replace_a_folder_no_save_wrote(tmp_path):
    notes = plant_user_file(tmp_path / "model" / "notes.txt")
    with pytest.raises(FileExistsError) as error:
        save_folder_atomically(tmp_path / "model", lambda tmp: (tmp / "config.json").write_text("{}"))
    assert "Will not replace" in str(error.value) and "notes.txt" in str(error.value)
    assert notes.read_bytes() == USER_BYTES and [p.name for p in (tmp_path / "model").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left


def test_a_save_replaces_an_earlier_save_an_older_model_folder_and_an_empty_folder(tmp_path):
    write = lambda tmp: (tmp / "config.json").write_text('{"new": true}')  # noqa: E731
    save_folder_atomically(tmp_path / "saved", lambda tmp: (tmp / "weights").write_text("old"))
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "config.json").write_text("{}")  # a model folder saved before the marker existed
    (tmp_path / "empty").mkdir()
    for name in ("saved", "older", "empty"):
        save_folder_atomically(tmp_path / name, write)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == [SAVE_MARKER, "config.json"]


# ----------------------------------------------------------------------------- the card copy


def test_a_run_from_the_repository_root_leaves_the_committed_cards_alone(small_text_file, tmp_path):
    """Run in a folder laid out like the repository: model_cards/bigram.md is untouched, nothing is written outside --output_dir."""
    card = plant_user_file(tmp_path / "model_cards" / "bigram.md")
    before = {p for p in tmp_path.rglob("*")}
    run_bigram(small_text_file, tmp_path, "--output_dir", str(tmp_path / "run"), "--model_name", "tiny")
    assert card.read_bytes() == USER_BYTES
    written = {p for p in tmp_path.rglob("*")} - before
    outside = [p for p in written if not p.is_relative_to(tmp_path / "run") and not p.is_relative_to(tmp_path / "cache")]
    assert outside == [] and (tmp_path / "run" / "tiny" / "README.md").exists()


def test_no_recipe_defaults_to_a_card_copy_in_the_source_tree():
    for recipe in sorted((REPO / "recipes").glob("[0-9][0-9]_*.py")):
        assert "card_copy=" not in recipe.read_text(), recipe.name


# ----------------------------------------------------------------------------- one run per output folder

HOLD_LOCK = """
import sys, time
from hf_models.files import lock_output_dir
lock_output_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_locked_output_dir_fails_fast_and_a_killed_holder_releases_it(small_text_file, tmp_path):
    run_dir = tmp_path / "run"
    notes = plant_user_file(run_dir / "notes.txt")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], env=environment(tmp_path), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        result = run_bigram(small_text_file, tmp_path, "--output_dir", str(run_dir), "--model_name", "tiny", check=False)
        assert result.returncode != 0 and "is in use by another run" in result.stderr, result.stderr[-2000:]
        assert f"pid {holder.pid}" in result.stderr and "--output_dir" in result.stderr
        assert time.perf_counter() - start < 60 and not (run_dir / "tiny").exists()  # before any training
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert notes.read_bytes() == USER_BYTES
    # The kernel released the killed holder's flock: the next process takes it.
    taken = subprocess.run([sys.executable, "-c", "import sys; from hf_models.files import lock_output_dir; lock_output_dir(sys.argv[1])",
                            str(run_dir)], env=environment(tmp_path), capture_output=True, text=True, timeout=60)
    assert taken.returncode == 0, taken.stderr[-2000:]


# ----------------------------------------------------------------------------- a killed save's temporaries

SLOW_SAVE = """
import sys, time
from pathlib import Path
from hf_models.files import save_folder_atomically
def write(tmp):
    (tmp / "model.safetensors").write_bytes(b"half")
    print(tmp, flush=True)
    time.sleep(120)
save_folder_atomically(Path(sys.argv[1]), write)
"""


def test_the_next_save_removes_a_killed_saves_temporary_and_nothing_else(tmp_path):
    killed = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(tmp_path / "model")], env=environment(tmp_path),
                              stdout=subprocess.PIPE, text=True)
    stale = Path(killed.stdout.readline().strip())
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert stale.is_dir() and stale.name.startswith(".model.tmp-") and f"-{killed.pid}-" in stale.name

    host = atomic._host()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        others = [
            tmp_path / f".model.tmp-{host}-{live.pid}-inprogress",  # a live writer's save, still being written
            tmp_path / f".other.tmp-{host}-{killed.pid}-abc123",     # a stale temporary of another destination
            tmp_path / ".model.tmp-abc123",                          # an older unnamed temporary: owner unknown
            tmp_path / f".model.tmp-otherhost-{killed.pid}-abc123",  # another machine's, on a shared disk
        ]
        for folder in others:
            plant_user_file(folder / "notes.txt")
        save_folder_atomically(tmp_path / "model", lambda tmp: (tmp / "config.json").write_text("{}"))
    finally:
        live.kill()
        live.wait()
    assert not stale.exists()
    for folder in others:
        assert (folder / "notes.txt").read_bytes() == USER_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", *(p.name for p in others)])


# ----------------------------------------------------------------------------- resuming: the hand loop


def hand_loop(output_dir: Path, max_steps: int, accumulation: int = 2) -> TrainingLoop:
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
        learning_rate=1e-2, warmup_steps=1, logging_steps=1, save_strategy="steps", save_steps=2, use_cpu=True,
        report_to="none", disable_tqdm=True, seed=0,
    )
    return TrainingLoop(build_tiny_model("zoo_gpt", 30), token_rows(64, seed=3), args, shuffle=True)


@pytest.fixture(scope="module")
def hand_checkpoints(tmp_path_factory) -> Path:
    """A hand-loop run with checkpoint-2 and checkpoint-4."""
    output_dir = tmp_path_factory.mktemp("hand")
    hand_loop(output_dir, 4).train()
    return output_dir


def copy_run(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "run"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_hand_loop_falls_back_from_a_truncated_checkpoint_and_says_so(hand_checkpoints, tmp_path, caplog):
    run = copy_run(hand_checkpoints, tmp_path)
    assert json.loads((run / "checkpoint-4" / "batch_layout.json").read_text()) == {
        "world_size": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    truncate(run / "checkpoint-4" / "optimizer.safetensors")
    loop = hand_loop(run, 5)
    with caplog.at_level(logging.WARNING):
        loop.train(resume_from_checkpoint=True)
    assert "checkpoint-4/optimizer.safetensors" in caplog.text and "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    assert loop.history[0]["step"] == 3  # resumed after step 2


def test_hand_loop_names_the_damaged_file_of_a_named_checkpoint(hand_checkpoints, tmp_path):
    run = copy_run(hand_checkpoints, tmp_path)
    truncate(run / "checkpoint-4" / "model.safetensors")
    with pytest.raises(ValueError, match=r"checkpoint-4/model\.safetensors"):
        hand_loop(run, 6).train(resume_from_checkpoint=str(run / "checkpoint-4"))


def test_hand_loop_refuses_another_gradient_accumulation_or_world_size(hand_checkpoints, tmp_path):
    run = copy_run(hand_checkpoints, tmp_path)
    with pytest.raises(ValueError, match="--gradient_accumulation_steps: 2 in the checkpoint, 1 now"):
        hand_loop(run, 6, accumulation=1).train(resume_from_checkpoint=True)
    layout = run / "checkpoint-4" / "batch_layout.json"
    layout.write_text(json.dumps({**json.loads(layout.read_text()), "world_size": 2}))  # as if saved by 2 processes
    with pytest.raises(ValueError, match=r"processes \(accelerate launch --num_processes\): 2 in the checkpoint, 1 now"):
        hand_loop(run, 6).train(resume_from_checkpoint=True)


# ----------------------------------------------------------------------------- resuming: Trainer (the recipes)


@pytest.fixture(scope="module")
def trainer_checkpoints(small_text_file, tmp_path_factory) -> Path:
    """A bigram recipe run with Trainer's checkpoint-1 and checkpoint-2."""
    work = tmp_path_factory.mktemp("trainer")
    run_bigram(small_text_file, work, "--output_dir", str(work / "run"), "--model_name", "tiny", "--save_strategy", "steps", "--save_steps", "1")
    return work / "run"


def parse_resume(run: Path, *flags: str):
    return parse_lesson_args(NoModelArguments, defaults=dict(output_dir=str(run), per_device_train_batch_size=2),
                             args=["--output_dir", str(run), *flags])


def test_trainer_checkpoints_record_their_batch_layout(trainer_checkpoints):
    assert json.loads((trainer_checkpoints / "checkpoint-2" / "batch_layout.json").read_text()) == {
        "world_size": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}


def test_recipe_resumes_from_the_previous_checkpoint_when_the_latest_is_truncated(trainer_checkpoints, small_text_file, tmp_path):
    run = copy_run(trainer_checkpoints, tmp_path)
    truncate(run / "checkpoint-2" / "model.safetensors")
    result = run_bigram(small_text_file, tmp_path, "--output_dir", str(run), "--model_name", "tiny", "--max_steps", "3",
                        "--resume_from_checkpoint", "true")
    assert "checkpoint-2/model.safetensors" in result.stderr and "resuming from" in result.stderr
    assert json.loads((run / "results.json").read_text())["train_steps"] == 3


def test_recipe_names_the_damaged_file_of_a_named_checkpoint_before_any_work(trainer_checkpoints, tmp_path):
    run = copy_run(trainer_checkpoints, tmp_path)
    truncate(run / "checkpoint-2" / "optimizer.pt")
    with pytest.raises(ValueError) as error:
        parse_resume(run, "--resume_from_checkpoint", str(run / "checkpoint-2"))
    assert "--resume_from_checkpoint" in str(error.value) and "checkpoint-2/optimizer.pt" in str(error.value)


def test_recipe_refuses_to_resume_with_another_gradient_accumulation_or_world_size(trainer_checkpoints, tmp_path):
    run = copy_run(trainer_checkpoints, tmp_path)
    with pytest.raises(ValueError, match="--gradient_accumulation_steps: 1 in the checkpoint, 2 now"):
        parse_resume(run, "--resume_from_checkpoint", "true", "--gradient_accumulation_steps", "2")
    layout = run / "checkpoint-2" / "batch_layout.json"
    layout.write_text(json.dumps({**json.loads(layout.read_text()), "world_size": 2}))  # as if saved by 2 processes
    with pytest.raises(ValueError, match=r"num_processes\): 2 in the checkpoint, 1 now"):
        parse_resume(run, "--resume_from_checkpoint", "true")
    *_, training_args = parse_resume(run, "--resume_from_checkpoint", str(run / "checkpoint-1"))
    assert training_args.resume_from_checkpoint == str(run / "checkpoint-1")
