"""Instruction and preference data for lessons 8 (LoRA SFT) and 11 (DPO), built from the plays.

Pretraining taught the models what Shakespeare *looks like*. Fine-tuning teaches a *task*: one
that a 2M-parameter model can learn and that we can score. Ours is the next line of a dialogue:

    user:       Play: Macbeth
                Previous line: So foul and fair a day I have not seen.
                Speaker: BANQUO
    assistant:  How far is't call'd to Forres? What are these

The previous line is the last line of one speech; the answer is the first line of the next
speech, said by another character. A base model has read such exchanges but never in this
format: it does not know to answer with *one* line and then stop (end of text), nor to condition
on the named speaker. Both are learnable, both are scored by :func:`score_next_lines`.

Formats follow trl, so its trainers take the datasets as they are:

* instructions, *conversational*: ``messages`` = ``[{"role": "user", ...}, {"role": "assistant", ...}]``;
* preferences, conversational: ``prompt`` = ``[user message]``, ``chosen`` / ``rejected`` =
  ``[assistant message]`` (see :func:`build_preference_dataset` for what makes the preference real).

Both keep ``play`` and ``speaker`` columns and are **split by play** like the pretraining corpus
(:mod:`.corpora`): the held-out plays' dialogue was never seen in pretraining nor in fine-tuning,
so a held-out score measures the task, not memory.

The chat template (:data:`CHAT_TEMPLATE`, installed by :func:`add_chat_template`) renders roles
as plain-text markers the tiny model can learn (the zoo's byte-level BPE has one special token,
``<|endoftext|>``, which ends every answer) and wraps assistant content in
``{% generation %}`` so trl's ``assistant_only_loss`` trains on the answers only.
"""

from __future__ import annotations

import difflib
import logging
import random
import re
from collections.abc import Sequence
from pathlib import Path

import datasets

from .corpora import load_corpus

__all__ = [
    "CHAT_TEMPLATE",
    "INSTRUCTION_FORMATS",
    "PREFERENCE_COLUMNS",
    "add_chat_template",
    "build_instruction_dataset",
    "build_preference_dataset",
    "dialogue_turns",
    "load_instruction_data",
    "load_preference_data",
    "next_line_prompt",
    "score_next_lines",
]

logger = logging.getLogger(__name__)

USER_MARKER = "<user>"
ANSWER_MARKER = "<line>"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' %}{{ '" + USER_MARKER + "\\n' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ '" + ANSWER_MARKER + "\\n' }}"
    "{%- generation %}{{ message['content'] + eos_token }}{%- endgeneration %}{{ '\\n' }}"
    "{%- else %}{{ raise_exception('unknown role ' + message['role'] + '; the template knows system, user, assistant') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '" + ANSWER_MARKER + "\\n' }}{%- endif %}"
)
"""``<user>\\n{question}\\n<line>\\n{answer}<|endoftext|>\\n``. The generation prompt is ``<line>\\n``,
so the prompt of a conversation is a prefix of its full rendering, which trl's prompt/completion
split relies on."""

INSTRUCTION_FORMATS: dict[str, tuple[str, ...]] = {
    "conversational": ("messages",),
    "prompt-completion": ("prompt", "completion"),
}
"""The column sets an instruction dataset may have (trl's two supervised formats)."""

PREFERENCE_COLUMNS: tuple[str, ...] = ("prompt", "chosen", "rejected")

# A line that is a whole answer: short enough that prompt + answer fit a 128-token context.
MAX_LINE_CHARS = 80
TEST_FRACTION = 0.1
"""Share of rows held out (seeded) from a user's dataset that has no ``test`` split."""


# ----------------------------------------------------------------------------- the task


