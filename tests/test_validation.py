"""Every mistake named before the first step: flags and folders that cannot work are refused up
front, with the flag, the value and what is allowed (``hf_models/recipe_support/validation.py``)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import TrainingArguments

from hf_models.recipe_support import DataArguments, DecoderArguments, find_model_folder, parse_lesson_args, prepare_lesson_data
from hf_models.recipe_support.validation import check_model_folder

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BlocksModelArguments:
    """Model arguments without a ``sampling`` field, as in lessons 1-3 (packed blocks)."""

    hidden_size: int = 8


def parse(tmp_path: Path, *flags: str, model_arguments_type: type = BlocksModelArguments):
    return parse_lesson_args(model_arguments_type, defaults=dict(output_dir=str(tmp_path / "run")), args=list(flags))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0 is not allowed"),
        (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size 0 is not allowed"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0 is not allowed"),
        (["--max_eval_tokens", "0"], "--max_eval_tokens 0 is not allowed"),
        (["--max_eval_tokens", "1"], "--max_eval_tokens 1 is not allowed"),
        (["--block_size", "0"], "--block_size 0 is not allowed"),
        (["--learning_rate", "-0.001"], "--learning_rate -0.001 is not allowed"),
        (["--learning_rate", "0"], "--learning_rate 0 is not allowed"),
        (["--max_steps", "-1", "--num_train_epochs", "0"], "--max_steps -1 --num_train_epochs 0 trains nothing"),
    ],
)
def test_flags_that_cannot_work_are_refused_by_name(flags, expected, tmp_path):
    with pytest.raises(ValueError) as error:
        parse(tmp_path, *flags)
    message = str(error.value)
    assert expected in message and ("at least" in message or "positive" in message)
    assert "num_samples" not in message


def test_random_windows_check_counts_too(tmp_path):
    with pytest.raises(ValueError, match="--per_device_train_batch_size 0 is not allowed.*at least 1"):
        parse(tmp_path, "--per_device_train_batch_size", "0", model_arguments_type=DecoderArguments)


def test_reasonable_flags_pass(tmp_path):
    *_, data_args, _, training_args = parse(tmp_path, "--max_eval_tokens", "2", "--learning_rate", "1e-3", "--max_steps", "-1",
                                            "--num_train_epochs", "0.5")
    assert (data_args.max_eval_tokens, training_args.num_train_epochs) == (2, 0.5)
    # The write check leaves nothing behind; what is there is the run's lock on --output_dir, held until it exits.
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".hf_models.lock"]


def test_an_output_dir_that_cannot_be_written_is_refused_before_training(tmp_path):
    unwritable = "/proc/hf_models_cannot_write_here/run"  # not even root can create folders in /proc
    with pytest.raises(ValueError) as error:
        parse(tmp_path, "--output_dir", unwritable)
    message = str(error.value)
    assert f"--output_dir {unwritable!r} cannot be written" in message and "Pass a folder you can write to" in message


def test_an_output_dir_that_is_or_lies_under_a_file_is_refused_before_training(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for output_dir, where in ((a_file, "is a file"), (a_file / "run", f"lies under {str(a_file)!r}, which is a file")):
        with pytest.raises(ValueError) as error:
            parse(tmp_path, "--output_dir", str(output_dir))
        assert f"--output_dir {str(output_dir)!r} {where}: it must be a folder" in str(error.value)
    assert a_file.read_text() == "mine"


def test_a_sample_prompt_longer_than_the_context_is_refused_before_training(tmp_path):
    text = tmp_path / "plays.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 20)
    data_args = DataArguments(dataset="text", data_files=[str(text)], block_size=7)
    training_args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, report_to="none")
    with pytest.raises(ValueError) as error:
        prepare_lesson_data(data_args, training_args, "char", sampling="random_windows", sample_prompt="ROMEO:\n")
    message = str(error.value)
    assert "--sample_prompt 'ROMEO:\\n' is 7 tokens" in message and "--block_size 7" in message
    data = prepare_lesson_data(DataArguments(dataset="text", data_files=[str(text)], block_size=8), training_args, "char",
                               sampling="random_windows", sample_prompt="ROMEO:\n")
    assert len(data.tokenizer("ROMEO:\n")["input_ids"]) == 7


# ----------------------------------------------------------------------------- saved model folders


@pytest.fixture
def saved_model(tmp_path) -> Path:
    """A complete tiny model folder: config.json, model.safetensors, tokenizer files."""
    from hf_models.tokenization import build_char_tokenizer
    from tests.helpers import tiny_decoder

    folder = tmp_path / "model"
    tiny_decoder("zoo_modern", vocab_size=32).save_pretrained(folder)
    build_char_tokenizer("ROMEO: but soft\n").save_pretrained(folder)
    return folder


def refusal(folder: Path, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        check_model_folder(folder, "--base_model", **kwargs)
    return str(error.value)


def test_a_complete_model_folder_passes(saved_model):
    assert check_model_folder(saved_model, "--base_model") == saved_model
    assert find_model_folder(str(saved_model.parent), "--base_model", "recipes/05_modern_gpt.py") == saved_model


def test_model_folder_refusals_name_the_flag_the_folder_and_the_file(saved_model, tmp_path):
    assert "--base_model" in refusal(tmp_path / "missing") and "is not a folder" in refusal(tmp_path / "missing")

    (saved_model / "tokenizer.json").unlink()
    (saved_model / "tokenizer_config.json").unlink()
    message = refusal(saved_model)
    assert f"--base_model {str(saved_model)!r} holds a model but no tokenizer" in message and "tokenizer.json" in message
    assert "sentencepiece" not in message
    assert check_model_folder(saved_model, "--model_folder", tokenizer=False) == saved_model

    weights = saved_model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    message = refusal(saved_model, tokenizer=False)
    assert f"{str(weights)!r} is truncated" in message and f"the file has {len(data) - 100}" in message
    weights.write_bytes(data[:4])
    assert "not even the 8-byte header length" in refusal(saved_model, tokenizer=False)
    weights.unlink()
    assert "holds config.json but no weights" in refusal(saved_model, tokenizer=False)

    (saved_model / "config.json").write_text("{}")
    assert "config.json has no model_type" in refusal(saved_model, tokenizer=False)
    (saved_model / "config.json").unlink()
    message = refusal(saved_model, tokenizer=False)
    assert f"--base_model {str(saved_model)!r} holds no model: config.json is missing" in message


@pytest.mark.parametrize(("recipe", "flag"), [("06_kv_cache", "--model_folder"), ("09_quantization", "--model")])
def test_lessons_that_load_a_model_refuse_a_folder_without_one(recipe, flag, tmp_path):
    """Lesson 6 used to time random weights for a mistyped --model_folder, or one without config.json."""
    for folder in (tmp_path / "typo", tmp_path):
        command = [sys.executable, str(REPO / "recipes" / f"{recipe}.py"), flag, str(folder), "--output_dir", str(tmp_path / "run")]
        result = subprocess.run(command, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and f"{flag} {str(folder)!r}" in result.stderr, result.stderr[-3000:]
        assert "random" not in result.stdout


# ----------------------------------------------------------------------------- library log lines


def test_a_library_warning_in_a_loop_is_shown_once(caplog):
    """Lesson 9 printed bitsandbytes' MatMul8bitLt cast warning at every int8 forward (13,048 times)."""
    import bitsandbytes as bnb
    import torch

    from hf_models.library_logs import ONCE_PER_MESSAGE, OncePerMessage, quiet_library_logs

    quiet_library_logs()  # what ``import hf_models`` runs
    for name in ONCE_PER_MESSAGE:  # forget what earlier tests in this process already showed
        for once in (f for f in logging.getLogger(name).filters if isinstance(f, OncePerMessage)):
            once.seen.clear()
    layer = bnb.nn.Linear8bitLt(16, 16, bias=False, has_fp16_weights=False).to("cpu").eval()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        for _ in range(20):
            layer(torch.randn(2, 16))
    casts = [r for r in caplog.records if "MatMul8bitLt: inputs will be cast" in r.getMessage()]
    assert len(casts) == 1


def test_the_missing_kernels_package_line_is_not_printed_by_a_recipe():
    result = subprocess.run([sys.executable, str(REPO / "recipes" / "01_bigram.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Failed to load CPU gemm_4bit_forward" not in result.stderr
