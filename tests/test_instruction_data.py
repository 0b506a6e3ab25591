"""Lessons 8 and 11's data: the next-line task, its preference pairs, the chat template and the score."""

from __future__ import annotations

import json

import datasets
import pytest
from transformers import AutoTokenizer

from hf_models import ModernDecoderConfig, ModernDecoderForCausalLM
from hf_models.data import (
    SHAKESPEARE_TEST_PLAYS,
    add_chat_template,
    build_instruction_dataset,
    build_preference_dataset,
    load_instruction_data,
    load_preference_data,
    score_next_lines,
)
from hf_models.data.instructions import dialogue_turns, play_name
from hf_models.tokenization import ByteLevelBPE
from tests.helpers import TINY_CONFIGS

PLAY = "HAMLET:\nWho's there?\n\nBERNARDO:\nNay, answer me: stand,\nand unfold yourself.\n\nBERNARDO:\nLong live the king!\n\nFRANCISCO:\nBernardo?"


@pytest.fixture(scope="module")
def instructions() -> datasets.DatasetDict:
    return build_instruction_dataset(max_rows=200)


@pytest.fixture(scope="module")
def preferences() -> datasets.DatasetDict:
    return build_preference_dataset(max_rows=200)


@pytest.fixture(scope="module")
def chat_tokenizer(shakespeare):
    return add_chat_template(ByteLevelBPE.train(shakespeare["train"]["text"][:2], vocab_size=400).to_fast_tokenizer())


def test_turns_are_changes_of_speaker():
    # The second BERNARDO speech follows BERNARDO: no change of speaker, no turn.
    assert dialogue_turns(PLAY) == [("Who's there?", "BERNARDO", "Nay, answer me: stand,"), ("Long live the king!", "FRANCISCO", "Bernardo?")]


def test_instruction_rows_are_split_by_play(instructions):
    assert set(instructions) == {"train", "validation", "test"}
    assert set(instructions["test"]["play"]) == {play_name(p) for p in SHAKESPEARE_TEST_PLAYS}
    assert not set(instructions["train"]["play"]) & set(instructions["test"]["play"])
    user, assistant = instructions["test"][0]["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert user["content"].startswith("Play: ") and f"Speaker: {instructions['test'][0]['speaker']}" in user["content"]
    assert "\n" not in assistant["content"] and assistant["content"]


def test_preferences_are_true_line_against_another_plays_line(preferences, instructions):
    test = preferences["test"]
    assert set(test["play"]) == set(instructions["test"]["play"])
    # Same rows, same order as the instruction task: chosen is the true next line.
    assert [row["chosen"][0]["content"] for row in test] == [row["messages"][1]["content"] for row in instructions["test"]]
    by_play = {}
    for row in test:
        by_play.setdefault(row["play"], set()).add(row["chosen"][0]["content"])
    for row in test:
        rejected = row["rejected"][0]["content"]
        assert rejected != row["chosen"][0]["content"] and rejected not in by_play[row["play"]] or rejected in set().union(
            *(lines for play, lines in by_play.items() if play != row["play"]))
        assert any(rejected in lines for play, lines in by_play.items() if play != row["play"])
    assert build_preference_dataset(max_rows=50)["test"]["rejected"] == build_preference_dataset(max_rows=50)["test"]["rejected"]


def test_chat_template_masks_exactly_the_answer(chat_tokenizer, instructions):
    messages = instructions["test"][0]["messages"]
    encoded = chat_tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    answer = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert chat_tokenizer.decode(answer) == messages[1]["content"] + chat_tokenizer.eos_token
    prompt = chat_tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    full = chat_tokenizer.apply_chat_template(messages, tokenize=False)
    assert full.startswith(prompt) and full[len(prompt):] == messages[1]["content"] + chat_tokenizer.eos_token + "\n"
    with pytest.raises(Exception, match="unknown role tool"):
        chat_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_chat_template_is_saved_with_the_tokenizer(chat_tokenizer, tmp_path):
    chat_tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == chat_tokenizer.chat_template


def test_trl_sft_trains_on_answers_only(chat_tokenizer, instructions, tmp_path):
    from trl import SFTConfig, SFTTrainer

    config = ModernDecoderConfig(vocab_size=len(chat_tokenizer), max_position_embeddings=256, **TINY_CONFIGS["zoo_modern"])
    model = ModernDecoderForCausalLM(config)
    config = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, assistant_only_loss=True,
                       report_to="none", use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, max_length=256)
    trainer = SFTTrainer(model=model, args=config, train_dataset=instructions["train"].select(range(8)), processing_class=chat_tokenizer)
    row = trainer.train_dataset[0]
    answer = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]  # trl folds the mask into labels
    assert chat_tokenizer.decode(answer) == instructions["train"][0]["messages"][1]["content"] + chat_tokenizer.eos_token
    assert trainer.train().training_loss > 0


def test_user_datasets_load_and_bad_columns_are_named(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]} for i in range(20)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_preference_data(str(tmp_path / "prefs.jsonl"))
    assert len(loaded["train"]) == 18 and len(loaded["test"]) == 2  # no test split: 10% carved with a seed
    with pytest.raises(ValueError, match=r"has columns \['prompt', 'chosen', 'rejected'\]; it needs \['messages'\] or \['prompt', 'completion'\]"):
        load_instruction_data(str(tmp_path / "prefs.jsonl"))
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["x"] * 4}), test=datasets.Dataset.from_dict({"text": ["y"]})).save_to_disk(tmp_path / "disk")
    with pytest.raises(ValueError, match=r"'train' has columns \['text'\]; it needs \['prompt', 'chosen', 'rejected'\]"):
        load_preference_data(str(tmp_path / "disk"))
    with pytest.raises(ValueError, match="max_rows must be a positive integer"):
        build_instruction_dataset(max_rows=0)


def test_score_next_lines():
    score = score_next_lines(
        ["Long live the king!", "long live the KING", "Long live the queen!\nAnd more", "<line>\nx", ""],
        ["Long live the king!"] * 5,
    )
    assert score["count"] == 5
    assert score["format"] == pytest.approx(2 / 5)  # two single clean lines; a second line, a marker, an empty answer fail
    assert score["exact"] == pytest.approx(2 / 5)  # case and punctuation do not count
    assert 0.5 < score["near"] < 0.8
    assert score["task"] == pytest.approx(2 / 5)  # the two clean exact answers score 1, the rest 0 whatever their first line
    with pytest.raises(ValueError, match="equally many"):
        score_next_lines(["a"], [])
