"""How a benchmark says "I cannot run with what I was given", so that ``make bench`` can go on.

``make bench`` runs every script in ``benchmarks/`` with its defaults. A script that needs
something the defaults cannot supply (a checkout of another project, a GPU) exits with
:data:`SKIPPED_EXIT_CODE` after printing why; the Makefile lists it as skipped, with that reason,
instead of stopping. 77 is the exit code automake and meson already read as "skipped".
"""

from __future__ import annotations

import sys
from typing import NoReturn

SKIPPED_EXIT_CODE = 77


def skip_benchmark(reason: str) -> NoReturn:
    """Print ``reason`` as the last line on stderr and exit with :data:`SKIPPED_EXIT_CODE`."""
    print(f"skipped: {reason}", file=sys.stderr, flush=True)
    raise SystemExit(SKIPPED_EXIT_CODE)
