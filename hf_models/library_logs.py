"""Library log lines a recipe shows: each warning once, and none about a package the zoo never uses.

bitsandbytes logs through ``logging`` (not ``warnings``, which would show a line once per place
by default), so a warning inside a forward pass repeats at every call: lesson 9 printed
"MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization" 13,048
times. And every recipe imports bitsandbytes, though only lesson 9 uses it: ``Trainer`` imports
peft (``transformers.trainer_utils``), and peft imports bitsandbytes at import time, which logs
that an optional 4-bit CPU kernel (the ``kernels`` package) is missing. The zoo cannot make a
library's import lazy, so it filters that one line; lesson 9's NF4 runs without the kernel.
"""

from __future__ import annotations

import logging

# Loggers whose warnings are shown once per distinct message.
ONCE_PER_MESSAGE = ("bitsandbytes.autograd._functions", "bitsandbytes.nn.modules")
# (logger, start of the message) never shown: advice about an optional package the lessons do not need.
NOT_SHOWN = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),)


class OncePerMessage(logging.Filter):
    """Let each distinct message (after %-formatting) through the first time only."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class DropMessage(logging.Filter):
    """Drop the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_library_logs() -> None:
    """Install the filters above on their loggers (a logger filter sees only its own logger's records,
    hence the exact names). Idempotent. ``import hf_models`` runs it, so it is in place before a
    recipe's first ``Trainer`` import; a script that imports peft or trl before ``hf_models``
    (lessons 8 and 11, which use peft) sees the kernels line once."""
    for name in ONCE_PER_MESSAGE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OncePerMessage) for f in logger.filters):
            logger.addFilter(OncePerMessage())
    for name, prefix in NOT_SHOWN:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(DropMessage(prefix))
