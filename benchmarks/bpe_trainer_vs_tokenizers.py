"""Benchmark: the hand-written BPE trainer (lesson 2) against ``tokenizers``' Rust ``BpeTrainer``.

Both train a byte-level BPE on the Shakespeare train split with the same pre-tokenizer
(GPT-2's regex, ``ByteLevel(add_prefix_space=False, use_regex=True)``), the same vocabulary
size, the same ``<|endoftext|>`` special token and the same ``min_frequency``. The script
prints, side by side:

* training seconds for each (wall clock, pre-tokenization and counting included: the median of
  ``--rounds`` interleaved runs of the shared timer, ``hf_models.benchmarking.time_interleaved``)
  and their ratio, with its paired q1-q3 noise band;
* compression on the validation split: UTF-8 bytes per token (higher = fewer tokens);
* how many of the learned merges the two trainers share (they differ only through tie-breaking).

and writes the table as JSON under ``benchmarks/results/`` (git-ignored), with the machine
description. Measured numbers are in ``benchmarks/README.md``::

    python benchmarks/bpe_trainer_vs_tokenizers.py                 # vocab 4096
    python benchmarks/bpe_trainer_vs_tokenizers.py --vocab_size 8192
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import HfArgumentParser

from hf_models.benchmarking import prepare_benchmark, time_interleaved
from hf_models.data import load_corpus
from hf_models.files import write_json_atomically
from hf_models.tokenization import ByteLevelBPE, pretokenize

EOS = "<|endoftext|>"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class BPEBenchmarkArguments:
    vocab_size: int = field(default=4096, metadata={"help": "Total vocabulary size."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair count to merge."})
    rounds: int = field(default=3, metadata={"help": "Timed interleaved trainings of each side."})
    warmup: int = field(default=1, metadata={"help": "Untimed trainings of each side first."})
    threads: int = field(default=0, metadata={"help": "Threads of tokenizers' Rust trainer (RAYON_NUM_THREADS; 0: every usable CPU)."})
    output: str | None = field(
        default=None, metadata={"help": "JSON path (default benchmarks/results/bpe_trainer_vs_tokenizers_v<vocab>.json)."}
    )


def train_tokenizers_bpe(texts: list[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """``tokenizers``' own trainer, configured like ByteLevelBPE.train."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, as in ByteLevelBPE
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def main() -> None:
    (args,) = HfArgumentParser(BPEBenchmarkArguments).parse_args_into_dataclasses()
    machine = prepare_benchmark(args.threads, measure_peak=False)  # no matmuls here: no peak to probe

    corpus = load_corpus("shakespeare")
    train_texts, valid_texts = list(corpus["train"]["text"]), list(corpus["validation"]["text"])
    train_bytes = sum(len(t.encode()) for t in train_texts)
    valid_bytes = sum(len(t.encode()) for t in valid_texts)

    # One-time, per-process cost of our pre-tokenizer (measuring the Unicode tables of both
    # regex engines, see hf_models.tokenization.bpe._drift); reported, not counted as training.
    start = time.perf_counter()
    pretokenize("warm up")
    probe_s = time.perf_counter() - start

    trained = {}
    timings = time_interleaved(
        {
            "ours": lambda: trained.update(ours=ByteLevelBPE.train(train_texts, args.vocab_size, special_tokens=(EOS,),
                                                                  min_frequency=args.min_frequency)),
            "tokenizers": lambda: trained.update(theirs=train_tokenizers_bpe(train_texts, args.vocab_size, args.min_frequency)),
        },
        rounds=args.rounds,
        warmup=args.warmup,
    )
    ours, theirs = trained["ours"], trained["theirs"]  # every run learns the same merges; keep the last
    ours_s, theirs_s = timings.median_seconds["ours"], timings.median_seconds["tokenizers"]
    ratio = timings.speedup("tokenizers", baseline="ours")  # per round: ours_s / tokenizers_s

    ours_fast = ours.to_fast_tokenizer()
    ours_tokens = sum(len(ids) for ids in ours_fast(valid_texts)["input_ids"])
    assert ours_tokens == sum(len(ours.encode(t)) for t in valid_texts)  # the two encoders agree
    theirs_tokens = sum(len(e.ids) for e in theirs.encode_batch(valid_texts))

    # Merges as byte-level strings, to compare the two merge lists.
    ours_merge_list = [tuple(m) for m in json.loads(ours_fast.backend_tokenizer.to_str())["model"]["merges"]]
    theirs_merge_list = [tuple(m) for m in json.loads(theirs.to_str())["model"]["merges"]]
    ours_merges, theirs_merges = set(ours_merge_list), set(theirs_merge_list)

    rows = [
        {
            "trainer": "hf_models ByteLevelBPE (Python)",
            "train_seconds": round(ours_s, 3),
            "vocab_size": ours.vocab_size,
            "merges": len(ours.merges),
            "valid_tokens": ours_tokens,
            "valid_bytes_per_token": round(valid_bytes / ours_tokens, 4),
        },
        {
            "trainer": f"tokenizers {tokenizers.__version__} BpeTrainer (Rust)",
            "train_seconds": round(theirs_s, 3),
            "vocab_size": theirs.get_vocab_size(),
            "merges": len(theirs_merges),
            "valid_tokens": theirs_tokens,
            "valid_bytes_per_token": round(valid_bytes / theirs_tokens, 4),
        },
    ]
    result = {
        "benchmark": "bpe_trainer_vs_tokenizers",
        "corpus": "shakespeare",
        "train_bytes": train_bytes,
        "valid_bytes": valid_bytes,
        "requested_vocab_size": args.vocab_size,
        "min_frequency": args.min_frequency,
        "rows": rows,
        "time_ratio_ours_over_tokenizers": round(ours_s / theirs_s, 2),
        "time_ratio_paired_quartiles": [round(ratio.q1, 2), round(ratio.median, 2), round(ratio.q3, 2)],
        "timings": timings.to_dict(),
        "shared_merges": len(ours_merges & theirs_merges),
        "same_merges_in_same_order": ours_merge_list == theirs_merge_list,
        "pretokenizer_probe_seconds": round(probe_s, 3),
        "machine": machine.to_dict(),
        "rayon_threads": os.environ.get("RAYON_NUM_THREADS", "default"),
    }

    header = f"{'trainer':<42} {'train s':>8} {'vocab':>6} {'merges':>6} {'val tokens':>10} {'bytes/token':>11}"
    print(f"Shakespeare: train {train_bytes / 1e6:.2f} MB, validation {valid_bytes / 1e6:.2f} MB")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['trainer']:<42} {row['train_seconds']:>8.2f} {row['vocab_size']:>6} {row['merges']:>6}"
            f" {row['valid_tokens']:>10} {row['valid_bytes_per_token']:>11.3f}"
        )
    print(
        f"time ratio (ours / tokenizers, medians of {timings.rounds} interleaved rounds):"
        f" {result['time_ratio_ours_over_tokenizers']:.1f}x, paired q1-q3 {ratio.q1:.2f}-{ratio.q3:.2f};"
        f" shared merges: {result['shared_merges']} of {len(ours.merges)}"
        f" (same order: {result['same_merges_in_same_order']});"
        f" one-time pre-tokenizer probe: {probe_s:.2f} s (not in the training time)"
    )

    output = write_json_atomically(args.output or RESULTS_DIR / f"bpe_trainer_vs_tokenizers_v{args.vocab_size}.json", result)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
