"""A hand-written byte-level BPE tokenizer (lesson 2).

Byte-pair encoding (Sennrich, Haddow & Birch, 2016, "Neural Machine Translation of Rare Words
with Subword Units") builds a vocabulary bottom-up: start from an alphabet of single symbols,
count every pair of adjacent symbols in the training corpus, replace the most frequent pair
with a brand-new symbol (a *merge*), and repeat until the vocabulary is as large as wanted.
Frequent words end up as one token, rare words as a few pieces, and nothing is ever
out of vocabulary because the single symbols are always there.

GPT-2 (Radford et al., 2019) made the alphabet the 256 *bytes* instead of characters: any
UTF-8 string is a byte string, so the tokenizer needs no ``<unk>`` and round-trips emoji, CJK
or control characters exactly. Two more GPT-2 details are reproduced here:

* **Pre-tokenization.** Before BPE, text is cut with a regex into "words" (letters with an
  optional leading space, digit runs, punctuation runs, whitespace runs, English
  contractions). Merges never cross those boundaries, so ``" dog"`` / ``" dog."`` /
  ``" dog!"`` do not each waste a vocabulary slot. The split is the one that
  ``tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)`` performs.
* **bytes-to-unicode.** Vocabulary files are text, and raw bytes such as ``0x0A`` or ``0x20``
  are awkward in JSON and in ``merges.txt`` (a space separates the two halves of a merge).
  GPT-2 therefore maps each byte to a printable unicode character (``" "`` -> ``"Ġ"``,
  ``"\\n"`` -> ``"Ċ"``) and writes tokens as strings of those characters. The mapping is only
  an export format: internally this module works on integer ids.

Ids are laid out as: ``0..255`` the raw bytes (id == byte value), then one id per new token in
merge order, then the special tokens (``<|endoftext|>``) at the end.

Training is the lesson, so the merge loop is written here rather than delegated to
``tokenizers``; :meth:`ByteLevelBPE.to_fast_tokenizer` then exports the result to a
``tokenizers`` BPE model wrapped in a ``transformers`` tokenizer, which produces exactly the
same ids as :meth:`ByteLevelBPE.encode` (the tests check this on the whole validation split).

Why incremental pair counting matters
-------------------------------------
The textbook loop recounts all pairs in the corpus after every merge: ``O(merges x corpus)``.
For 4 000 merges over a few MB that is ~10^10 steps in Python, i.e. hours. Two observations
make it fast:

1. Natural text is Zipfian: a 4.5 MB corpus has ~1 M pre-token *occurrences* but only a few
   ten thousand *distinct* words. Each distinct word is stored once with its count.
2. A merge ``(a, b) -> z`` changes only the words that contain ``a b``. Keeping an index
   ``pair -> set of word indices`` lets us touch just those words and fix the pair counts
   they contribute (subtract their old pairs, add their new ones).

The cost becomes ``O(merges x affected words)``, and the affected words of late merges
(rare pairs) are few. The most frequent pair is found with a max-heap with *lazy
invalidation*: when a count changes we do not search the heap for the old entry; stale
entries are detected (stored count != current count) and dropped or re-pushed when popped.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache

import regex
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "GPT2_SPLIT_PATTERN",
    "ByteLevelBPE",
    "bytes_to_unicode",
    "pretokenize",
    "unicode_to_bytes",
]

#: GPT-2's pre-tokenization regex (identical to the one inside ``tokenizers``' ByteLevel).
#: In words: English contractions; letters with an optional leading space; digits likewise;
#: other symbols likewise; a whitespace run that is not followed by a non-space (so the last
#: space before a word stays with the word: "a   b" -> "a", "  ", " b"); any whitespace left.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_SPLIT_RE = regex.compile(GPT2_SPLIT_PATTERN)

_NUM_BYTES = 256  # the base alphabet: one token per byte value


def _unicode_drift(char_class: str) -> str:
    r"""Code points that Python's ``regex`` puts in ``char_class`` (e.g. ``\p{L}``) but ``tokenizers`` does not.

    ``regex`` follows the newest Unicode release; ``tokenizers`` matches with Oniguruma, whose
    tables are older. Run every member of the class (per ``regex``) through ``tokenizers`` once
    and keep the ones it does not match (~0.2 s). The opposite drift (a class member only for
    ``tokenizers``) would need a newer Unicode in Oniguruma than in ``regex``; the tests check
    every code point, so they would notice it.
    """
    every_char = "".join(map(chr, range(0xD800))) + "".join(map(chr, range(0xE000, 0x110000)))
    members = "".join(regex.findall(char_class, every_char))
    not_matched = pre_tokenizers.Split(Regex(char_class + "+"), "removed").pre_tokenize_str(members)
    return "".join(piece for piece, _ in not_matched)


def _char_set(chars: str) -> str:
    """A regex character-set body matching exactly ``chars`` (compressed into ranges)."""
    codes = sorted(set(map(ord, chars)))
    parts, start = [], 0
    while start < len(codes):
        end = start
        while end + 1 < len(codes) and codes[end + 1] == codes[end] + 1:
            end += 1
        lo, hi = codes[start], codes[end]
        parts.append(f"\\U{lo:08X}" if lo == hi else f"\\U{lo:08X}-\\U{hi:08X}")
        start = end + 1
    return "".join(parts)


@lru_cache(maxsize=1)
def _drift() -> dict[str, frozenset[str]]:
    r"""Per GPT-2 character class (``\p{L}``, ``\p{N}``, ``\s``), its Unicode-drift code points.

    The two regex engines agree on GPT-2's pattern but not always on the *data*: ``\p{L}``
    means "letter in the Unicode version my tables come from". A code point assigned in a
    recent Unicode version (say a new CJK ideograph) is a letter for ``regex`` and
    "unassigned" -- hence a symbol -- for ``tokenizers``, so the two would split, and then
    encode, it differently. Measured once per process, on first use.
    """
    drift = {}
    for char_class in (r"\p{L}", r"\p{N}", r"\s"):
        try:
            drift[char_class] = frozenset(_unicode_drift(char_class))
        except Exception:  # pragma: no cover - keep GPT-2's pattern if probing is impossible
            drift[char_class] = frozenset()
    return drift


@lru_cache(maxsize=1)
def _drift_chars() -> frozenset[str]:
    """All Unicode-drift code points; text without any of them uses the plain GPT-2 regex."""
    return frozenset().union(*_drift().values())


@lru_cache(maxsize=1)
def _aligned_split_re() -> regex.Pattern:
    r"""GPT-2's pattern with the drift code points taken out of ``\p{L}`` / ``\p{N}`` / ``\s``."""
    drift = _drift()

    def body(char_class: str) -> str:  # a set body: the class minus its drift code points
        if not drift[char_class]:
            return char_class
        return f"[{char_class}--[{_char_set(''.join(drift[char_class]))}]]"

    L, N, S = body(r"\p{L}"), body(r"\p{N}"), body(r"\s")
    aligned = rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"""
    return regex.compile(aligned, regex.VERSION1)  # VERSION1: nested sets and set difference ("--")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode-character table.

    The 188 bytes that are already printable Latin-1 characters (``!``..``~``, ``¡``..``¬``,
    ``®``..``ÿ``) map to themselves; the other 68 (control characters, space, ``0x7F``..``0xA0``,
    soft hyphen) are shifted to ``U+0100`` and above, in byte order. So ``" "`` (0x20) becomes
    ``"Ġ"`` (U+0120) and ``"\\n"`` (0x0A) becomes ``"Ċ"`` (U+010A).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(_NUM_BYTES):
        if b not in table:
            table[b] = chr(_NUM_BYTES + shift)
            shift += 1
    return dict(sorted(table.items()))


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """Inverse of :func:`bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


def pretokenize(text: str) -> list[str]:
    """Split ``text`` into GPT-2 pre-tokens ("words"); BPE merges never cross their borders.

    Uses :data:`GPT2_SPLIT_PATTERN`, except that code points which Python's ``regex`` and
    ``tokenizers`` classify differently (their Unicode tables have different ages) are
    classified the way ``tokenizers`` does, so the split always equals
    ``pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)``.

    >>> pretokenize("Hello world!  It's 2024.\\n")
    ['Hello', ' world', '!', ' ', ' It', "'s", ' 2024', '.', '\\n']
    """
    drift = _drift_chars()
    if drift and not drift.isdisjoint(text):
        # Rare: text with code points newer than tokenizers' Unicode tables (see _drift).
        return _aligned_split_re().findall(text)
    return _GPT2_SPLIT_RE.findall(text)


def _check_int(name: str, value: object, minimum: int, why: str) -> int:
    """Validate an integer hyper-parameter, raising a ValueError that names field, value and range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= {minimum} ({why}), got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} ({why}), got {value}")
    return value


def _merge_symbols(symbols: list[int], a: int, b: int, new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of ``a b`` (scanning left to right) by ``new_id``."""
    out: list[int] = []
    i, n = 0, len(symbols)
    while i < n:
        if i + 1 < n and symbols[i] == a and symbols[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _pair_counter(symbols: Sequence[int]) -> Counter[tuple[int, int]]:
    """How many times each adjacent pair occurs inside one word."""
    return Counter(zip(symbols, symbols[1:]))


class _MergeState:
    """The bookkeeping of the BPE training loop (kept separate so tests can inspect it).

    Data structures:

    * ``words[i]``: word ``i`` as a list of current symbol ids (starts as its UTF-8 bytes).
    * ``freqs[i]``: how many times word ``i`` occurs in the corpus.
    * ``pair_counts[(a, b)]``: corpus frequency of the adjacent pair ``a b``, i.e. the sum over
      words of ``freqs[i] * (occurrences of a b in words[i])``. Pairs at 0 are deleted.
    * ``pair_words[(a, b)]``: indices of the words that contain ``a b`` -- the inverted index
      that lets a merge touch only the affected words.
    * ``heap``: entries ``(-count, a, b)``; Python's heapq is a min-heap, so negating the count
      makes it a max-heap. An entry is *stale* when its count no longer equals
      ``pair_counts[(a, b)]``; stale entries are fixed up when they reach the top.
    """

    def __init__(self, word_freqs: dict[bytes, int]) -> None:
        self.words: list[list[int]] = [list(w) for w in word_freqs]
        self.freqs: list[int] = list(word_freqs.values())
        self.pair_counts: dict[tuple[int, int], int] = {}
        self.pair_words: dict[tuple[int, int], set[int]] = {}
        for i, symbols in enumerate(self.words):
            freq = self.freqs[i]
            for pair, n in _pair_counter(symbols).items():
                self.pair_counts[pair] = self.pair_counts.get(pair, 0) + n * freq
                self.pair_words.setdefault(pair, set()).add(i)
        self.heap: list[tuple[int, int, int]] = [(-c, a, b) for (a, b), c in self.pair_counts.items()]
        heapq.heapify(self.heap)

    def best_pair(self) -> tuple[tuple[int, int], int] | None:
        """Pop the most frequent pair (ties: smallest ``(a, b)``) and its count, or None if none left.

        Lazy invalidation: counts of existing pairs only *decrease* between pushes except when
        the pair has just been created or grown by a merge, and those increases push a fresh
        entry (see :meth:`merge`). So a popped entry whose stored count is higher than the
        current one is re-pushed with the current count; one that is lower is a leftover
        from before an increase and is simply dropped (its fresher copy is in the heap).
        """
        while self.heap:
            neg_count, a, b = heapq.heappop(self.heap)
            stored, current = -neg_count, self.pair_counts.get((a, b), 0)
            if stored == current:
                return (a, b), current
            if 0 < current < stored:
                heapq.heappush(self.heap, (-current, a, b))
        return None

    def merge(self, pair: tuple[int, int], new_id: int) -> None:
        """Apply ``pair -> new_id`` to every word containing ``pair``, updating counts incrementally."""
        a, b = pair
        increased: set[tuple[int, int]] = set()
        # Copy: the set is mutated while we iterate (the merged pair disappears from these words).
        for i in sorted(self.pair_words.get(pair, ())):
            old = self.words[i]
            new = _merge_symbols(old, a, b, new_id)
            self.words[i] = new
            freq = self.freqs[i]
            old_pairs, new_pairs = _pair_counter(old), _pair_counter(new)
            # Only pairs whose multiplicity in this word changed need any work.
            for p in old_pairs.keys() | new_pairs.keys():
                delta = new_pairs.get(p, 0) - old_pairs.get(p, 0)
                if delta == 0:
                    continue
                count = self.pair_counts.get(p, 0) + delta * freq
                if count:
                    self.pair_counts[p] = count
                else:
                    del self.pair_counts[p]
                if delta > 0:
                    increased.add(p)
                    self.pair_words.setdefault(p, set()).add(i)
                elif p not in new_pairs:
                    self.pair_words[p].discard(i)
        self.pair_words.pop(pair, None)
        self.pair_counts.pop(pair, None)
        for p in sorted(increased):
            count = self.pair_counts.get(p, 0)
            if count > 0:
                heapq.heappush(self.heap, (-count, p[0], p[1]))

    def recount(self) -> dict[tuple[int, int], int]:
        """Count all pairs from scratch (the slow textbook way): used by tests as ground truth."""
        counts: Counter[tuple[int, int]] = Counter()
        for symbols, freq in zip(self.words, self.freqs):
            for pair, n in _pair_counter(symbols).items():
                counts[pair] += n * freq
        return dict(counts)


class ByteLevelBPE:
    """A trained byte-level BPE tokenizer: merge table + encode/decode + export to ``transformers``.

    Create one with :meth:`train`. Token ids: ``0..255`` are bytes, the next ids are the merged
    tokens in the order they were learned, the special tokens come last.

    Encoding follows GPT-2: split out special tokens, pre-tokenize with :data:`GPT2_SPLIT_PATTERN`,
    and inside each pre-token start from its bytes and repeatedly apply the merge with the
    *lowest rank* (learned earliest) among the adjacent pairs present, until none applies.
    Results are cached per pre-token, since the same words recur constantly.
    """

    def __init__(
        self,
        merges: Sequence[tuple[int, int]],
        special_tokens: Sequence[str] = ("<|endoftext|>",),
    ) -> None:
        """Rebuild a tokenizer from its merge list (``(left_id, right_id)`` pairs in rank order).

        Merge ``r`` creates the token whose bytes are ``bytes(left) + bytes(right)``. If those bytes
        are already a token (two merges spelling one string, e.g. ``ab+c`` and ``a+bc``), the
        existing id is reused -- as ``tokenizers`` does -- so each string has exactly one id.
        """
        specials = list(special_tokens)
        for s in specials:
            if not isinstance(s, str) or not s:
                raise ValueError(f"special_tokens must be non-empty strings, got {s!r}")
        if len(set(specials)) != len(specials):
            raise ValueError(f"special_tokens must be distinct, got {specials!r}")
        self._merges: list[tuple[int, int]] = []
        # id -> the bytes the token stands for; bytes -> id (inverse, for reuse detection).
        self._id_to_bytes: list[bytes] = [bytes([b]) for b in range(_NUM_BYTES)]
        self._bytes_to_id: dict[bytes, int] = {tok: i for i, tok in enumerate(self._id_to_bytes)}
        # (left, right) -> (rank, merged id): what the encoder looks up for each adjacent pair.
        self._ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for left, right in merges:
            self._add_merge(int(left), int(right))
        self._special_tokens = specials
        first_special = len(self._id_to_bytes)
        self._special_to_id = {s: first_special + k for k, s in enumerate(specials)}
        # Longest first so that the alternation is leftmost-longest, like tokenizers' matcher.
        self._special_re = (
            re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
            if specials
            else None
        )
        self._cache: dict[str, list[int]] = {}

    def _add_merge(self, left: int, right: int) -> int:
        """Register merge ``(left, right)``; return the id of the merged token (new or reused)."""
        n = len(self._id_to_bytes)
        if not (0 <= left < n and 0 <= right < n):
            raise ValueError(f"merge ({left}, {right}) refers to an id outside 0..{n - 1}")
        if (left, right) in self._ranks:
            raise ValueError(f"merge ({left}, {right}) appears twice")
        merged = self._id_to_bytes[left] + self._id_to_bytes[right]
        new_id = self._bytes_to_id.get(merged)
        if new_id is None:
            new_id = n
            self._id_to_bytes.append(merged)
            self._bytes_to_id[merged] = new_id
        self._ranks[(left, right)] = (len(self._merges), new_id)
        self._merges.append((left, right))
        return new_id

    # ------------------------------------------------------------------ training

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        special_tokens: Sequence[str] = ("<|endoftext|>",),
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> ByteLevelBPE:
        """Learn merges from ``texts`` until the vocabulary has ``vocab_size`` tokens.

        Args:
            texts: training documents. Occurrences of the special tokens are cut out first,
                so no merge ever spans one (the encoder cuts them out the same way).
            vocab_size: total vocabulary size: 256 bytes + merged tokens + special tokens.
                Training stops earlier if no pair occurs ``min_frequency`` times any more.
            special_tokens: appended after the merged tokens, in this order.
            min_frequency: a pair must occur at least this many times to be merged.
            show_progress: show a ``tqdm`` progress bar over merges, if tqdm is installed.

        Algorithm (see the module docstring): count distinct pre-tokens, then repeat
        *pop the most frequent pair -> merge it in the words that contain it -> fix the pair
        counts of those words only*.

        Tie-breaking is deterministic: among pairs with the same count, the pair with the
        smallest ``(left_id, right_id)`` wins, i.e. the one whose left token was learned first
        (for raw bytes: the lowest byte value). It does not depend on dict or set order.
        """
        specials = list(special_tokens)
        _check_int(
            "vocab_size", vocab_size, _NUM_BYTES + len(specials),
            f"{_NUM_BYTES} byte tokens + {len(specials)} special tokens",
        )
        _check_int("min_frequency", min_frequency, 1, "a pair must occur at least once to be merged")
        if isinstance(texts, str):
            raise ValueError("texts must be an iterable of strings (documents), got a single str")
        tokenizer = cls([], special_tokens=specials)  # validates special_tokens

        # 1. word -> count, over the distinct pre-tokens (as UTF-8 bytes).
        word_freqs: Counter[str] = Counter()
        for text in texts:
            for chunk in tokenizer._split_specials(text):
                if isinstance(chunk, str):
                    word_freqs.update(pretokenize(chunk))
        state = _MergeState({w.encode("utf-8"): c for w, c in word_freqs.items()})

        # 2. the merge loop.
        target_tokens = vocab_size - len(specials)
        progress = _maybe_tqdm(show_progress, total=target_tokens - _NUM_BYTES)
        while len(tokenizer._id_to_bytes) < target_tokens:
            best = state.best_pair()
            if best is None or best[1] < min_frequency:
                break
            pair, _ = best
            n_before = len(tokenizer._id_to_bytes)
            if pair in tokenizer._ranks:
                # Only possible after an id was reused (see __init__): the pair was merged
                # before and re-formed later. Apply it again, but it needs no new rank.
                new_id = tokenizer._ranks[pair][1]
            else:
                new_id = tokenizer._add_merge(*pair)
            state.merge(pair, new_id)
            if progress is not None and len(tokenizer._id_to_bytes) > n_before:
                progress.update(1)
        if progress is not None:
            progress.close()
        # Specials go after the final merged token; rebuild so their ids are right.
        return cls(tokenizer._merges, special_tokens=specials)

    # ------------------------------------------------------------------ properties

    @property
    def merges(self) -> list[tuple[int, int]]:
        """The learned merges ``(left_id, right_id)``, in rank order (rank 0 = learned first)."""
        return list(self._merges)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token -> id (they sit at the end of the vocabulary)."""
        return dict(self._special_to_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes + merged tokens + special tokens."""
        return len(self._id_to_bytes) + len(self._special_tokens)

    @property
    def eos_token_id(self) -> int | None:
        """Id of ``<|endoftext|>`` if it is one of the special tokens."""
        return self._special_to_id.get("<|endoftext|>")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a (non-special) token stands for; ``b""`` for special tokens."""
        if 0 <= token_id < len(self._id_to_bytes):
            return self._id_to_bytes[token_id]
        if token_id < self.vocab_size:
            return b""
        raise ValueError(f"token_id must be in 0..{self.vocab_size - 1}, got {token_id}")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
            f"special_tokens={self._special_tokens!r})"
        )

    # ------------------------------------------------------------------ encode / decode

    def _split_specials(self, text: str) -> list[str | int]:
        """Cut ``text`` into plain-text chunks (str) and special-token ids (int)."""
        if self._special_re is None:
            return [text]
        out: list[str | int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out.append(text[pos : m.start()])
            out.append(self._special_to_id[m.group()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def _encode_word(self, word: str) -> list[int]:
        """BPE one pre-token: apply the lowest-rank available merge until none applies."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = list(word.encode("utf-8"))
        ranks = self._ranks
        while len(symbols) > 1:
            best: tuple[int, int] | None = None  # (rank, merged id)
            best_pair = (0, 0)
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best is None or r[0] < best[0]):
                    best, best_pair = r, pair
            if best is None:
                break
            symbols = _merge_symbols(symbols, best_pair[0], best_pair[1], best[1])
        if len(self._cache) >= 200_000:  # bound memory on huge, diverse inputs
            self._cache.clear()
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special-token strings in ``text`` become their ids (as in ``transformers``)."""
        ids: list[int] = []
        for chunk in self._split_specials(text):
            if isinstance(chunk, int):
                ids.append(chunk)
                continue
            for word in pretokenize(chunk):
                ids.extend(self._encode_word(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Special tokens are written out as their strings.

        Bytes are concatenated first and decoded once, so a character split across tokens
        comes back whole; invalid UTF-8 (only possible for arbitrary id sequences) becomes U+FFFD,
        as in ``decoders.ByteLevel``.
        """
        id_to_special = {i: s for s, i in self._special_to_id.items()}
        parts: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i in id_to_special:
                parts.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                parts.append(id_to_special[i])
            else:
                buf += self.token_bytes(i)
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    # ------------------------------------------------------------------ export

    def to_fast_tokenizer(self, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
        """Export as a ``transformers`` fast tokenizer backed by ``tokenizers.models.BPE``.

        Vocabulary and merges are written in GPT-2's byte-level unicode alphabet
        (:func:`bytes_to_unicode`), pre-tokenization is ``ByteLevel(add_prefix_space=False,
        use_regex=True)`` -- the same regex as :func:`pretokenize` -- and decoding is
        ``decoders.ByteLevel()``. No post-processor adds tokens (no BOS/EOS on ``encode``);
        the special tokens are registered as added special tokens with their ids at the end.
        ``save_pretrained`` + ``AutoTokenizer.from_pretrained(folder)`` reload it with no remote code.
        """
        b2u = bytes_to_unicode()

        def to_unicode(token: bytes) -> str:
            return "".join(b2u[b] for b in token)

        vocab = {to_unicode(tok): i for i, tok in enumerate(self._id_to_bytes)}
        merges = [(to_unicode(self._id_to_bytes[a]), to_unicode(self._id_to_bytes[b])) for a, b in self._merges]
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, ignore_merges=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False) for s in self._special_tokens]
        )
        for s, i in self._special_to_id.items():
            if backend.token_to_id(s) != i:
                raise ValueError(
                    f"special token {s!r} collides with a learned token; choose special tokens that"
                    " cannot be produced by merges (e.g. '<|...|>')"
                )
        eos = "<|endoftext|>" if "<|endoftext|>" in self._special_to_id else None
        kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            eos_token=eos,
            bos_token=eos,  # GPT-2 convention: one <|endoftext|> serves as document separator/BOS
            unk_token=None,  # byte-level: every string is representable, nothing is unknown
            clean_up_tokenization_spaces=False,  # would turn " ." into "." and break round-trips
            **kwargs,
        )


def _maybe_tqdm(enabled: bool, total: int):
    """A tqdm progress bar if asked for and available, else None (library code prints nothing)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers' dependencies
        return None
    return tqdm(total=total, desc="BPE merges", unit="merge")
