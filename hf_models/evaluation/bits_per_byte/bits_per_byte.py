"""Bits per byte, loss and perplexity of a language model, as a local ``evaluate`` metric.

Why bits per byte? Loss per token depends on the tokenizer: a character model predicts ~4x more
tokens than a BPE model for the same text, so their per-token losses are not comparable. Dividing
the total negative log-likelihood (in bits) by the number of UTF-8 bytes the predicted tokens
stand for gives a number that only depends on how well the text is predicted. A model that
assigns probability p to the whole text scores ``-log2(p) / bytes``; 8 bits per byte is a uniform
guess over bytes, gzip lands around 2.5-3 on English, and strong LLMs go well below 1.

Inputs are per-sequence sums, so that a split of a million tokens is a few thousand rows:

* ``nll``: the summed negative log-likelihood of the predicted tokens, in nats;
* ``num_tokens``: how many tokens were predicted;
* ``num_bytes``: how many UTF-8 bytes those predicted tokens stand for.

This module lives in the repository and is loaded by path (``evaluate.load(<this folder>)``): the
metrics on the Hub cannot be downloaded offline, and this one is three lines of arithmetic.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Loss (nats per token), perplexity and bits per UTF-8 byte of a language model on held-out text."

_KWARGS_DESCRIPTION = """
Args:
    nll (`list[float]`): summed negative log-likelihood, in nats, of the predicted tokens of each sequence.
    num_tokens (`list[int]`): number of predicted tokens in each sequence.
    num_bytes (`list[int]`): number of UTF-8 bytes those tokens stand for.
Returns:
    loss (`float`): mean nats per predicted token.
    perplexity (`float`): exp(loss).
    bits_per_byte (`float`): total nll / ln(2) / total bytes.
    tokens (`int`), bytes (`int`): the totals.
Examples:
    >>> metric = evaluate.load("hf_models/evaluation/bits_per_byte")
    >>> metric.compute(nll=[2 * math.log(2)], num_tokens=[2], num_bytes=[2])["bits_per_byte"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BitsPerByte(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "nll": datasets.Value("float64"),
                    "num_tokens": datasets.Value("int64"),
                    "num_bytes": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, nll, num_tokens, num_bytes):
        total_nll, tokens, num_bytes_total = float(sum(nll)), int(sum(num_tokens)), int(sum(num_bytes))
        if tokens == 0 or num_bytes_total == 0:
            raise ValueError(f"bits_per_byte needs at least one predicted token and byte, got {tokens} tokens, {num_bytes_total} bytes.")
        loss = total_nll / tokens
        return {
            "loss": loss,
            "perplexity": math.exp(loss),
            "bits_per_byte": total_nll / math.log(2) / num_bytes_total,
            "tokens": tokens,
            "bytes": num_bytes_total,
        }
