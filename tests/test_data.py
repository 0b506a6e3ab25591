"""The data layer: corpora (Shakespeare, WikiText-2, plain text, dataset folders) and packing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_models.data import (
    CORPORA,
    SHAKESPEARE_TEST_PLAYS,
    SHAKESPEARE_VALIDATION_PLAYS,
    CorpusUnavailableError,
    load_corpus,
    pack_for_causal_lm,
    packed_cache_dir,
    play_markdown_to_text,
    split_num_bytes,
    split_token_ids,
)
from hf_models.data import packing
from tests.helpers import EOS

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = REPO_ROOT.parent / "shared" / "datasets" / "tinyshakespeare" / "input.txt"
SPEAKER = re.compile(r"[A-Z][A-Za-z' &.,-]*:")


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path):
    """No test may reach the network, and none may find a dataset in the user's cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


def char_tokenizer(text: str, eos: bool = True) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer over the characters of ``text`` (one id per character)."""
    specials = [EOS] if eos else []
    vocab = {token: i for i, token in enumerate([*specials, "<unk>", *sorted(set(text))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token=EOS if eos else None, model_max_length=16
    )


# ------------------------------------------------------------------------------------------------
# Shakespeare: Markdown -> plain text
# ------------------------------------------------------------------------------------------------

SAMPLE_MARKDOWN = """\
# Hamlet

## ACT I

### SCENE I. Elsinore. A platform before the castle, where BERNARDO

and FRANCISCO stand.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**  
Who's there?

**FRANCISCO**  
Nay, answer me: stand,  
and unfold yourself.

_Enter HORATIO, MARCELLUS, and
others, with torches_

**HORATIO**  
__\\[Awaking]_  
Friends to this ground. _\\[Aside]_  
'Tis now struck twelve\\--get thee to bed \\[soon].

_Exit_

Ay, and &amp; c.

*Enter Lodowick, with
letters.*

**LODOWICK**  
*[Reads.]*  
1\\. Item.

COUNTESS

**OF AUVERGNE**  
[Within]_  
Who calls?

#### EPILOGUE

**MARCELLUS**  
_Exeunt_
"""

SAMPLE_TEXT = """\
BERNARDO:
Who's there?

FRANCISCO:
Nay, answer me: stand,
and unfold yourself.

HORATIO:
Friends to this ground.
'Tis now struck twelve--get thee to bed [soon].
Ay, and & c.

LODOWICK:
1. Item.

