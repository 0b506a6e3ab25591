"""The data layer: corpora as ``DatasetDict``\\s with a ``text`` column, and packing them into LM blocks.

    from hf_models.data import load_corpus, pack_for_causal_lm
    corpus = load_corpus("shakespeare")                      # train / validation / test, split by play
    blocks = pack_for_causal_lm(corpus, tokenizer, block_size=256)   # input_ids == labels
"""

from .corpora import (
    CORPORA,
    SHAKESPEARE_TEST_PLAYS,
    SHAKESPEARE_VALIDATION_PLAYS,
    WIKITEXT_2_CONFIG,
    WIKITEXT_HUB_ID,
    CorpusUnavailableError,
    load_corpus,
    play_markdown_to_text,
)
from .instructions import (
    CHAT_TEMPLATE,
    add_chat_template,
    use_training_chat_template,
    build_instruction_dataset,
    build_preference_dataset,
    load_instruction_data,
    load_preference_data,
    score_next_lines,
)
from .windows import RandomWindows
from .packing import (
    GROUP_BATCH_SIZE,
    pack_for_causal_lm,
    packed_cache_dir,
    split_num_bytes,
    split_token_ids,
    tokenizer_fingerprint,
)

__all__ = [
    "CHAT_TEMPLATE",
    "add_chat_template",
    "use_training_chat_template",
    "build_instruction_dataset",
    "build_preference_dataset",
    "load_instruction_data",
    "load_preference_data",
    "score_next_lines",
    "RandomWindows",
    "CORPORA",
    "GROUP_BATCH_SIZE",
    "SHAKESPEARE_TEST_PLAYS",
    "SHAKESPEARE_VALIDATION_PLAYS",
    "WIKITEXT_2_CONFIG",
    "WIKITEXT_HUB_ID",
    "CorpusUnavailableError",
    "load_corpus",
    "pack_for_causal_lm",
    "packed_cache_dir",
    "play_markdown_to_text",
    "split_num_bytes",
    "split_token_ids",
    "tokenizer_fingerprint",
]
