"""The benchmark timer on a fake clock (order, warm-up, medians, paired ratios, min_seconds), the step clock,
and the benchmark scripts: each shows its own flags and shares code with the lessons through the package only."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_models.benchmarking import PairedRatio, bf16_autocast_pays, describe_machine, machine, matmul_probe, quartiles, time_interleaved

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """A clock that only moves when a contender "works": each call advances it by a scripted duration."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def contender(self, name: str, durations: list[float]):
        remaining = iter(durations)

        def work() -> None:
            self.calls.append(name)
            self.now += next(remaining)

        return work


def test_rounds_rotate_the_order_and_warmup_is_untimed():
    clock = FakeClock()
    contenders = {name: clock.contender(name, [100.0] + [1.0] * 10) for name in "abc"}  # first call: a slow warm-up
    timings = time_interleaved(contenders, rounds=4, warmup=1, clock=clock)

    assert clock.calls[:3] == ["a", "b", "c"]  # one warm-up call each
    assert timings.orders == [("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b"), ("a", "b", "c")]
    assert clock.calls[3:] == [name for order in timings.orders for name in order]
    assert timings.seconds == {name: [1.0] * 4 for name in "abc"}  # the 100 s warm-up is not in them
    assert timings.rounds == 4 and timings.warmup == 1


def test_two_contenders_alternate():
    clock = FakeClock()
    timings = time_interleaved({"ours": clock.contender("ours", [1.0] * 6), "twin": clock.contender("twin", [1.0] * 6)},
                               rounds=6, warmup=0, clock=clock)
    assert timings.orders == [("ours", "twin"), ("twin", "ours")] * 3


def test_medians_and_paired_ratio_quartiles():
    clock = FakeClock()
    fast = [1.0, 2.0, 1.0, 4.0, 1.0]
    slow = [2.0, 3.0, 3.0, 4.0, 100.0]  # one stalled round: the median and the quartiles shrug it off
    timings = time_interleaved({"fast": clock.contender("fast", fast), "slow": clock.contender("slow", slow)},
                               rounds=5, warmup=0, clock=clock)
    assert timings.seconds == {"fast": fast, "slow": slow}
    assert timings.median_seconds == {"fast": 1.0, "slow": 3.0}

    ratio = timings.speedup("fast", baseline="slow")
    assert ratio.per_round == [2.0, 1.5, 3.0, 1.0, 100.0]
    assert (ratio.q1, ratio.median, ratio.q3) == pytest.approx(tuple(np.percentile(ratio.per_round, [25, 50, 75])))
    assert (ratio.q1, ratio.median, ratio.q3) == pytest.approx((1.5, 2.0, 3.0))
    assert timings.speedup("slow", baseline="fast").median == pytest.approx(0.5)
    assert ratio.band() == "2.00 (1.50-3.00)"


def test_quartiles_stay_inside_the_data_with_few_rounds():
    assert quartiles([1.0, 2.0]) == pytest.approx((1.25, 1.5, 1.75))
    assert quartiles([3.0]) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError):
        PairedRatio.of([1.0, 2.0], [1.0])


def test_min_seconds_adds_rounds_up_to_max_rounds():
    clock = FakeClock()
    cheap, dear = clock.contender("cheap", [0.1] * 50), clock.contender("dear", [1.0] * 50)
    # Past the 2 rounds asked for, rounds go on until the cheapest contender has run 0.45 s in all.
    timings = time_interleaved({"cheap": cheap, "dear": dear}, rounds=2, warmup=0, min_seconds=0.45, clock=clock)
    assert timings.rounds == 5
    # ... but never past max_rounds.
    clock = FakeClock()
    cheap, dear = clock.contender("cheap", [0.1] * 50), clock.contender("dear", [1.0] * 50)
    timings = time_interleaved({"cheap": cheap, "dear": dear}, rounds=2, warmup=0, min_seconds=100, max_rounds=7, clock=clock)
    assert timings.rounds == 7


def test_results_are_json_ready():
    clock = FakeClock()
    timings = time_interleaved({"a": clock.contender("a", [1.0, 2.0, 3.0])}, rounds=2, warmup=1, clock=clock)
    assert timings.to_dict() == {"rounds": 2, "warmup": 1, "median_seconds": {"a": 2.5}, "seconds": {"a": [2.0, 3.0]},
                                 "orders": [["a"], ["a"]]}


def test_machine_description_without_the_peak_probe():
    description = describe_machine(measure_peak=False)
    assert description.torch_threads >= 1 and description.versions["torch"]
    assert description.matmul_peak_gflops == {}
    assert description.to_dict()["cpu"] == description.cpu and description.cpu in description.summary()


