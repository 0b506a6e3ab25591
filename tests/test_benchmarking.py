"""The benchmark timer on a fake clock: order, warm-up, medians, paired ratios, min_seconds."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from hf_models.benchmarking import PairedRatio, describe_machine, quartiles, time_interleaved


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
