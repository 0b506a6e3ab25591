"""What a user of the lessons trips on: how saved folders come out, what the saved tokenizer says,
and the messages for flags that cannot work.

Each test runs the code a recipe runs (``save_folder_atomically``, ``finish_lesson``,
``export_for_serving``, ``parse_lesson_args``, ``load_lesson_corpus``) in-process on tiny models.
"""

from __future__ import annotations

import ast
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer, TrainingArguments, pipeline

from hf_models.benchmarking import describe_machine
from hf_models.conversion import export_for_serving
from hf_models.files import SAVE_MARKER, atomic, save_folder_atomically, write_json_atomically
from hf_models.recipe_support import (
    DataArguments,
    DecoderArguments,
    LessonArguments,
    choose_bf16,
    evaluate_splits,
    finish_lesson,
    load_lesson_corpus,
    parse_lesson_args,
    prepare_lesson_data,
)
from hf_models.tokenization import build_char_tokenizer, token_byte_lengths
from tests.helpers import tiny_decoder

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
CONTEXT = 32


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(TEXT)


@pytest.fixture
def umask(request):
    """Run the test under ``request.param`` as the process umask, and put the old one back after."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    """Permission bits of ``folder`` and of everything under it, by relative path."""
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def leftovers(parent: Path, keep: str) -> list[str]:
    """Entries of ``parent`` other than ``keep``: the temporary folders an atomic save must not leave."""
    return sorted(p.name for p in parent.iterdir() if p.name != keep)


# ----------------------------------------------------------------------------- atomic saving


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], indirect=True, ids=["umask022", "umask077", "umask002"])
def test_atomic_folder_has_the_permissions_of_a_plain_write(umask, tokenizer, tmp_path):
    model = tiny_decoder("zoo_modern", len(tokenizer), max_position_embeddings=CONTEXT)
    model.save_pretrained(tmp_path / "plain")
    save_folder_atomically(tmp_path / "atomic" / "model", model.save_pretrained)

    atomic_modes = modes(tmp_path / "atomic" / "model")
    plain_modes = modes(tmp_path / "plain")
    assert atomic_modes.pop(SAVE_MARKER) == 0o666 & ~umask  # the one file the atomic save adds: "a save wrote this folder"
    assert atomic_modes.keys() == plain_modes.keys()
    # Every file but model.safetensors keeps the mode a plain save_pretrained gives it; that one is
    # 0600 from safetensors whatever the umask, and the atomic save makes it a plain write's mode too.
    assert {k: v for k, v in atomic_modes.items() if k != "model.safetensors"} == {
        k: v for k, v in plain_modes.items() if k != "model.safetensors"
    }
    json_files = [name for name in atomic_modes if name.endswith(".json")]
    assert "config.json" in json_files and "model.safetensors" in atomic_modes
    assert atomic_modes["."] == 0o777 & ~umask
    assert {atomic_modes[name] for name in [*json_files, "model.safetensors"]} == {0o666 & ~umask}
    if umask == 0o022:  # the usual case, spelled out: what a teammate or a server needs to read it
        assert (atomic_modes["."], atomic_modes["config.json"]) == (0o755, 0o644)


@pytest.mark.parametrize("umask", [0o022], indirect=True, ids=["umask022"])
def test_saved_weights_are_readable_by_others_like_every_other_file(umask, tokenizer, tmp_path):
    """safetensors >= 0.8 writes model.safetensors at 0600 whatever the umask (safetensors#782); the
    atomic save gives every file the mode a plain write would have."""
    model = tiny_decoder("zoo_gpt", len(tokenizer), max_position_embeddings=CONTEXT)
    save_folder_atomically(tmp_path / "model", model.save_pretrained)
    assert stat.S_IMODE((tmp_path / "model" / "model.safetensors").stat().st_mode) == 0o644


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True, ids=["umask022", "umask077"])
def test_atomic_json_has_the_permissions_and_contents_of_a_plain_open(umask, tmp_path):
    payload = {"validation": {"bits_per_byte": 2.1, "loss": 3.9}, "sample": "ROMEO:\nà"}
    write_json_atomically(tmp_path / "atomic.json", payload)
    with open(tmp_path / "plain.json", "w") as f:
        json.dump(payload, f)

    assert stat.S_IMODE((tmp_path / "atomic.json").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "atomic.json").stat().st_mode) == 0o666 & ~umask
    assert json.loads((tmp_path / "atomic.json").read_text()) == payload
    assert leftovers(tmp_path, "atomic.json") == ["plain.json"]


@pytest.fixture(params=["exchange", "two renames"])
def replace_mode(request, monkeypatch):
    """Both ways an existing folder is replaced: renameat2's one-step swap, and the fallback."""
    if request.param == "two renames":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    return request.param


def earlier_save(folder: Path) -> None:
    """A folder as an earlier save left it: written by save_folder_atomically, holding old.txt."""
    save_folder_atomically(folder, lambda tmp: (tmp / "old.txt").write_text("the previous run"))


def test_replacing_a_folder_leaves_the_new_contents_and_no_temporary_folder(replace_mode, tokenizer, tmp_path):
    folder = tmp_path / "model"
    earlier_save(folder)
    model = tiny_decoder("zoo_gpt", len(tokenizer), max_position_embeddings=CONTEXT)

    save_folder_atomically(folder, model.save_pretrained)

    model.save_pretrained(tmp_path / "reference")
    assert sorted(p.name for p in folder.iterdir()) == sorted([SAVE_MARKER, *(p.name for p in (tmp_path / "reference").iterdir())])
    assert not (folder / "old.txt").exists()
    assert leftovers(tmp_path, "model") == ["reference"]


def test_a_failure_inside_write_keeps_the_old_folder_and_leaves_no_temporary_folder(replace_mode, tmp_path):
    folder = tmp_path / "model"
    earlier_save(folder)

    def write(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half a checkpoint")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_folder_atomically(folder, write)
    assert sorted(p.name for p in folder.iterdir()) == [SAVE_MARKER, "old.txt"]
    assert (folder / "old.txt").read_text() == "the previous run"
    assert leftovers(tmp_path, "model") == []


def test_a_failure_inside_write_with_no_old_folder_leaves_nothing(tmp_path):
    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_folder_atomically(tmp_path / "model", write)
    assert list(tmp_path.iterdir()) == []


def test_saving_a_folder_where_a_file_exists_names_the_path(tmp_path):
    path = tmp_path / "model"
    path.write_text("not a folder")
    with pytest.raises(FileExistsError, match="a file of that name exists") as error:
        save_folder_atomically(path, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert str(path) in str(error.value)
    assert path.read_text() == "not a folder" and leftovers(tmp_path, "model") == []


# ----------------------------------------------------------------------------- the saved tokenizer's context


def test_finish_lesson_saves_a_tokenizer_that_stops_at_the_model_context(tokenizer, tmp_path):
    model = tiny_decoder("zoo_modern", len(tokenizer), max_position_embeddings=CONTEXT)
    corpus = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": [TEXT * 3]})})
    byte_lengths = token_byte_lengths(tokenizer)
    results = evaluate_splits(model, tokenizer, corpus, byte_lengths, CONTEXT)
    unbounded = tokenizer.model_max_length

    folder, results = finish_lesson(
        model,
        tokenizer,
        TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none"),
        LessonArguments(model_name="tiny", sample_prompt="ROMEO:\n", sample_tokens=4),
        DataArguments(dataset="text"),
        results,
        card=dict(lesson="test", recipe="tests/test_training_plumbing.py", summary="A tiny decoder.",
                  tokenizer="character level", limitations="Untrained."),
    )

    saved = AutoTokenizer.from_pretrained(folder)
    assert saved.model_max_length == model.config.max_position_embeddings == CONTEXT
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == CONTEXT
    assert len(saved(TEXT * 3, truncation=True)["input_ids"]) == CONTEXT
    assert pipeline("text-generation", model=str(folder), device="cpu").tokenizer.model_max_length == CONTEXT
    assert tokenizer.model_max_length == unbounded, "the caller's tokenizer must not change"
    assert results["sample"].startswith("ROMEO:\n")


@pytest.mark.parametrize("model_type", ["zoo_gpt", "zoo_modern"])
def test_export_for_serving_saves_a_tokenizer_that_stops_at_the_model_context(model_type, tokenizer, tmp_path):
    unbounded = tokenizer.model_max_length
    model = tiny_decoder(model_type, len(tokenizer), max_position_embeddings=CONTEXT)
    folder = export_for_serving(model, tokenizer, tmp_path / "export")

    saved = AutoTokenizer.from_pretrained(folder)
    assert saved.model_max_length == CONTEXT
    assert len(saved(TEXT * 3, truncation=True)["input_ids"]) == CONTEXT
    assert tokenizer.model_max_length == unbounded, "the caller's tokenizer must not change"


# ----------------------------------------------------------------------------- flags that cannot work


@dataclass
class BlocksModelArguments:
    """Model arguments without a ``sampling`` field, as in lessons 1-3 (packed blocks)."""

    hidden_size: int = 8


def parse(model_arguments_type: type, tmp_path: Path, *flags: str):
    return parse_lesson_args(model_arguments_type, defaults=dict(output_dir=str(tmp_path / "run")), args=list(flags))


@pytest.mark.parametrize("max_steps", ["0", "-1", "-5"])
def test_random_windows_need_a_positive_max_steps(max_steps, tmp_path):
    with pytest.raises(ValueError) as error:
        parse(DecoderArguments, tmp_path, "--max_steps", max_steps)
    message = str(error.value)
    assert f"--max_steps {max_steps}" in message and "random_windows" in message and "positive integer" in message
    assert "num_samples" not in message


@pytest.mark.parametrize("max_steps", ["0", "-5"])
def test_blocks_refuse_a_max_steps_that_trains_nothing(max_steps, tmp_path):
    with pytest.raises(ValueError) as error:
        parse(BlocksModelArguments, tmp_path, "--max_steps", max_steps)
    message = str(error.value)
    assert f"--max_steps {max_steps}" in message and "positive integer" in message and "-1" in message


def test_blocks_accept_max_steps_minus_one_for_epochs(tmp_path):
    *_, training_args = parse(BlocksModelArguments, tmp_path, "--max_steps", "-1", "--num_train_epochs", "2")
    assert (training_args.max_steps, training_args.num_train_epochs) == (-1, 2)
    model_args, *_, training_args = parse(DecoderArguments, tmp_path, "--sampling", "blocks", "--max_steps", "-1")
    assert (model_args.sampling, training_args.max_steps) == ("blocks", -1)


def test_prepare_lesson_data_checks_max_steps_before_loading_anything(tmp_path):
    data_args = DataArguments(dataset="text", data_files=[str(tmp_path / "never_read.txt")])
    training_args = TrainingArguments(output_dir=str(tmp_path), max_steps=0, report_to="none")
    with pytest.raises(ValueError, match="--max_steps 0"):
        prepare_lesson_data(data_args, training_args, "char", sampling="random_windows")


def test_output_dir_that_is_a_file_is_refused_at_parse_time(tmp_path):
    path = tmp_path / "results.txt"
    path.write_text("a file")
    for value in (path, path / "run"):
        with pytest.raises(ValueError) as error:
            parse(BlocksModelArguments, tmp_path, "--output_dir", str(value))
        message = str(error.value)
        assert "--output_dir" in message and repr(str(value)) in message and "folder" in message
    *_, training_args = parse(BlocksModelArguments, tmp_path, "--output_dir", str(tmp_path / "new" / "run"))
    assert training_args.output_dir == str(tmp_path / "new" / "run")


def test_a_data_file_that_is_not_utf8_is_named_with_its_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ROMEO:\nO caf\u00e9 of Verona, wherefore art thou?\n".encode("latin-1"))
    with pytest.raises(ValueError) as error:
        load_lesson_corpus(DataArguments(dataset="text", data_files=[str(path)]))
    message = str(error.value)
    offset = path.read_bytes().index(b"\xe9")
    assert "--data_files" in message and repr(str(path)) in message
    assert f"byte offset {offset}" in message and r"b'\xe9 of Verona" in message and "UTF-8" in message
    assert isinstance(error.value.__cause__, UnicodeDecodeError)


# ----------------------------------------------------------------------------- precision: measured, not assumed


def described(fp32: float, bf16: float):
    description = describe_machine(measure_peak=False)
    description.matmul_peak_gflops = {"fp32": fp32, "bf16": bf16}
    return description


def test_bf16_default_is_chosen_by_measurement_and_an_explicit_flag_wins(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    slow_bf16, fast_bf16 = described(60, 8), described(60, 276)  # an AVX2-only CPU; one with AVX-512 BF16
    args = parse(BlocksModelArguments, tmp_path)[3]
    assert choose_bf16(args, slow_bf16, argv=[]).startswith("precision: fp32 (auto: measured matmul peaks here: bf16 8 vs fp32 60")
    assert args.bf16 is False
    assert choose_bf16(args, fast_bf16, argv=[]).startswith("precision: bf16 autocast (auto:") and args.bf16 is True
    assert "precision: bf16 autocast (auto:" in capsys.readouterr().out  # said, not only recorded
    explicit = parse(BlocksModelArguments, tmp_path, "--bf16", "true")[3]
    assert choose_bf16(explicit, slow_bf16, argv=["--bf16", "true"]) == "precision: bf16 autocast (set on the command line)"
    assert explicit.bf16 is True
    off = parse(BlocksModelArguments, tmp_path, "--bf16=false")[3]
    assert choose_bf16(off, fast_bf16, argv=["--bf16=false"]) == "precision: fp32 (set on the command line)"


@pytest.mark.parametrize("recipe", ["07_training", "08_lora_sft", "10_moe"])
def test_recipes_leave_bf16_to_the_measurement(recipe):
    """No recipe hard-codes bf16 autocast as its default: it is many times slower than fp32 on a CPU without bf16 units."""
    source = (Path(__file__).parents[1] / "recipes" / f"{recipe}.py").read_text()
    tree = ast.parse(source)
    defaults = [node for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and getattr(node.value.func, "id", None) == "dict" and getattr(node.targets[0], "id", "").isupper()]  # TUNED_TRAINING, ...
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "parse_lesson_args"]
    keywords = [k.arg for node in defaults for k in node.value.keywords]
    keywords += [k.arg for call in calls for d in call.keywords if d.arg == "defaults" for k in d.value.keywords]
    assert "bf16" not in keywords and "choose_bf16(training_args" in source
