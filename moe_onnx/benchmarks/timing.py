"""Interleaved timing and its statistics.

On this shared machine the first run after switching from one session to another is up to 2x
slower (caches, allocator state), and load from other jobs drifts over minutes. So the
measurements are taken in rounds: per round, every unit (one variant at one phase and length)
gets its untimed runs, then its timed runs, and the next unit follows. Drift then hits every
variant alike, and each switch's cost falls on untimed runs. Where the last-level cache holds
much of a model (a 480 MiB L3 seen on 2026-12-04), a decode step after a switch takes several
steps to reach its steady state, which generation (many steps of one model) runs in: decode
units warm up for a few steps (``BenchOptions.decode_warmup``). The bench holds one variant's
session at a time (:func:`interleave_loaded`): loaded, run and freed in every round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def timed(fn: Callable, *args, **kwargs) -> tuple[float, object]:
    """``(seconds, fn(*args, **kwargs))``: the wall time of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


@dataclass(frozen=True)
class Stats:
    """Order statistics of one unit's samples, seconds."""

    p50: float
    p90: float
    p10: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        s = np.asarray(seconds, dtype=float)
        return cls(float(np.median(s)), float(np.percentile(s, 90)), float(np.percentile(s, 10)),
                   float(s.min()), float(s.max()), len(s))


@dataclass(frozen=True)
class Unit:
    """``run()`` does one measured call and returns its seconds; ``reps`` timed calls per round,
    after ``warmup`` untimed ones."""

    key: tuple
    run: Callable[[], float]
    reps: int
    warmup: int = 1


def interleave(units: list[Unit], rounds: int, progress: Callable[[int, int, str], None],
               deadline: float | None = None, min_rounds: int = 2) -> dict:
    """``{unit.key: [[seconds of round 0], [round 1], ...]}`` over up to ``rounds`` rounds of
    (``warmup`` untimed + ``reps`` timed) calls per unit.

    With a ``deadline`` (a ``time.perf_counter()`` value), no round starts after ``min_rounds``
    that the last round's duration says would end past it: every round is whole.
    """
    return interleave_loaded([Loaded(units)], rounds, progress, deadline, min_rounds)


@dataclass(frozen=True)
class Loaded:
    """Units that need something in memory (a session): ``open(round)`` loads it before them in
    every round and returns False when it cannot (its units then drop out), ``close()`` frees it
    after them. The default: nothing to load."""

    units: list[Unit]
    open: Callable[[int], bool] = lambda _round: True
    close: Callable[[], None] = lambda: None


def interleave_loaded(groups: list[Loaded], rounds: int, progress: Callable[[int, int, str], None],
                      deadline: float | None = None, min_rounds: int = 2) -> dict:
    """:func:`interleave` with each group's units run between its ``open`` and ``close``: only
    one group is in memory at a time, and every round still visits every group, so drift from
    other jobs hits them alike. A group whose ``open`` fails keeps the samples it has."""
    samples: dict[tuple, list[list[float]]] = {u.key: [] for g in groups for u in g.units}
    live = list(groups)
    total, done = rounds * len(samples), 0
    for r in range(rounds):
        started = time.perf_counter()
        for group in list(live):
            if not group.open(r):
                live.remove(group)
                total -= (rounds - r) * len(group.units)
                continue
            try:
                for unit in group.units:
                    for _ in range(unit.warmup):  # untimed: this session's caches and allocator settle
                        unit.run()
                    samples[unit.key].append([unit.run() for _ in range(unit.reps)])
                    done += 1
                    progress(done, total, " ".join(str(k) for k in unit.key))
            finally:
                group.close()
        last = time.perf_counter() - started
        if (deadline is not None and r + 1 >= min_rounds and r + 1 < rounds
                and time.perf_counter() + last > deadline):
            progress(done, done, f"stopped after {r + 1} of {rounds} rounds: the time budget")
            break
    return samples


def flat(per_round: list[list[float]]) -> list[float]:
    return [t for r in per_round for t in r]


def paired_ratio(num: list[list[float]], den: list[list[float]]) -> tuple[float, float, float, float]:
    """``num / den`` as (median over rounds of the per-round ratio of medians, lowest and highest
    per-round ratio, ratio of the minimums).

    Both units of a round ran seconds apart, so a round's ratio sees one load level; the median
    over rounds drops a round that load from other jobs distorted. Load only adds time, so the
    ratio of minimums is the estimate least disturbed by it.
    """
    ratios = [float(np.median(n) / np.median(d)) for n, d in zip(num, den, strict=True) if n and d]
    return float(np.median(ratios)), min(ratios), max(ratios), min(flat(num)) / min(flat(den))
