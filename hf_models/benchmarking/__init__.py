"""One way to measure speed: the benchmark timer and the machine description.

Every benchmark script and lesson 6 time their contenders with :func:`time_interleaved` and write
:func:`describe_machine` next to their numbers, so every figure in the project was taken, and can
be read, the same way. Training throughput inside ``Trainer`` is a different measurement (one loop,
no contenders) and lives in ``hf_models.training.ThroughputCallback``.

Saved models never import this package; it is for the measuring side only.
"""

from .machine import MachineDescription, describe_machine, matmul_peak_flops, use_passive_omp_wait
from .skipping import SKIPPED_EXIT_CODE, skip_benchmark
from .timer import InterleavedTimings, PairedRatio, quartiles, rotated, time_interleaved

__all__ = [
    "SKIPPED_EXIT_CODE",
    "InterleavedTimings",
    "MachineDescription",
    "PairedRatio",
    "describe_machine",
    "matmul_peak_flops",
    "quartiles",
    "rotated",
    "skip_benchmark",
    "time_interleaved",
    "use_passive_omp_wait",
]