COUNTESS OF AUVERGNE:
Who calls?
"""


def test_markdown_sample_converts_to_tiny_shakespeare_style():
    # speakers, two-space breaks, (multi-line) directions, inline bracketed directions, escapes,
    # a scene heading and a speaker name broken over two paragraphs, a direction-only speech
    assert play_markdown_to_text(SAMPLE_MARKDOWN) == SAMPLE_TEXT


def test_all_38_plays_are_clean_plain_text(shakespeare):
    plays = {row["title"]: row for split in shakespeare.values() for row in split}
    assert len(plays) == 38
    genres = {row["genre"] for row in plays.values()}
    assert genres == {"comedies", "histories", "problems", "roman", "romances", "tragedies"}
    for title, row in plays.items():
        text = row["text"]
        assert len(text) > 50_000, title
        markup = re.search(r".{0,40}[*_#\\].{0,40}", text)
        assert markup is None, f"{title}: {markup}"
        assert text.isascii() and "\n\n\n" not in text and text.endswith("\n"), title
        blocks = text.rstrip("\n").split("\n\n")
        first_lines = [block.split("\n")[0] for block in blocks]
        assert all(SPEAKER.fullmatch(line) for line in first_lines if line.endswith(":")), title
        # nearly every speech starts with its speaker (the rest: songs, a prologue, source slips)
        assert sum(line.endswith(":") for line in first_lines) >= 0.99 * len(blocks), title
        assert all(len(block.split("\n")) >= 2 or not block.endswith(":") for block in blocks), title
    assert plays["hamlet"]["text"].startswith("BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me")


def test_shakespeare_split_by_play(shakespeare):
    titles = {name: list(split["title"]) for name, split in shakespeare.items()}
    assert list(shakespeare) == ["train", "validation", "test"]
    assert sorted(titles["validation"]) == sorted(SHAKESPEARE_VALIDATION_PLAYS)
    assert sorted(titles["test"]) == sorted(SHAKESPEARE_TEST_PLAYS)
    held_out = sorted(titles["validation"] + titles["test"])
    assert held_out == ["as-you-like-it", "julius-caesar", "macbeth", "twelfth-night"]
    assert len(titles["train"]) == 34
    all_titles = [title for split_titles in titles.values() for title in split_titles]
    assert len(set(all_titles)) == len(all_titles) == 38
    for split in shakespeare.values():
        assert split.column_names == ["text", "title", "genre"]
    again = load_corpus("shakespeare")
    for name in shakespeare:
        assert again[name]["text"] == shakespeare[name]["text"]
        assert again[name]._fingerprint == shakespeare[name]._fingerprint  # so packing caches hit


# ------------------------------------------------------------------------------------------------
# Plain-text files, dataset folders, WikiText-2
# ------------------------------------------------------------------------------------------------


def test_text_corpus_splits_by_characters(tmp_path):
    text = "".join(f"line {i}: to be or not to be\n" for i in range(100))
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    corpus = load_corpus("text", data_files=str(tmp_path / "a.txt"))
    assert list(corpus) == ["train", "validation"]
    n_train = int(len(text) * 0.9)
    assert corpus["train"]["text"] == [text[:n_train]]
    assert corpus["validation"]["text"] == [text[n_train:]]

    (tmp_path / "b.txt").write_text("no final newline", encoding="utf-8")
    (tmp_path / "c.txt").write_text("third file\n", encoding="utf-8")
    both = load_corpus(
        "text", data_files=[str(tmp_path / "b.txt"), str(tmp_path / "c.txt")], validation_fraction=0.25
    )
    joined = "no final newline\nthird file\n"
    cut = int(len(joined) * 0.75)
    assert (both["train"][0]["text"], both["validation"][0]["text"]) == (joined[:cut], joined[cut:])


@pytest.mark.skipif(not TINY_SHAKESPEARE.is_file(), reason=f"{TINY_SHAKESPEARE} not present")
def test_text_corpus_matches_nanogpt_split_of_tiny_shakespeare():
    corpus = load_corpus("text", data_files=str(TINY_SHAKESPEARE))
    text = TINY_SHAKESPEARE.read_text(encoding="utf-8")
    assert len(text) == 1_115_394
    assert len(corpus["train"][0]["text"]) == 1_003_854
    assert corpus["train"][0]["text"] + corpus["validation"][0]["text"] == text


def test_saved_dataset_folder(tmp_path):
    rows = {"content": [f"story number {i}" for i in range(50)], "id": list(range(50))}
    folder = tmp_path / "stories"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(folder))

    corpus = load_corpus(str(folder), text_column="content", validation_fraction=0.2)
    assert list(corpus) == ["train", "validation"]
    assert corpus["train"].column_names == corpus["validation"].column_names == ["text"]
    assert (len(corpus["train"]), len(corpus["validation"])) == (40, 10)
    assert sorted([*corpus["train"]["text"], *corpus["validation"]["text"]]) == sorted(rows["content"])
    again = load_corpus(str(folder), text_column="content", validation_fraction=0.2)
    assert again["validation"]["text"] == corpus["validation"]["text"]  # fixed seed

    with pytest.raises(ValueError, match=r"text_column='text'.*columns are \['content', 'id'\]"):
        load_corpus(str(folder))

    with_validation = tmp_path / "with_validation"
    train, valid = datasets.Dataset.from_dict({"text": ["a", "b"]}), datasets.Dataset.from_dict({"text": ["c"]})
    datasets.DatasetDict({"train": train, "valid": valid}).save_to_disk(str(with_validation))
    corpus = load_corpus(str(with_validation))
    assert (corpus["train"]["text"], corpus["validation"]["text"]) == (["a", "b"], ["c"])


def test_folder_of_data_files_and_column_checks(tmp_path):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    lines = [json.dumps({"story": f"once upon a time {i}", "n": i}) for i in range(20)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = load_corpus(str(folder), text_column="story")  # load_dataset(folder): no validation split
    assert (len(corpus["train"]), len(corpus["validation"])) == (18, 2)
    builder = load_corpus("json", data_files=str(folder / "train.jsonl"), text_column="story")
    assert builder["validation"]["text"] == corpus["validation"]["text"]
    with pytest.raises(ValueError, match="text_column='n' .* must hold strings"):
        load_corpus(str(folder), text_column="n")


WIKITEXT_LINES = [
    "",
    " = Valkyria Chronicles III = \n",
    "",
    " Senjō no Valkyria 3 is a tactical role @-@ playing game . \n",
    "",
    " = = Gameplay = = \n",
    "",
    " As with previous games , the player fights battles . \n",
    "",
    " = Tower Building = \n",
    "",
    " The tower is tall . \n",
]


def test_wikitext_2_from_a_local_copy_of_the_hub_repo(tmp_path):
    config_dir = tmp_path / "wikitext" / "wikitext-2-raw-v1"
    config_dir.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        lines = [line.replace("Tower", split.title()) for line in WIKITEXT_LINES]
        datasets.Dataset.from_dict({"text": lines}).to_parquet(str(config_dir / f"{split}-00000-of-00001.parquet"))

    corpus = load_corpus("wikitext-2", dataset_path=str(tmp_path / "wikitext"))
    assert list(corpus) == ["train", "validation", "test"]
    # one row per article; the empty rows are the blank lines between paragraphs
    assert corpus["train"]["text"] == [
        " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 is a tactical role @-@ playing game . \n\n"
        " = = Gameplay = = \n\n As with previous games , the player fights battles . \n",
        " = Train Building = \n\n The tower is tall . \n",
    ]
    assert corpus["test"][1]["text"].startswith(" = Test Building = ")
    # the config folder itself works too
    from_config_dir = load_corpus("wikitext-2", dataset_path=str(config_dir))
    assert from_config_dir["validation"]["text"] == corpus["validation"]["text"]

    with pytest.raises(ValueError, match="dataset_path="):
        load_corpus("wikitext-2", dataset_path=str(tmp_path / "missing"))


def test_wikitext_2_offline_without_local_copy_fails_clearly():
    with pytest.raises(CorpusUnavailableError) as error:
        load_corpus("wikitext-2")
    message = str(error.value)
    assert "Hub could not be reached" in message
    assert "dataset_path=" in message and "--dataset_path" in message
    assert "--dataset text --data_files" in message
    assert isinstance(error.value, RuntimeError)


def test_bad_names_and_fields(tmp_path):
    named = r"'shakespeare', 'wikitext-2', 'text'"
    with pytest.raises(ValueError, match=rf"unknown corpus name='shakespear'.*{named}.*Hub dataset id or a local"):
        load_corpus("shakespear")
    with pytest.raises(ValueError, match="unknown corpus name="):
        load_corpus(str(tmp_path / "no_such_folder"))
    with pytest.raises(CorpusUnavailableError, match="Hub could not be reached"):
        load_corpus("someone/some-dataset")  # looks like a Hub id: offline, not "unknown"
    with pytest.raises(ValueError, match="needs data_files"):
        load_corpus("text")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus("text", data_files=str(tmp_path / "missing.txt"))
    (tmp_path / "a.txt").write_text("some text\n", encoding="utf-8")
    for fraction in (0, 1, -0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="validation_fraction must be .* between 0 and 1"):
            load_corpus("text", data_files=str(tmp_path / "a.txt"), validation_fraction=fraction)
    with pytest.raises(ValueError, match="data_files='x.txt' does not apply to corpus 'shakespeare'"):
        load_corpus("shakespeare", data_files="x.txt")
    assert set(CORPORA) == {"shakespeare", "wikitext-2", "text"}


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------

DOCS = ["abcdefg", "hij", "klmnopqrstu"]  # 7 + 3 + 11 characters


def docs_corpus() -> datasets.DatasetDict:
    train, validation = datasets.Dataset.from_dict({"text": DOCS}), datasets.Dataset.from_dict({"text": ["xyz" * 5]})
    return datasets.DatasetDict({"train": train, "validation": validation})


def test_pack_joins_documents_with_eos_and_drops_the_tail(tmp_path):
    tokenizer = char_tokenizer("".join(DOCS) + "xyz")
    packed = pack_for_causal_lm(docs_corpus(), tokenizer, block_size=4, cache_dir=tmp_path)
    assert packed["train"].column_names == ["input_ids", "labels"]
    eos = tokenizer.eos_token_id
    stream = tokenizer("abcdefg", add_special_tokens=False)["input_ids"] + [eos]
    stream += tokenizer("hij", add_special_tokens=False)["input_ids"] + [eos]
    stream += tokenizer("klmnopqrstu", add_special_tokens=False)["input_ids"]
    assert len(stream) == 23
    blocks = packed["train"]["input_ids"]
    assert blocks == [stream[i : i + 4] for i in range(0, 20, 4)]  # 5 blocks, a tail of 3 dropped
    assert packed["train"]["labels"] == blocks
    assert len(packed["validation"]) == 3 and all(len(block) == 4 for block in packed["validation"]["input_ids"])

    ids = split_token_ids(docs_corpus()["train"], tokenizer)
    assert ids.dtype == torch.long and ids.tolist() == stream
    assert torch.equal(torch.tensor(blocks).flatten(), ids[: 5 * 4])  # the blocks are the stream's prefix
    assert split_num_bytes(docs_corpus()["train"]) == 21  # separators are special tokens: no text


def test_pack_without_eos_joins_documents_directly(tmp_path):
    tokenizer = char_tokenizer("".join(DOCS) + "xyz", eos=False)
    assert tokenizer.eos_token_id is None
    packed = pack_for_causal_lm(docs_corpus(), tokenizer, block_size=5, cache_dir=tmp_path)
    flat = torch.tensor(packed["train"]["input_ids"]).flatten()
    assert tokenizer.decode(flat.tolist()) == "".join(DOCS)[:20]
    assert split_token_ids(docs_corpus()["train"], tokenizer).numel() == 21


def test_pack_shakespeare_and_whole_split_ids(shakespeare, tmp_path):
    validation = datasets.DatasetDict({"validation": shakespeare["validation"]})
    tokenizer = char_tokenizer("".join(shakespeare["validation"]["text"]))
    packed = pack_for_causal_lm(validation, tokenizer, block_size=128, cache_dir=tmp_path)["validation"]
    ids = split_token_ids(shakespeare["validation"], tokenizer)
    n_chars = sum(len(text) for text in shakespeare["validation"]["text"])
    assert ids.numel() == n_chars + 1  # one character per id, one EOS between the two plays
    assert (ids == tokenizer.eos_token_id).sum() == 1
    assert len(packed) == ids.numel() // 128
    blocks = packed.with_format("torch")[:]["input_ids"]
    assert blocks.shape == (len(packed), 128)
    assert torch.equal(blocks.flatten(), ids[: blocks.numel()])
    assert split_num_bytes(shakespeare["validation"]) == n_chars  # pure ASCII


def test_second_identical_call_is_served_from_cache(monkeypatch, tmp_path):
    tokenizer = char_tokenizer("".join(DOCS) + "xyz")
    calls = []
    original = packing._tokenize_batch

    def counting_tokenize(batch, indices, tokenizer):
        calls.append(len(batch["text"]))
        return original(batch, indices, tokenizer)

    monkeypatch.setattr(packing, "_tokenize_batch", counting_tokenize)
    first = pack_for_causal_lm(docs_corpus(), tokenizer, block_size=4, cache_dir=tmp_path)
    assert calls  # tokenized once per split
    n_calls = len(calls)

    second = pack_for_causal_lm(docs_corpus(), tokenizer, block_size=4, cache_dir=tmp_path)
    assert len(calls) == n_calls  # nothing re-tokenized
    assert second["train"]["input_ids"] == first["train"]["input_ids"]
    for split in second.values():
        assert split.cache_files and all(Path(f["filename"]).parent == tmp_path for f in split.cache_files)

    pack_for_causal_lm(docs_corpus(), tokenizer, block_size=3, cache_dir=tmp_path)
    assert len(calls) == n_calls  # a new block size re-cuts blocks but reuses the tokens

    other_tokenizer = char_tokenizer("".join(DOCS) + "xyz!")
    pack_for_causal_lm(docs_corpus(), other_tokenizer, block_size=4, cache_dir=tmp_path)
    assert len(calls) > n_calls  # another vocabulary: tokenized again


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_MODELS_CACHE", str(tmp_path))
    assert packed_cache_dir() == tmp_path / "packed"
    monkeypatch.delenv("HF_MODELS_CACHE")
    assert packed_cache_dir() == Path.home() / ".cache" / "hf_models" / "packed"


@pytest.mark.parametrize("block_size", [0, -4, 2.5, True, "8", None])
def test_block_size_must_be_a_positive_int(block_size, tmp_path):
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        pack_for_causal_lm(docs_corpus(), char_tokenizer("abc"), block_size, cache_dir=tmp_path)


def test_pack_needs_a_text_column(tmp_path):
    corpus = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["abc"]})})
    with pytest.raises(ValueError, match="no 'text' column"):
        pack_for_causal_lm(corpus, char_tokenizer("abc"), 2, cache_dir=tmp_path)
