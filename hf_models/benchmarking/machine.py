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


def matmul_peak_flops(dtype: torch.dtype = torch.float32, size: int = 2048, rounds: int = 5, warmup: int = 1) -> float:
    """FLOP/s of the fastest of ``rounds`` (size x size) @ (size x size) matmuls, on torch's current threads.

    A square matmul this large is the best case for the BLAS kernels, so its speed is what "peak"
    means in MFU. The fastest call, not the median, is taken because a peak is a best case: a call
    slowed by another process says something about the other process. On a shared machine even
    the fastest moves between probes, so benchmarks that report MFU probe more than once and
    divide by the best probe of the run.
    """
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    seconds = time_interleaved({"matmul": lambda: a @ b}, rounds=rounds, warmup=warmup).seconds["matmul"]
    return 2 * size**3 / min(seconds)


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


def describe_machine(measure_peak: bool = True, peak_size: int = 2048) -> MachineDescription:
    """Describe this machine as a benchmark sees it now; ``measure_peak`` probes fp32 and bf16 matmuls.

    Call it after choosing torch's thread count: the threads and the peak are read at call time.
    """
    cpu, flags, physical_cores = _cpuinfo()
    description = MachineDescription(
        cpu=cpu,
        logical_cpus=os.cpu_count(),
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
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
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        description.matmul_peak_gflops = {name: matmul_peak_flops(dtype, size=peak_size) / 1e9 for name, dtype in dtypes.items()}
    return description
