"""The one benchmark timer: interleaved rounds, untimed warm-up, medians and paired ratios.

Why interleave. The zoo is measured on a shared 2-core machine, where other people's jobs come and
go: a number taken a minute after another is not comparable with it. So the contenders are never
timed one after the other in blocks (all of A, then all of B). Instead every *round* runs each
contender once, and the order rotates from round to round (A B C, B C A, C A B, ...; for two
contenders A B, B A, A B, ...), so a burst of load, a warming cache or a frequency change falls on
every contender alike, and each contender runs in every position equally often.

Why medians. One timed call can stall for a scheduler tick or a page fault; the median ignores a
few such outliers where the mean does not.

Why paired ratios. Contenders in one round ran seconds apart, under the same load, so
``baseline[i] / contender[i]`` of round ``i`` is an estimate of the speed-up in which most of the
machine's drift cancels. Over all rounds, the quartiles (q1, median, q3) of these per-round ratios
are the ratio's noise band: a speed-up whose band straddles 1.0 is a tie on this machine, however
the medians fall. The same method serves a GPU (call ``torch.cuda.synchronize()`` inside the
timed callable) and a cluster; what changes is only how big the noise band is.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of ``values``, interpolating linearly between order statistics.

    This is numpy's default percentile (``statistics``' "inclusive" method): with few rounds, the
    "exclusive" method extrapolates beyond the smallest and largest value, which would widen a
    noise band past anything measured.
    """
    if not values:
        raise ValueError("quartiles of no values")
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


@dataclass(frozen=True)
class PairedRatio:
    """How many times faster one contender was than a baseline, round by round.

    ``per_round[i] = baseline_seconds[i] / contender_seconds[i]`` (> 1: the contender is faster);
    ``q1``, ``median``, ``q3`` are the quartiles of ``per_round``, the ratio and its noise band.
    """

    per_round: list[float]
    q1: float
    median: float
    q3: float

    @classmethod
    def of(cls, contender_seconds: list[float], baseline_seconds: list[float]) -> "PairedRatio":
        if len(contender_seconds) != len(baseline_seconds):
            raise ValueError("paired ratios need one time of each side per round")
        per_round = [baseline / contender for contender, baseline in zip(contender_seconds, baseline_seconds)]
        return cls(per_round, *quartiles(per_round))

    def band(self) -> str:
        """``"1.03 (0.98-1.07)"``: the median ratio and its q1-q3 band, for tables."""
        return f"{self.median:.2f} ({self.q1:.2f}-{self.q3:.2f})"


@dataclass
class InterleavedTimings:
    """What :func:`time_interleaved` measured.

    ``seconds[name][i]`` is the time of ``name``'s call in timed round ``i`` (warm-up excluded), and
    ``orders[i]`` the order the contenders ran in that round.
    """

    seconds: dict[str, list[float]]
    orders: list[tuple[str, ...]] = field(default_factory=list)
    warmup: int = 0

    @property
    def rounds(self) -> int:
        return len(self.orders)

    @property
    def median_seconds(self) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in self.seconds.items()}

    def speedup(self, contender: str, baseline: str) -> PairedRatio:
        """Per-round ``baseline / contender`` time ratios and their quartiles (see the module docstring)."""
        return PairedRatio.of(self.seconds[contender], self.seconds[baseline])

    def to_dict(self) -> dict:
        """JSON-ready: every sample, the medians and the orders, so a results file can be re-analysed."""
        return {
            "rounds": self.rounds,
            "warmup": self.warmup,
            "median_seconds": self.median_seconds,
            "seconds": self.seconds,
            "orders": [list(order) for order in self.orders],
        }


def rotated(names: list[str], round_index: int) -> tuple[str, ...]:
    """The order of round ``round_index``: ``names`` rotated left by ``round_index`` places."""
    shift = round_index % len(names)
    return tuple(names[shift:] + names[:shift])


def time_interleaved(
    contenders: Mapping[str, Callable[[], object]],
    rounds: int = 10,
    warmup: int = 1,
    min_seconds: float = 0.0,
    max_rounds: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> InterleavedTimings:
    """Time every contender once per round, in rotating order, after untimed warm-up calls.

    Args:
        contenders: name -> a callable doing one unit of work (a training step, a ``generate()``
            call). Build inputs outside it; what it returns is ignored. On a GPU, synchronise
            inside it, or the clock stops before the kernels finish.
        rounds: timed rounds, at least. Each round calls every contender once.
        warmup: untimed calls of each contender first, for one-off costs (allocator growth, lazy
            initialisation, oneDNN's kernel choice, optimizer state).
        min_seconds: keep adding rounds, past ``rounds``, until every contender has been timed for
            this long in total: the cheapest contenders are the noisiest, and more samples of
            them cost little.
        max_rounds: the most rounds ``min_seconds`` may ask for (default ``3 * rounds``).
        clock: seconds, monotonic; tests pass a fake one.

    Returns:
        :class:`InterleavedTimings`, with every sample, medians, and paired ratios via ``speedup``.
    """
    names = list(contenders)
    if not names:
        raise ValueError("nothing to time")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    max_rounds = 3 * rounds if max_rounds is None else max(max_rounds, rounds)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    timings = InterleavedTimings(seconds={name: [] for name in names}, warmup=warmup)

    def wants_more() -> bool:
        if timings.rounds < rounds:
            return True
        least_timed = min(sum(values) for values in timings.seconds.values())
        return least_timed < min_seconds and timings.rounds < max_rounds

    while wants_more():
        order = rotated(names, timings.rounds)
        for name in order:
            start = clock()
            contenders[name]()
            timings.seconds[name].append(clock() - start)
        timings.orders.append(order)
    return timings
