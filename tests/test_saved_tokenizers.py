"""The tokenizer saved beside a model: batched generation, loading without prompts, no machine-local keys, and the pairing record."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from hf_models.benchmarking.generation import lesson_model
from hf_models.tokenization import ByteLevelBPE, build_char_tokenizer, load_tokenizer_for, tokenizer_for_saving
from tests.helpers import TINY_TEXT, build_tiny_model

PROMPTS = ["ROMEO:", "But soft, what light through", "It", "Juliet is the", "ROMEO:\nBut", "the east", "sun", "What light", "A"]


@pytest.fixture(scope="module")
def bpe():
    return ByteLevelBPE.train([TINY_TEXT * 4], vocab_size=256 + 40 + 1, min_frequency=1).to_fast_tokenizer()


def save_model_and_tokenizer(tokenizer, folder, model_type: str = "zoo_modern", seed: int = 0):
    """What the recipes do (finish_lesson): the model and ``tokenizer_for_saving``'s copy, in one folder."""
    model = build_tiny_model(model_type, len(tokenizer), seed=seed)
    saved = tokenizer_for_saving(tokenizer, model)
    model.save_pretrained(folder)
    saved.save_pretrained(folder)
    return model


@pytest.mark.parametrize("model_type", ["zoo_gpt", "zoo_modern"])
def test_saved_tokenizer_batches_prompts_for_generation(model_type, bpe, tmp_path):
    """pipeline(batch_size=8) pads the prompts (a pad token) on the left, so each continuation equals the unbatched one."""
    save_model_and_tokenizer(bpe, tmp_path, model_type)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>" and tokenizer.padding_side == "left"
    generator = pipeline("text-generation", model=str(tmp_path), tokenizer=str(tmp_path), batch_size=8, device="cpu")
    greedy = dict(max_new_tokens=4, do_sample=False)
    batched = [out[0]["generated_text"] for out in generator(PROMPTS, **greedy)]
    one_by_one = [generator(prompt, **greedy)[0]["generated_text"] for prompt in PROMPTS]
    assert batched == one_by_one


def test_a_tokenizer_loaded_from_a_folder_saves_no_machine_local_keys(bpe, tmp_path):
    """Lessons reload their cached BPE (and 8, 9, 11 an earlier lesson's folder): from_pretrained's own keys must not travel on."""
    bpe.save_pretrained(tmp_path / "cache")
    save_model_and_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "cache"), tmp_path / "model")
    config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only", "_commit_hash"} & set(config), config


LOAD = {
    "AutoTokenizer after import hf_models": "import hf_models; from transformers import AutoTokenizer as T",
    "PreTrainedTokenizerFast, no hf_models": "from transformers import PreTrainedTokenizerFast as T",
}


@pytest.mark.parametrize("how", LOAD)
def test_tokenizer_loads_in_a_fresh_process_without_asking(how, bpe, tmp_path):
    """No trust_remote_code prompt: stdin is closed and the time is bounded, and the prompt's text must not appear."""
    save_model_and_tokenizer(bpe, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "auto_map" not in config and config["tokenizer_class"] in ("PreTrainedTokenizerFast", "TokenizersBackend")
    code = f"{LOAD[how]}; t = T.from_pretrained({str(tmp_path)!r}); print(len(t), t.padding_side)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert "trust_remote_code" not in done.stdout + done.stderr and "Do you wish" not in done.stdout + done.stderr
    assert done.stdout.split()[-2:] == [str(len(bpe)), "left"]


def test_the_model_config_records_its_tokenizer_and_a_mismatch_is_refused(bpe, tmp_path):
    model_folder, other = tmp_path / "model", tmp_path / "other"
    save_model_and_tokenizer(bpe, model_folder)
    record = json.loads((model_folder / "config.json").read_text())["tokenizer_identity"]
    assert record["vocab_size"] == len(bpe) and len(record["vocab_sha256"]) == 16
    assert len(load_tokenizer_for(model_folder)) == len(bpe)

    # A smaller vocabulary: every id has an embedding, so nothing would fail; the record refuses it.
    build_char_tokenizer(TINY_TEXT).save_pretrained(other)
    with pytest.raises(ValueError, match=rf"tokenizer of {other} \(\d+ tokens, vocabulary sha256 \w+\) is not the one "
                                         rf"the model in {model_folder} was saved with \({len(bpe)} tokens"):
        load_tokenizer_for(model_folder, other)
    # The same size, another vocabulary (trained on other text): only the hash tells them apart.
    same_size = ByteLevelBPE.train([TINY_TEXT.upper() * 4], vocab_size=len(bpe), min_frequency=1).to_fast_tokenizer()
    assert len(same_size) == len(bpe)
    same_size.save_pretrained(other)
    with pytest.raises(ValueError, match="vocabulary sha256"):
        load_tokenizer_for(model_folder, other)
    # Lesson 6's loader refuses a folder whose tokenizer was swapped.
    same_size.save_pretrained(model_folder)
    with pytest.raises(ValueError, match="is not the one the model"):
        lesson_model(str(model_folder), 64, seed=0)


def test_folders_saved_before_the_record_load_as_before(bpe, tmp_path):
    model = build_tiny_model("zoo_modern", len(bpe))
    model.save_pretrained(tmp_path)
    bpe.save_pretrained(tmp_path)
    assert "tokenizer_identity" not in json.loads((tmp_path / "config.json").read_text())
    assert len(load_tokenizer_for(tmp_path)) == len(bpe)
    _, loaded, tokenizer = lesson_model(str(tmp_path), 64, seed=0)
    assert tokenizer is not None and torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