def dialogue_turns(text: str) -> list[tuple[str, str, str]]:
    """``(previous line, next speaker, their first line)`` for each change of speaker in a play.

    ``text`` is a play as :func:`~.corpora.load_corpus` gives it: ``SPEAKER:`` on its own line,
    the speech below, a blank line between speeches. Turns whose lines are longer than
    ``MAX_LINE_CHARS`` are left out (the tiny models' context is 128 tokens).
    """
    speeches = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line.strip()]
        if len(lines) >= 2 and lines[0].endswith(":"):
            speeches.append((lines[0][:-1], lines[1:]))
    turns = []
    for (speaker_before, before), (speaker, after) in zip(speeches, speeches[1:]):
        previous, line = before[-1], after[0]
        if speaker != speaker_before and len(previous) <= MAX_LINE_CHARS and len(line) <= MAX_LINE_CHARS:
            turns.append((previous, speaker, line))
    return turns


def play_name(slug: str) -> str:
    """``"as-you-like-it"`` -> ``"As You Like It"``."""
    return " ".join(word.capitalize() for word in slug.split("-"))


def next_line_prompt(play: str, previous: str, speaker: str) -> str:
    """The user message of the task."""
    return f"Play: {play}\nPrevious line: {previous}\nSpeaker: {speaker}"


def _corpus_turns(corpus: datasets.DatasetDict, max_rows: int | None, seed: int) -> dict[str, list[dict]]:
    """Every split's turns as rows ``{play, speaker, previous, line}``, shuffled and capped per split."""
    splits = {}
    for split, plays in corpus.items():
        rows = [
            dict(play=play_name(play["title"]), speaker=speaker, previous=previous, line=line)
            for play in plays
            for previous, speaker, line in dialogue_turns(play["text"])
        ]
        random.Random(f"{seed}-{split}").shuffle(rows)
        splits[split] = rows[:max_rows] if max_rows is not None else rows
    return splits


def _check_cap(max_rows: int | None) -> None:
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be a positive integer or None (all rows), got {max_rows!r}.")


def build_instruction_dataset(max_rows: int | None = None, seed: int = 0) -> datasets.DatasetDict:
    """The next-line task as trl conversational rows, split by play (train / validation / test).

    Args:
        max_rows: keep at most this many (shuffled) rows per split; ``None`` keeps all
            (28,043 train, 1,713 validation, 1,457 test).
        seed: the shuffle's seed.
    """
    _check_cap(max_rows)
    splits = {}
    for split, rows in _corpus_turns(load_corpus("shakespeare"), max_rows, seed).items():
        splits[split] = datasets.Dataset.from_list([
            dict(
                messages=[
                    {"role": "user", "content": next_line_prompt(row["play"], row["previous"], row["speaker"])},
                    {"role": "assistant", "content": row["line"]},
                ],
                play=row["play"],
                speaker=row["speaker"],
            )
            for row in rows
        ])
    return datasets.DatasetDict(splits)


def build_preference_dataset(max_rows: int | None = None, seed: int = 0) -> datasets.DatasetDict:
    """Preference pairs for the next-line task in trl's format, split by play.

    ``chosen`` is the line the speaker really says next. ``rejected`` is the first line of a
    speech from **another play of the same split** (so no held-out line leaks into training),
    drawn with a seeded generator. The preference is real and learnable: the true line answers
    the previous one (a question gets an answer, a name gets a reply, the metre runs on) and
    belongs to the named speaker in this play's world, while the rejected line is fluent
    Shakespeare that follows nothing here and often names characters of another play. A model
    can tell them apart only by reading the prompt, which is what DPO should teach it.
    Both completions are opening lines of speeches, so length and form give nothing away.

    Args:
        max_rows: keep at most this many pairs per split; ``None`` keeps all.
        seed: the seed of the shuffle and of the draw of rejected lines.
    """
    _check_cap(max_rows)
    splits = {}
    for split, rows in _corpus_turns(load_corpus("shakespeare"), max_rows, seed).items():
        by_play: dict[str, list[str]] = {}
        for row in rows:
            by_play.setdefault(row["play"], []).append(row["line"])
        if len(by_play) < 2:
            raise ValueError(f"split {split!r} has {len(by_play)} play(s); rejected lines are drawn from another play.")
        draw = random.Random(f"{seed}-{split}-rejected")
        pairs = []
        for row in rows:
            other = draw.choice([play for play in by_play if play != row["play"]])
            rejected = draw.choice(by_play[other])
            pairs.append(dict(
                prompt=[{"role": "user", "content": next_line_prompt(row["play"], row["previous"], row["speaker"])}],
                chosen=[{"role": "assistant", "content": row["line"]}],
                rejected=[{"role": "assistant", "content": rejected}],
                play=row["play"],
                speaker=row["speaker"],
            ))
        splits[split] = datasets.Dataset.from_list(pairs)
    return datasets.DatasetDict(splits)