def fake_matmuls(monkeypatch, seconds_per_flop: float) -> list[tuple[int, int]]:
    """Replace the probe's matmuls by a machine doing ``1 / seconds_per_flop`` FLOP/s; returns the (size, rounds) asked for."""
    calls: list[tuple[int, int]] = []

    def matmul_seconds(dtype, size, rounds):
        calls.append((size, rounds))
        return [2 * size**3 * seconds_per_flop] * rounds

    monkeypatch.setattr(machine, "_matmul_seconds", matmul_seconds)
    return calls


def test_probe_grows_until_a_matmul_takes_50_ms(monkeypatch):
    calls = fake_matmuls(monkeypatch, 1 / 10e9)  # 10 GFLOP/s: 512^2 takes 27 ms, 1024^2 takes 215 ms
    flops, size = matmul_probe(torch.float32)
    assert [s for s, _ in calls] == [64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024] and size == 1024
    assert flops == pytest.approx(10e9)


def test_probe_stays_within_its_budget_on_a_slow_machine(monkeypatch):
    """A CPU emulating bf16 (AVX2 only: one 2048^2 matmul took 120 s) is probed in under a second, not minutes."""
    calls = fake_matmuls(monkeypatch, 120 / (2 * 2048**3))
    flops, size = matmul_probe(torch.bfloat16)
    spent = sum(2 * s**3 * 120 / (2 * 2048**3) * rounds for s, rounds in calls)
    # 128^2 takes 29 ms; 256^2 (235 ms, four calls) would overrun the budget, so the probe stops at 128.
    assert spent <= machine.PROBE_BUDGET_SECONDS and size == 128 and flops == pytest.approx(2 * 2048**3 / 120)


def test_describe_machine_probes_once_per_process(monkeypatch):
    monkeypatch.setattr(machine, "_peak_cache", {})
    calls = fake_matmuls(monkeypatch, 1 / 10e9)
    first = describe_machine()
    timed = len(calls)
    second = describe_machine()
    assert len(calls) == timed > 0  # the second description times nothing
    assert second.matmul_peak_gflops == first.matmul_peak_gflops == {"fp32": pytest.approx(10), "bf16": pytest.approx(10)}
    assert first.matmul_probe_size == {"fp32": 1024, "bf16": 1024}


def test_real_probe_is_bounded(monkeypatch):
    monkeypatch.setattr(machine, "_peak_cache", {})
    start = time.perf_counter()
    description = describe_machine()
    assert time.perf_counter() - start < 2 * (machine.PROBE_BUDGET_SECONDS + 1)  # two precisions, with slack for a shared CPU
    assert all(gflops > 0 for gflops in description.matmul_peak_gflops.values())


def test_bf16_autocast_only_where_measured_faster():
    def described(fp32: float, bf16: float):
        description = describe_machine(measure_peak=False)
        description.matmul_peak_gflops = {"fp32": fp32, "bf16": bf16}
        return description

    assert bf16_autocast_pays(described(60, 276)) == (True, "measured matmul peaks here: bf16 276 vs fp32 60 GFLOP/s (4.60x; bf16 needs >= 1.25x)")
    use, why = bf16_autocast_pays(described(60, 8))  # an AVX2-only CPU emulates bf16
    assert not use and "bf16 8 vs fp32 60" in why


