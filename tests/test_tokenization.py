"""Lessons 1 and 2: the character tokenizer, the hand-written byte-level BPE and byte lengths.

The central property: the project's own BPE encoder and the exported ``transformers`` fast
tokenizer produce *identical* ids -- on the whole held-out Shakespeare split, on random
Unicode, on every code point -- so the lesson's code and the shipped tokenizer never disagree.
"""

from __future__ import annotations

import json
import random
import unicodedata
from collections import Counter
from itertools import accumulate

import pytest
import torch
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from hf_models.tokenization import (
    ByteLevelBPE,
    build_char_tokenizer,
    bytes_to_unicode,
    pretokenize,
    token_byte_lengths,
    unicode_to_bytes,
)
from hf_models.tokenization.bpe import _drift_chars, _MergeState
from tests.helpers import EOS

# Hand-picked nasty strings: every one must round-trip and encode identically in both encoders.
EDGE_CASES = [
    "",
    " ",
    "   ",
    "\n",
    "\r\n",
    "a\r\nb\r\n\r\n",
    "  leading and trailing  ",
    "multiple   spaces\t\ttabs \n\n newlines",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽",
    "CJK 漢字かなカナ 한국어",
    "combining e\u0301 n\u0303 a\u0308\u0301 Z\u0351\u0352\u0353",
    "controls \x00\x01\x07\x1b[0m\x7f\x85\x9f",
    "exotic spaces \u00a0\u2002\u2028\u2029\u3000\ufeff end",
    "It's they're we've I'm you'll he'd 'S 'T",
    "numbers 1234567890 ٣٤٥ ⅫⅩ ½",
    "right-to-left עברית العربية",
    "surrogates-free astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 \U0010fffd",
    f"specials inline{EOS}and{EOS}{EOS} twice",
    "<|endoftext",
]


