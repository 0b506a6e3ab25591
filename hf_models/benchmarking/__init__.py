"""One way to measure speed: the benchmark timer, the step clock and the machine description.

Every benchmark script and lesson 6 time their contenders with :func:`time_interleaved` and write
:func:`describe_machine` next to their numbers, so every figure in the project was taken, and can
be read, the same way. Inside one loop (training steps, generated tokens) the measure is the
:class:`StepClock` (``step_clock.py``): lesson 7's loop ticks it, ``Trainer`` through
:class:`ThroughputCallback`, ``generate()`` as a stopping criterion.

* ``generation.py``: lesson 6's generation-timing harness (the six ways to generate, the model,
  the prompts, the cache's memory), shared by ``recipes/06_kv_cache.py`` and ``benchmarks/kv_cache.py``;
* ``memory.py``: what a training step holds in memory, measured (lesson 7, lesson 12).

Saved models never import this package; it is for the measuring side only.
"""

from .machine import (
    MachineDescription,
    bf16_autocast_pays,
    describe_machine,
    matmul_peak_flops,
    matmul_probe,
    prepare_benchmark,
    usable_cpus,
    use_passive_omp_wait,
)
from .skipping import SKIPPED_EXIT_CODE, skip_benchmark
from .step_clock import StepClock, ThroughputCallback
from .timer import InterleavedTimings, PairedRatio, quartiles, rotated, time_interleaved

__all__ = [
    "SKIPPED_EXIT_CODE",
    "InterleavedTimings",
    "MachineDescription",
    "PairedRatio",
    "StepClock",
    "ThroughputCallback",
    "bf16_autocast_pays",
    "describe_machine",
    "matmul_peak_flops",
    "matmul_probe",
    "prepare_benchmark",
    "quartiles",
    "rotated",
    "skip_benchmark",
    "time_interleaved",
    "usable_cpus",
    "use_passive_omp_wait",
]