def test_passive_omp_wait_restarts_once_and_respects_the_environment():
    """libgomp reads OMP_WAIT_POLICY when torch loads it, so setting it takes one restart of the process."""
    code = ("import os; print('start', flush=True); from hf_models.benchmarking import use_passive_omp_wait; "
            "use_passive_omp_wait(); print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    unset = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert unset.returncode == 0, unset.stderr[-2000:]
    assert unset.stdout.split() == ["start", "start", "PASSIVE"]  # ran, restarted with the policy set, went on
    chosen = subprocess.run([sys.executable, "-c", code], env=dict(env, OMP_WAIT_POLICY="ACTIVE"), capture_output=True,
                            text=True, timeout=120)
    assert chosen.stdout.split() == ["start", "ACTIVE"]



@pytest.mark.parametrize("threads", [1, 0])
def test_prepare_benchmark_pins_threads_and_prints_the_machine(threads):
    """One start for every speed benchmark: passive OpenMP waits, torch's and tokenizers' pools pinned
    to ``threads`` (0: every usable CPU), the machine printed before the table."""
    code = ("import os, torch; from hf_models.benchmarking import prepare_benchmark; "
            f"machine = prepare_benchmark({threads}, measure_peak=False); "
            "print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'], os.environ['RAYON_NUM_THREADS'], machine.torch_threads)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "RAYON_NUM_THREADS")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    machine_line, values = result.stdout.strip().splitlines()
    expected = threads or len(os.sched_getaffinity(0))
    assert machine_line.startswith("machine: ") and f"{expected} thread(s), OMP_WAIT_POLICY=PASSIVE" in machine_line
    assert values.split() == [str(expected), "PASSIVE", str(expected), str(expected)]


def test_prepare_benchmark_refuses_a_negative_thread_count():
    with pytest.raises(SystemExit, match="--threads must be 0 .* got -2"):
        machine.prepare_benchmark(-2)


# ----------------------------------------------------------------------------- the step clock


def test_step_clock_leaves_out_warm_up_interrupted_and_untimed_steps(monkeypatch):
    from hf_models.benchmarking import step_clock

    now = iter([0.0, 1.0, 3.0, 6.0, 10.0, 15.0])
    monkeypatch.setattr(step_clock.time, "perf_counter", lambda: next(now))
    clock = step_clock.StepClock(tokens_per_step=100, skip_first_steps=1)
    clock.start()  # 0
    for interrupted in (False, False, True, False, False):  # steps end at 1, 3, 6 (an evaluation), 10, 15
        clock.step_done(interrupted)
    assert clock.step_seconds == [1.0, 2.0, 3.0, 4.0, 5.0] and clock.steps == 5
    assert clock.timed_seconds() == [2.0, 4.0, 5.0]  # step 0 skipped (warm-up), step 2 held an evaluation
    assert clock.tokens_per_second == pytest.approx(300 / 11)
    unstarted = step_clock.StepClock(tokens_per_step=1)
    monkeypatch.setattr(step_clock.time, "perf_counter", lambda: 5.0)
    unstarted.step_done()
    assert np.isnan(unstarted.step_seconds[0]) and np.isnan(unstarted.tokens_per_second)  # no start(): nothing to time


def test_step_clock_times_each_generated_token():
    """generate() calls the clock, as a stopping criterion, once per new token, and it never stops generation."""
    import torch

    from hf_models import ModernDecoderConfig, ModernDecoderForCausalLM
    from hf_models.benchmarking.generation import CACHES, clocked_generate, greedy

    torch.manual_seed(0)
    model = ModernDecoderForCausalLM(ModernDecoderConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                         num_key_value_heads=2, max_position_embeddings=32)).eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
    prompt = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    ids, steps = clocked_generate(model, prompt, 16, CACHES["GrowingKVCache"])
    assert ids.shape == (2, 16) and len(steps) == 11 and all(seconds > 0 for seconds in steps)
    assert torch.equal(ids, greedy(model, prompt, 16, CACHES["no cache"]))


# ----------------------------------------------------------------------------- the benchmark scripts

BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))


def test_the_kv_cache_benchmark_shows_its_own_flags():
    """It imports lesson 6's harness from the package; it once exec'd the recipe, whose parser then
    took the command line (``--help`` showed the recipe's flags and ``--skip_large`` failed)."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kv_cache.py"), "--help"], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--skip_large", "--batch_sizes", "--no_cache_samples", "--large_hidden_size", "--min_seconds"):
        assert flag in result.stdout, flag
    assert "--batch_size " not in result.stdout and "--warmup" not in result.stdout  # the recipe's own flags


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda path: path.name)
def test_every_benchmark_pins_its_threads_and_prints_its_machine(script):
    """Each script starts with ``prepare_benchmark(args.threads...)`` and takes ``--threads``: a ratio
    is only comparable between runs that name their thread count, wait policy and machine."""
    tree = ast.parse(script.read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "prepare_benchmark"]
    assert len(calls) == 1 and ast.unparse(calls[0].args[0]) == "args.threads", script.name
    assert "threads: int = field(" in script.read_text() or 'add_argument("--threads"' in script.read_text()


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda path: path.name)
def test_no_benchmark_reads_or_executes_a_recipe(script):
    """Benchmarks import what they share with a lesson from the package. Running a recipe as a user
    would, in a subprocess (gpt_vs_nanogpt.py trains lesson 4 next to nanoGPT), is not sharing code."""
    tree = ast.parse(script.read_text())
    loaders = {"spec_from_file_location", "exec_module", "run_path", "run_module", "exec", "import_module", "read_text",
               "read_bytes", "open", "SourceFileLoader"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in loaders:
                assert "recipes" not in ast.unparse(node), f"{script.name}:{node.lineno} loads a recipe: {ast.unparse(node)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            assert not any(module.split(".")[0] in ("runpy", "recipes") for module in modules), f"{script.name}:{node.lineno}"