def random_unicode_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic random strings over many code point ranges (no ``hypothesis`` in the venv)."""
    rng = random.Random(seed)
    ranges = [
        (0x20, 0x7E),  # ASCII
        (0x00, 0x1F),  # C0 controls (tabs, newlines, \r, NUL)
        (0x7F, 0xFF),  # DEL, C1 controls, Latin-1
        (0x0300, 0x036F),  # combining marks
        (0x0370, 0x07FF),  # Greek .. Arabic .. Thaana
        (0x0E00, 0x0E7F),  # Thai
        (0x2000, 0x206F),  # general punctuation (exotic spaces, ZWJ)
        (0x3000, 0x30FF),  # CJK punctuation, kana
        (0x4E00, 0x9FFF),  # CJK ideographs
        (0xAC00, 0xD7A3),  # Hangul
        (0xE000, 0xF8FF),  # private use
        (0xFE00, 0xFFFD),  # variation selectors, specials
        (0x1F300, 0x1FAFF),  # emoji
        (0x10000, 0x10FFFF),  # anything astral, assigned or not
    ]
    words = [" ", "  ", "\n", "\r\n", "\t", "'s", "'ll", "the", " and", "123"]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 40)):
            if rng.random() < 0.3:
                parts.append(rng.choice(words))
            else:
                lo, hi = rng.choice(ranges)
                cp = rng.randint(lo, hi)
                if not 0xD800 <= cp < 0xE000:
                    parts.append(chr(cp))
        texts.append("".join(parts))
    return texts


def naive_bpe_merges(word_freqs: dict[bytes, int], num_merges: int) -> list[tuple[int, int]]:
    """The textbook trainer: recount every pair after every merge. Slow, obviously correct."""
    words = {tuple(w): c for w, c in word_freqs.items()}
    merges, next_id = [], 256
    for _ in range(num_merges):
        counts: Counter[tuple[int, int]] = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] += c
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # same tie-break as ByteLevelBPE
        merges.append(best)
        new_words: Counter[tuple[int, ...]] = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(next_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words, next_id = dict(new_words), next_id + 1
    return merges


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bpe(shakespeare) -> ByteLevelBPE:
    return ByteLevelBPE.train(shakespeare["train"]["text"], vocab_size=512)


@pytest.fixture(scope="module")
def fast(bpe):
    return bpe.to_fast_tokenizer()


@pytest.fixture(scope="module")
def small_corpus() -> list[str]:
    return [
        "the cat sat on the mat. the cat ate the rat!\n" * 3,
        "Thy thoughts, thou thinkest, are thine; they're the three things there.\n",
        "low lower lowest newer newest wider widest 1234 12345 1234\n\n  indented  text\t\t",
    ]


# --------------------------------------------------------------------------------- char tokenizer


def test_char_tokenizer_layout():
    tok = build_char_tokenizer("hello world\n")
    chars = sorted(set("hello world\n"))
    vocab = tok.get_vocab()
    assert [vocab[c] for c in chars] == list(range(len(chars)))
    assert tok.unk_token == "<unk>" and tok.unk_token_id == len(chars)
    assert tok.eos_token == EOS and tok.eos_token_id == len(chars) + 1
    assert len(tok) == len(chars) + 2


@pytest.mark.parametrize(
    "text", ["hello world", "  hello\n\n\tworld  ", "\n", " ", "    ", "o\tl\nl e\t\t\n h"]
)
def test_char_tokenizer_round_trip(text):
    tok = build_char_tokenizer("hello world\n\t")
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, whitespace included
    assert tok.decode(ids) == text


def test_char_tokenizer_unknown_characters(shakespeare):
    tok = build_char_tokenizer("abc ")
    ids = tok("a☃b  zc")["input_ids"]  # vocab: " "=0, a=1, b=2, c=3, <unk>=4, <|endoftext|>=5
    assert ids == [1, 4, 2, 0, 0, 4, 3]  # one <unk> per unknown character, not fused
    assert tok.decode(ids) == "a<unk>b  <unk>c"
    assert tok.decode(ids, skip_special_tokens=True) == "ab  c"
    # On the real corpus: every validation character seen in train round-trips.
    train_text = "".join(shakespeare["train"]["text"])
    tok = build_char_tokenizer(train_text)
    valid_text = shakespeare["validation"]["text"][0][:20_000]
    assert set(valid_text) <= set(train_text)
    assert tok.decode(tok(valid_text)["input_ids"]) == valid_text


def test_char_tokenizer_save_and_auto_load(tmp_path):
    text = "To be, or not to be:\n\tthat is  the question."
    tok = build_char_tokenizer(text)
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "auto_map" not in config  # loads with no remote code
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.unk_token, loaded.eos_token) == ("<unk>", EOS)


def test_char_tokenizer_bad_input():
    with pytest.raises(ValueError, match="text"):
        build_char_tokenizer("")
    with pytest.raises(ValueError, match="text must be a str"):
        build_char_tokenizer(["a", "b"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- BPE: training


def test_bpe_vocabulary_layout(bpe, fast):
    assert bpe.vocab_size == 512 == len(fast)
    assert [bpe.token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]
    assert bpe.special_tokens == {EOS: 511} and bpe.eos_token_id == 511
    assert len(bpe.merges) == 512 - 256 - 1
    for rank, (left, right) in enumerate(bpe.merges):  # merge r creates id 256 + r, from older ids
        assert left < 256 + rank and right < 256 + rank
        assert bpe.token_bytes(256 + rank) == bpe.token_bytes(left) + bpe.token_bytes(right)
    # The first merges on English text are the usual suspects.
    first = {bpe.token_bytes(256 + r) for r in range(10)}
    assert {b"e ", b" t", b"th", b"he", b"\n\n", b"ou", b" th", b" a", b"in"} & first


def test_bpe_matches_textbook_trainer(small_corpus):
    """Incremental counting + heap must pick exactly the merges a full recount picks."""
    bpe = ByteLevelBPE.train(small_corpus, vocab_size=256 + 60 + 1, min_frequency=1)
    word_freqs = Counter(w.encode() for text in small_corpus for w in pretokenize(text))
    assert bpe.merges == naive_bpe_merges(dict(word_freqs), len(bpe.merges))
    assert len(bpe.merges) == 60


def test_incremental_pair_counts_equal_recount(small_corpus):
    """White-box: after every merge the incremental bookkeeping equals a from-scratch recount."""
    word_freqs = Counter(w.encode() for text in small_corpus * 2 for w in pretokenize(text))
    state = _MergeState(dict(word_freqs))
    assert state.pair_counts == state.recount()
    next_id = 256
    for _ in range(40):
        truth = state.recount()
        best = state.best_pair()
        assert best is not None
        pair, count = best
        assert count == max(truth.values())
        assert pair == min((p for p, c in truth.items() if c == count))  # documented tie-break
        state.merge(pair, next_id)
        next_id += 1
        assert state.pair_counts == state.recount()
        for p, where in state.pair_words.items():  # the inverted index is exact too
            holders = {i for i, w in enumerate(state.words) if p in set(zip(w, w[1:]))}
            assert where == holders, p


def test_bpe_training_is_deterministic(small_corpus):
    a = ByteLevelBPE.train(small_corpus, vocab_size=300, min_frequency=1)
    b = ByteLevelBPE.train(list(reversed(small_corpus)), vocab_size=300, min_frequency=1)
    assert a.merges == b.merges  # order of documents and of dicts/sets does not matter


def test_bpe_stops_when_pairs_run_out():
    bpe = ByteLevelBPE.train(["ab ab ab"], vocab_size=1000)
    assert bpe.vocab_size < 1000
    assert bpe.decode(bpe.encode("ab ab")) == "ab ab"
    assert len(bpe.encode("ab")) == 1


def test_bpe_never_merges_across_special_tokens():
    bpe = ByteLevelBPE.train([f"ab{EOS}cd{EOS}" * 50], vocab_size=300)
    learned = [bpe.token_bytes(256 + r) for r in range(len(bpe.merges))]
    assert not any(b"<|" in tok or b"|>" in tok for tok in learned)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(vocab_size=100), r"vocab_size must be an int >= 257 .*256 byte tokens \+ 1 special.*got 100"),
        (dict(vocab_size=256), r"vocab_size must be an int >= 257.*got 256"),
        (dict(vocab_size=258, special_tokens=("<a>", "<b>", "<c>")), r"vocab_size.*>= 259.*got 258"),
        (dict(vocab_size="4096"), r"vocab_size must be an int.*got '4096' of type str"),
        (dict(vocab_size=512.0), r"vocab_size must be an int.*got 512.0 of type float"),
        (dict(vocab_size=True), r"vocab_size must be an int.*got True of type bool"),
        (dict(vocab_size=512, min_frequency=0), r"min_frequency must be an int >= 1.*got 0"),
        (dict(vocab_size=512, special_tokens=("<a>", "<a>")), r"special_tokens must be distinct"),
        (dict(vocab_size=512, special_tokens=("",)), r"special_tokens must be non-empty strings"),
    ],
)
def test_bpe_bad_input_raises_clear_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ByteLevelBPE.train(["some text"], **kwargs)


def test_bpe_rejects_a_single_string_as_texts():
    with pytest.raises(ValueError, match="texts must be an iterable of strings"):
        ByteLevelBPE.train("some text", vocab_size=300)


# --------------------------------------------------------------------------------- BPE: encode


def test_own_encoder_equals_fast_tokenizer_on_validation_split(shakespeare, bpe, fast):
    """Train on the train plays, then compare ids on the whole validation split."""
    validation = shakespeare["validation"]["text"]
    assert sum(map(len, validation)) > 100_000
    for text in validation:
        ours = bpe.encode(text)
        assert ours == fast(text)["input_ids"]
        assert bpe.decode(ours) == text == fast.decode(ours)
        assert len(ours) < 0.6 * len(text.encode())  # it does compress (~1.9 bytes per token)
    joined = EOS.join(validation)  # documents separated by the special token
    ids = bpe.encode(joined)
    assert ids == fast(joined)["input_ids"]
    assert ids.count(bpe.eos_token_id) == len(validation) - 1


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_round_trip_and_agree(bpe, fast, text):
    ours = bpe.encode(text)
    assert ours == fast(text)["input_ids"]
    assert bpe.decode(ours) == text
    assert fast.decode(ours) == text


def test_random_unicode_round_trips_and_agrees(bpe, fast):
    texts = random_unicode_texts(400)
    batch = fast(texts)["input_ids"]
    for text, theirs in zip(texts, batch):
        ours = bpe.encode(text)
        assert ours == theirs, text
        assert bpe.decode(ours) == text, text
        assert fast.decode(theirs) == text, text


def test_pretokenizer_agrees_with_tokenizers_on_code_points():
    """Our regex split equals tokenizers' ByteLevel split, including on recently assigned code points.

    Every letter / digit / space code point (the classes the split depends on) plus a stride over
    all others, each in a small context; compared through the split offsets.
    """
    every = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    classy = [c for c in every if unicodedata.category(chr(c))[0] in "LNZ" or chr(c).isspace()]
    sample = sorted(set(classy) | set(every[::11]) | {ord(c) for c in _drift_chars()})
    reference = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for start in range(0, len(sample), 40_000):
        text = "".join(f"{chr(c)}1{chr(c)} x{chr(c)}" for c in sample[start : start + 40_000])
        ours = list(accumulate(map(len, pretokenize(text))))
        theirs = [end for _, (_, end) in reference.pre_tokenize_str(text)]
        assert ours == theirs


def test_unicode_drift_code_points_agree(bpe, fast):
    """Code points newer than tokenizers' Unicode tables still split (hence encode) identically."""
    drift = sorted(_drift_chars())[:: max(1, len(_drift_chars()) // 200)]
    if not drift:
        pytest.skip("regex and tokenizers share the same Unicode tables here")
    text = " ".join(f"a{c}b {c}{c}1 {c}" for c in drift)
    assert bpe.encode(text) == fast(text)["input_ids"]
    assert bpe.decode(bpe.encode(text)) == text


def test_merges_that_rebuild_an_existing_token_reuse_its_id():
    """Two merges spelling the same bytes ("ab"+"c" and "a"+"bc") share one id, like tokenizers."""
    a, b, c = ord("a"), ord("b"), ord("c")
    bpe = ByteLevelBPE([(a, b), (256, c), (b, c), (a, 258)])  # ab=256, abc=257, bc=258, abc again
    assert bpe.vocab_size == 256 + 3 + 1 and len(bpe.merges) == 4
    fast = bpe.to_fast_tokenizer()
    assert len(fast) == bpe.vocab_size
    for text in ["abc", "xabc", "bcabc", "aabcbc", "cabcab abc bc"]:
        assert bpe.encode(text) == fast(text)["input_ids"], text
        assert bpe.decode(bpe.encode(text)) == text
    with pytest.raises(ValueError, match="outside"):
        ByteLevelBPE([(a, 300)])


def test_special_tokens_and_no_added_bos_eos(bpe, fast):
    assert fast.eos_token == EOS and fast.eos_token_id == bpe.eos_token_id == len(fast) - 1
    assert fast.bos_token == EOS and fast.unk_token is None
    assert fast("hello")["input_ids"] == bpe.encode("hello")  # nothing added around the text
    assert fast(EOS)["input_ids"] == [bpe.eos_token_id] == bpe.encode(EOS)
    assert fast.decode([bpe.eos_token_id], skip_special_tokens=True) == ""
    assert fast.convert_ids_to_tokens(bpe.encode(" the")) == ["Ġthe"]  # GPT-2's byte-level alphabet


def test_bpe_save_and_auto_load(tmp_path, shakespeare, bpe, fast):
    fast.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "auto_map" not in config
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == bpe.vocab_size
    assert loaded.eos_token_id == bpe.eos_token_id
    text = shakespeare["validation"]["text"][1][:20_000] + "\r\n 👍🏽 漢字"
    assert loaded(text)["input_ids"] == bpe.encode(text)
    assert loaded.decode(bpe.encode(text)) == text


def test_byte_helpers_are_inverse():
    b2u = bytes_to_unicode()
    assert len(b2u) == 256 == len(set(b2u.values()))
    assert unicode_to_bytes() == {c: b for b, c in b2u.items()}
    assert (b2u[ord(" ")], b2u[ord("\n")], b2u[ord("a")]) == ("Ġ", "Ċ", "a")


# --------------------------------------------------------------------------------- byte lengths


def test_token_byte_lengths_bpe(bpe, fast, shakespeare):
    lengths = token_byte_lengths(fast)
    assert lengths.dtype == torch.long and lengths.shape == (len(fast),)
    assert torch.equal(lengths, token_byte_lengths(bpe))
    assert lengths[bpe.eos_token_id] == 0
    assert lengths[:256].tolist() == [1] * 256
    texts = [shakespeare["validation"]["text"][0], *random_unicode_texts(100, seed=1)]
    texts += [t for t in EDGE_CASES if EOS not in t]  # a special token stands for 0 bytes
    for text in texts:
        ids = fast(text)["input_ids"]
        assert lengths[ids].sum().item() == len(text.encode("utf-8")), text


def test_token_byte_lengths_partial_utf8_tokens():
    """A token holding half of a multi-byte character still counts its own bytes."""
    bpe = ByteLevelBPE.train(["é" * 100 + " " + "🙂" * 100], vocab_size=300)
    fast = bpe.to_fast_tokenizer()
    lengths = token_byte_lengths(fast)
    partial = [i for i in range(256, len(bpe) - 1) if not _is_utf8(bpe.token_bytes(i))]
    assert partial  # e.g. b"\xa9\xc3" or b"\x9f\x99"
    for i in partial:
        assert lengths[i] == len(bpe.token_bytes(i))
    text = "éé🙂🙂🙂"
    assert lengths[fast(text)["input_ids"]].sum() == len(text.encode())


def test_token_byte_lengths_char_tokenizer():
    tok = build_char_tokenizer("aé€🙂\n ")
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (len(tok),)
    by_token = {tok.convert_ids_to_tokens(i): lengths[i].item() for i in range(len(tok))}
    assert by_token == {"\n": 1, " ": 1, "a": 1, "é": 2, "€": 3, "🙂": 4, "<unk>": 1, EOS: 0}
    text = "a é€\n🙂🙂"
    assert lengths[tok(text)["input_ids"]].sum() == len(text.encode())


def test_token_byte_lengths_rejects_other_objects():
    with pytest.raises(ValueError, match="tokenizer must be"):
        token_byte_lengths(object())


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
