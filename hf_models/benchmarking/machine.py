"""The one machine description every result is written with, and the OpenMP wait policy.

A tokens/s figure means little without the machine it came from: the CPU and its vector
instructions (AVX-512 BF16 and AMX decide whether bfloat16 is fast at all), how many cores the
process may use, how many threads torch runs, and how fast this machine multiplies matrices *right
now*. The last one is measured, not looked up: on a shared VM the achievable peak moves with other
people's load, and a model FLOPs utilisation (MFU) divided by a datasheet peak would be fiction.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from .timer import time_interleaved

# The /proc/cpuinfo flags that decide matmul speed on x86: AVX2/FMA (the fp32 baseline), AVX-512
# (twice the width), AVX-512 BF16 and VNNI (bfloat16 / int8 dot products), AMX (tile matmul units,
# roughly another 4-8x for bf16 on Sapphire Rapids and later). ARM reports asimd, sve, bf16, i8mm.
MATMUL_FLAGS = (
    "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
    "asimd", "sve", "sve2", "bf16", "i8mm",
)


def use_passive_omp_wait() -> None:
    """Make OpenMP threads sleep, not spin, while they wait; restarts the process once to do so.

    libgomp's default makes a thread that reaches the end of a parallel region spin until its
    partners arrive. On a machine shared with other jobs, a partner is often descheduled, so the
    spinning thread burns its time slice and every small op costs about one scheduler tick. That
    slows small-op workloads (batch-1 decoding) by an order of magnitude and, worse for a
    benchmark, penalises each model by its *number of ops* rather than its work. ``PASSIVE``
    threads sleep instead.

    libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it, and importing ``hf_models`` has
    already imported torch; so if the variable is unset this sets it and re-executes the same
    command (``os.execv``), before the script has done any work. A value already in the
    environment is respected: ``OMP_WAIT_POLICY=ACTIVE python benchmarks/...`` measures libgomp's
    default, which is the right choice on an idle, dedicated machine.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def _cpuinfo() -> tuple[str, set[str], int | None]:
    """(model name, flags, physical cores) from /proc/cpuinfo; what is missing stays empty."""
    model, flags, cores = platform.processor() or platform.machine(), set(), set()
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return model, flags, None
    physical_id = "0"
    for line in path.read_text().splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name":
            model = value
        elif key in ("flags", "Features"):  # x86, ARM
            flags |= set(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    return model, flags, len(cores) or None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# The bounded probe: matmuls grow from PROBE_START_SIZE, doubling, until one takes PROBE_TARGET_SECONDS,
# never spending more than PROBE_BUDGET_SECONDS on one precision (describe_machine probes two: ~2 s in all).
# A fixed 2048^2 bf16 matmul takes ~2 minutes on a CPU without bf16 instructions (AVX2 only).
PROBE_START_SIZE = 64
PROBE_MAX_SIZE = 4096
PROBE_TARGET_SECONDS = 0.05
PROBE_BUDGET_SECONDS = 1.0
PROBE_ROUNDS = 3  # timed calls per size after the first (which warms the kernels and prices the rest)

_peak_cache: dict[tuple[torch.dtype, int], tuple[float, int]] = {}


def _matmul_seconds(dtype: torch.dtype, size: int, rounds: int) -> list[float]:
    """Seconds of each of ``rounds`` (size x size) @ (size x size) matmuls, timed by the one benchmark timer."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return list(time_interleaved({"matmul": lambda: a @ b}, rounds=rounds, warmup=0).seconds["matmul"])


def matmul_probe(dtype: torch.dtype = torch.float32, target_seconds: float = PROBE_TARGET_SECONDS,
                 budget_seconds: float = PROBE_BUDGET_SECONDS) -> tuple[float, int]:
    """``(FLOP/s, size)``: the best square-matmul speed found, sized up until a matmul takes ``target_seconds``.

    Sizes double from 64. Each size is called once (warm-up, and a price for more calls), then up to
    :data:`PROBE_ROUNDS` more times as the budget allows; the fastest call counts, because a peak is
    a best case. Growth stops at the first size whose fastest call takes ``target_seconds``, or when the
    next size (8x the work) would overrun ``budget_seconds``. So the probe ends in about
    ``budget_seconds`` at most on any machine, and on a fast one stops at a size large enough for the
    BLAS kernels to run near their peak.
    """
    size, spent, best = PROBE_START_SIZE, 0.0, (0.0, PROBE_START_SIZE)
    while True:
        seconds = _matmul_seconds(dtype, size, rounds=1)
        spent += seconds[0]
        more = min(PROBE_ROUNDS, int((budget_seconds - spent) / max(seconds[0], 1e-9)))
        if more > 0:
            extra = _matmul_seconds(dtype, size, rounds=more)
            spent += sum(extra)
            seconds += extra
        fastest = min(seconds)
        best = max(best, (2 * size**3 / fastest, size))
        next_cost = 8 * fastest * (1 + PROBE_ROUNDS)
        if fastest >= target_seconds or spent + next_cost > budget_seconds or size * 2 > PROBE_MAX_SIZE:
            return best
        size *= 2


def matmul_peak_flops(dtype: torch.dtype = torch.float32, size: int | None = None, rounds: int = 5, warmup: int = 1) -> float:
    """FLOP/s of square matmuls on torch's current threads: the bounded :func:`matmul_probe` (``size=None``),
    or the fastest of ``rounds`` matmuls of an explicit ``size``.

    A large square matmul is the best case for the BLAS kernels, so its speed is what "peak" means in
    MFU. The fastest call, not the median, is taken because a peak is a best case: a call slowed by
    another process says something about the other process. On a shared machine even the fastest
    moves between probes, so benchmarks that report MFU probe more than once and divide by the best
    probe of the run (this function never caches; :func:`describe_machine` does).
    """
    if size is None:
        return matmul_probe(dtype)[0]
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    seconds = time_interleaved({"matmul": lambda: a @ b}, rounds=rounds, warmup=warmup).seconds["matmul"]
    return 2 * size**3 / min(seconds)


def cached_matmul_probe(dtype: torch.dtype) -> tuple[float, int]:
    """:func:`matmul_probe`, once per process and torch thread count (what a second call returns without timing)."""
    key = (dtype, torch.get_num_threads())
    if key not in _peak_cache:
        _peak_cache[key] = matmul_probe(dtype)
    return _peak_cache[key]


@dataclass
class MachineDescription:
    """The machine a result was measured on. ``to_dict()`` goes into every results file."""

    cpu: str
    logical_cpus: int | None
    usable_cpus: int | None  # the CPUs this process may run on (affinity, cgroup cpusets)
    physical_cores: int | None
    matmul_flags: list[str]
    torch_threads: int
    torch_interop_threads: int
    omp_wait_policy: str | None
    load_average_1min: float | None
    platform: str
    python: str
    versions: dict[str, str | None]
    matmul_peak_gflops: dict[str, float] = field(default_factory=dict)  # "fp32" / "bf16" -> GFLOP/s
    matmul_probe_size: dict[str, int] = field(default_factory=dict)  # "fp32" / "bf16" -> the probe's largest size

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for a script's output."""
        cores = f"{self.usable_cpus} usable CPUs" + (f" ({self.physical_cores} physical cores)" if self.physical_cores else "")
        peak = ", ".join(f"{name} {gflops:.0f}" for name, gflops in self.matmul_peak_gflops.items())
        return (
            f"{self.cpu}, {cores}, flags {' '.join(self.matmul_flags) or 'none known'}; torch {self.versions['torch']}, "
            f"{self.torch_threads} thread(s), OMP_WAIT_POLICY={self.omp_wait_policy}, load {self.load_average_1min}"
            + (f"; matmul peak GFLOP/s: {peak}" if peak else "")
        )


def describe_machine(measure_peak: bool = True) -> MachineDescription:
    """Describe this machine as a benchmark sees it now; ``measure_peak`` probes fp32 and bf16 matmuls.

    Call it after choosing torch's thread count: the threads and the peak are read at call time.
    The probes are bounded (:func:`matmul_probe`: ~2 s at most each) and cached per process and
    thread count, so a recipe that describes its machine twice times the matmuls once.
    """
    cpu, flags, physical_cores = _cpuinfo()
    description = MachineDescription(
        cpu=cpu,
        logical_cpus=os.cpu_count(),
        usable_cpus=usable_cpus(),
        physical_cores=physical_cores,
        matmul_flags=[flag for flag in MATMUL_FLAGS if flag in flags],
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        load_average_1min=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        platform=platform.platform(),
        python=platform.python_version(),
        versions={package: _version(package) for package in ("torch", "transformers", "tokenizers", "numpy")},
    )
    if measure_peak:
        probes = {name: cached_matmul_probe(dtype) for name, dtype in PRECISIONS.items()}
        description.matmul_peak_gflops = {name: flops / 1e9 for name, (flops, _) in probes.items()}
        description.matmul_probe_size = {name: size for name, (_, size) in probes.items()}
    return description


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; a container may allow fewer than ``os.cpu_count()``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_benchmark(threads: int, measure_peak: bool = True) -> MachineDescription:
    """The start of every speed benchmark: sleeping OpenMP waits, pinned threads, the machine printed.

    * :func:`use_passive_omp_wait` (may restart the script once, so call this before any work);
    * ``threads`` (0: every usable CPU) pinned for torch's intra-op pool and for tokenizers' Rust pool
      (``RAYON_NUM_THREADS``, read when that pool starts), so that both sides of a comparison run on
      the same number of cores and a result names how many;
    * :func:`describe_machine` printed as one line, the table's caption, and returned for the results file.
    """
    if threads < 0:
        raise SystemExit(f"--threads must be 0 (every usable CPU) or a positive count, got {threads}.")
    use_passive_omp_wait()
    threads = threads or usable_cpus()
    torch.set_num_threads(threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    machine = describe_machine(measure_peak=measure_peak)
    print(f"machine: {machine.summary()}", flush=True)
    return machine


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
BF16_MIN_SPEEDUP = 1.25
"""How much faster than fp32 bf16 matmuls must measure before bf16 autocast is chosen: autocast adds
casts around every matmul, so a tie is a loss."""


def bf16_autocast_pays(machine: MachineDescription | None = None) -> tuple[bool, str]:
    """``(use bf16 autocast?, why)`` from this machine's measured fp32 and bf16 matmul peaks.

    bf16 halves the bytes moved, but its matmuls are fast only on hardware with bf16 units (AVX-512
    BF16, AMX, a GPU's tensor cores); elsewhere torch emulates them, many times slower than fp32.
    """
    peaks = (machine or describe_machine()).matmul_peak_gflops
    ratio = peaks["bf16"] / peaks["fp32"]
    verdict = ratio >= BF16_MIN_SPEEDUP
    why = (f"measured matmul peaks here: bf16 {peaks['bf16']:.0f} vs fp32 {peaks['fp32']:.0f} GFLOP/s "
           f"({ratio:.2f}x; bf16 needs >= {BF16_MIN_SPEEDUP}x)")
    return verdict, why
