"""The statistics of a benchmark run: which round stands for a system, per-round ratios, agreement."""
from __future__ import annotations

import statistics


def median_round(rounds: list):
    """The round that stands for a system: its median by time (the lower middle one for an even
    count), a real round rather than an average of several."""
    return sorted(rounds, key=lambda res: res.seconds)[(len(rounds) - 1) // 2]


def round_ratios(numerators: list, denominators: list) -> list[float]:
    """Per-round ratios of times (``numerators[i].seconds / denominators[i].seconds``): each between
    two runs a minute or two apart, so a drift of the machine over the run cancels out."""
    return [a.seconds / b.seconds for a, b in zip(numerators, denominators)]


def median_ratio(ratios: list[float]) -> float:
    return statistics.median(ratios)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of requests whose token ids agree exactly."""
    return sum(x == y for x, y in zip(a, b)) / len(a)