# ----------------------------------------------------------------------------- the chat template


def add_chat_template(tokenizer):
    """Install :data:`CHAT_TEMPLATE` on ``tokenizer`` (in place; returned for chaining).

    Saved with the tokenizer (``chat_template`` in ``tokenizer_config.json``), so every
    fine-tuned folder answers ``apply_chat_template`` and ``pipeline`` chat calls the same way.
    """
    if tokenizer.eos_token is None:
        raise ValueError("the chat template ends every answer with eos_token, and this tokenizer has none.")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def use_training_chat_template(tokenizer) -> str:
    """Give ``tokenizer`` a chat template that marks the answers with ``{% generation %}``; say which one it got.

    Training on the answers alone (trl's ``assistant_only_loss``, :func:`~hf_models.evaluation.tokenize_conversation`)
    needs the template to mark them. A base keeps its own template where it can, since that is the
    format its tokens were trained in:

    * its template already has the markers: kept;
    * trl knows a training version of it (Qwen2.5, Llama 3, Gemma, Phi-3...: the same text, with
      markers): that one;
    * no template (lesson 5's model, most base checkpoints): the zoo's (:data:`CHAT_TEMPLATE`);
    * a template without markers that trl cannot patch: the zoo's, and the returned text says so.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if tokenizer.chat_template is None:
        add_chat_template(tokenizer)
        return "the zoo's chat template (the base has none)"
    if has_generation_markers(tokenizer.chat_template):
        return "the base's own chat template"
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:  # trl: "patching is not supported for this template"
        add_chat_template(tokenizer)
        return ("the zoo's chat template (the base's own has no {% generation %} markers for the answers, "
                "and trl knows no training version of it)")
    tokenizer.chat_template = patched
    return "the base's own chat template, with trl's {% generation %} markers"


# ----------------------------------------------------------------------------- user datasets


def _load_any(name_or_path: str) -> datasets.DatasetDict:
    """A ``DatasetDict`` from a Hub id, a ``save_to_disk`` folder, a data file or a folder of them."""
    path = Path(name_or_path)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = datasets.load_from_disk(str(path))
    elif path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in _DATA_FILE_BUILDERS)
        if not files:
            raise ValueError(f"{name_or_path!r} holds no data files; allowed suffixes: {sorted(_DATA_FILE_BUILDERS)}.")
        builder = _DATA_FILE_BUILDERS.get(files[0].suffix)
        if builder is None:
            raise ValueError(f"cannot read {files[0].name!r}; allowed suffixes: {sorted(_DATA_FILE_BUILDERS)}.")
        loaded = datasets.load_dataset(builder, data_files=[str(f) for f in files])
    else:
        loaded = datasets.load_dataset(name_or_path)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    return loaded


_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _with_test_split(data: datasets.DatasetDict, name: str) -> datasets.DatasetDict:
    if "train" not in data:
        raise ValueError(f"dataset {name!r} has splits {sorted(data)}; a 'train' split is required.")
    if "test" in data:
        return data
    logger.warning("dataset %r has no 'test' split: holding out %d%% of 'train' (seed 0) as 'test'.", name, int(TEST_FRACTION * 100))
    carved = data["train"].train_test_split(test_size=TEST_FRACTION, seed=0)
    return datasets.DatasetDict({**data, "train": carved["train"], "test": carved["test"]})


def _check_columns(data: datasets.DatasetDict, name: str, allowed: Sequence[tuple[str, ...]]) -> None:
    for split, rows in data.items():
        if not any(set(columns) <= set(rows.column_names) for columns in allowed):
            wanted = " or ".join(str(list(columns)) for columns in allowed)
            raise ValueError(f"dataset {name!r} split {split!r} has columns {rows.column_names}; it needs {wanted}.")


def load_instruction_data(name_or_path: str | None = None, max_rows: int | None = None, seed: int = 0) -> datasets.DatasetDict:
    """Lesson 8's data: the built-in next-line task (``None``), or any trl-format supervised dataset.

    ``name_or_path``: a Hub dataset id, a ``save_to_disk`` folder, or a json/jsonl/parquet/csv
    file (or folder of them), with trl's conversational ``messages`` column or its
    ``prompt``/``completion`` columns. Without a ``test`` split, 10% of ``train`` is held out
    (seed 0, with a warning).
    """
    if name_or_path is None:
        return build_instruction_dataset(max_rows=max_rows, seed=seed)
    _check_cap(max_rows)
    data = _with_test_split(_load_any(name_or_path), name_or_path)
    _check_columns(data, name_or_path, tuple(INSTRUCTION_FORMATS.values()))
    return _capped(data, max_rows, seed)


def load_preference_data(name_or_path: str | None = None, max_rows: int | None = None, seed: int = 0) -> datasets.DatasetDict:
    """Lesson 11's data: the built-in preference pairs (``None``), or any trl-format preference dataset
    (columns ``prompt``, ``chosen``, ``rejected``; loaded as :func:`load_instruction_data` does)."""
    if name_or_path is None:
        return build_preference_dataset(max_rows=max_rows, seed=seed)
    _check_cap(max_rows)
    data = _with_test_split(_load_any(name_or_path), name_or_path)
    _check_columns(data, name_or_path, (PREFERENCE_COLUMNS,))
    return _capped(data, max_rows, seed)


def _capped(data: datasets.DatasetDict, max_rows: int | None, seed: int) -> datasets.DatasetDict:
    if max_rows is None:
        return data
    return datasets.DatasetDict(
        {split: rows.shuffle(seed=seed).select(range(min(max_rows, len(rows)))) for split, rows in data.items()}
    )


# ----------------------------------------------------------------------------- the score

_MARKERS = (USER_MARKER, ANSWER_MARKER)
_NOT_WORD = re.compile(r"[^a-z0-9' ]+")


def _normalise(line: str) -> str:
    return " ".join(_NOT_WORD.sub(" ", line.lower()).split())


def score_next_lines(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Score generated answers against the true next lines.

    Args:
        predictions: the generated text after the generation prompt, special tokens removed
            (a model that does not stop after its line shows it as a second line).
        references: the true lines.

    Returns:
        ``format``: share of answers that are one non-empty line without role markers, the
        answer format of the task; ``exact``: share equal to the reference after lower-casing
        and dropping punctuation; ``near``: mean character similarity (difflib's ratio,
        ``2 * matches / total length``, in [0, 1]) of the normalised first line to the reference.
        A 2M-parameter model will rarely say Shakespeare's exact line, so ``near`` is the
        graded signal: it rises as the answer picks up the right words and length.
        ``task``: the task's score, ``near`` where the answer keeps the format and 0 where it
        does not (an answer that runs on into a scene is not an answer, however similar its
        first line), as benchmarks score an unparseable answer as wrong.
    """
    if len(predictions) != len(references) or not references:
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) must be equally many, and not none.")
    formatted = exact = near = task = 0.0
    for prediction, reference in zip(predictions, references):
        text = prediction.strip()
        first = text.split("\n", 1)[0]
        in_format = bool(text) and "\n" not in text and not any(marker in text for marker in _MARKERS)
        similarity = difflib.SequenceMatcher(None, _normalise(first), _normalise(reference)).ratio()
        formatted += in_format
        exact += _normalise(first) == _normalise(reference)
        near += similarity
        task += similarity if in_format else 0.0
    count = len(references)
    return {"format": formatted / count, "exact": exact / count, "near": near / count, "task": task / count, "count": count}
