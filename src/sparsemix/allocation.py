"""Bit width per output channel from its importance.

Every method except ``threshold3`` picks *how many* rows get each bit option (a count per
tier) and then hands tiers out by importance rank, least important lowest, so a more
important row never gets fewer bits than a less important one.
Widths are in bits per weight of the row's codes (scales and zeros not included).
"""
from __future__ import annotations

import itertools
import math

import torch

from .config import AllocationConfig


def allocate_bits(importance: torch.Tensor, config: AllocationConfig) -> torch.Tensor:
    """importance [rows] -> bits [rows] (int64).

    ``importance`` is the score ``importance.allocation_score`` gives for the method
    (for ``threshold3`` the contribution, activation x weight, with mean 1).
    """
    rows = importance.numel()
    options = config.bit_options
    if config.method == "uniform":
        return torch.full((rows,), config.wbits, dtype=torch.int64)
    if config.method == "threshold3":
        low, mid, high = config.threshold_bits
        score = importance.cpu()
        bits = torch.full((rows,), mid, dtype=torch.int64)
        bits[score > config.threshold_high] = high
        bits[score < config.threshold_low] = low
        return bits
    target = config.target_avg_bits
    if config.method == "quantile":
        counts = max_entropy_counts(rows, options, target)
        if target is not None:
            counts = fix_total(counts, options, round(target * rows), exact=False)
    else:  # budget
        counts = rate_distortion_counts(importance, options, target)
        counts = fix_total(counts, options, round(target * rows), exact=True)
    return bits_from_counts(importance, counts, options)


def bits_from_counts(importance: torch.Tensor, counts: list[int], options: tuple[int, ...]) -> torch.Tensor:
    """Give the ``counts[k]`` least important remaining rows ``options[k]`` bits, k ascending."""
    order = torch.argsort(importance.cpu().to(torch.float64), stable=True)
    per_rank = torch.tensor([b for b, c in zip(options, counts) for _ in range(c)], dtype=torch.int64)
    bits = torch.empty(importance.numel(), dtype=torch.int64)
    bits[order] = per_rank
    return bits


def counts_from_fractions(fractions: list[float], rows: int) -> list[int]:
    """Fractions per tier -> integer counts summing to ``rows`` (cumulative rounding)."""
    cumulative = [round(sum(fractions[: k + 1]) * rows) for k in range(len(fractions))]
    cumulative[-1] = rows
    return [c - p for c, p in zip(cumulative, [0] + cumulative[:-1])]


def max_entropy_counts(rows: int, options: tuple[int, ...], target: float | None) -> list[int]:
    """The most even tier fractions whose mean is ``target``: p_k ~ exp(lam * b_k).

    No target: equal tiers (lam = 0). lam is found by bisection on the monotone mean.
    """
    if target is None:
        return counts_from_fractions([1 / len(options)] * len(options), rows)
    b = torch.tensor(options, dtype=torch.float64)

    def fractions(lam: float) -> torch.Tensor:
        return torch.softmax(lam * b, 0)

    lo, hi = -60.0, 60.0
    for _ in range(200):
        lam = (lo + hi) / 2
        if float(fractions(lam) @ b) < target:
            lo = lam
        else:
            hi = lam
    return counts_from_fractions(fractions((lo + hi) / 2).tolist(), rows)


def rate_distortion_counts(importance: torch.Tensor, options: tuple[int, ...], target: float) -> list[int]:
    """Classic rate allocation for distortion imp_i * 2^(-2 b_i) under mean bits ``target``.

    The continuous optimum is b_i = target + 0.5 log2(imp_i / geometric mean); each row is
    snapped to the nearest option (monotone in importance), then counted per tier.
    """
    imp = importance.cpu().to(torch.float64).clamp(min=1e-12)
    log_imp = torch.log2(imp)
    ideal = target + 0.5 * (log_imp - log_imp.mean())
    b = torch.tensor(options, dtype=torch.float64)
    nearest = torch.argmin((ideal[:, None] - b[None, :]).abs(), dim=1)
    return torch.bincount(nearest, minlength=len(options)).tolist()


def _moves(counts: list[int], options: tuple[int, ...], adjacent: bool):
    """(from tier, to tier, change in total bits) for moving one row, sources non-empty."""
    K = len(options)
    for k in range(K):
        if counts[k] == 0:
            continue
        for j in ((k - 1, k + 1) if adjacent else range(K)):
            if 0 <= j < K and j != k:
                yield k, j, options[j] - options[k]


def fix_total(counts: list[int], options: tuple[int, ...], total_bits: int, exact: bool) -> list[int]:
    """Shift rows between tiers until the layer's total bits reach ``total_bits``.

    Greedy one-row moves between neighbouring tiers (in bulk, from the fuller tier) while they
    bring the total closer. With ``exact`` a remaining gap is closed by a combination of up to
    three moves if one exists (otherwise the total is unreachable and the closest is kept).
    """
    counts = list(counts)
    diff = total_bits - sum(c * b for c, b in zip(counts, options))
    while diff:
        useful = [(counts[k], k, j, step) for k, j, step in _moves(counts, options, adjacent=True)
                  if abs(diff - step) < abs(diff)]
        if not useful:
            break
        _, k, j, step = max(useful)
        times = max(1, min(abs(diff) // abs(step), counts[k] // 2))
        counts[k] -= times
        counts[j] += times
        diff -= times * step
    if diff and exact:
        counts = _close_gap(counts, options, diff)
    return counts


def _close_gap(counts: list[int], options: tuple[int, ...], diff: int) -> list[int]:
    moves = list(_moves(counts, options, adjacent=False))
    for depth in (1, 2, 3):
        for combo in itertools.combinations_with_replacement(moves, depth):
            if sum(step for _, _, step in combo) != diff:
                continue
            trial = list(counts)
            for k, j, _ in combo:
                trial[k] -= 1
                trial[j] += 1
            if min(trial) >= 0:
                return trial
    return counts  # unreachable with these options: the greedy result is the closest


def average_bits(bits: torch.Tensor) -> float:
    """Channel-average bits of a bit vector."""
    return float(bits.to(torch.float64).mean()) if bits.numel() else math.nan


def knapsack(loss: torch.Tensor, cost: torch.Tensor, budget: float, max_fill_steps: int = 100_000) -> torch.Tensor:
    """Multiple-choice knapsack: one option per row minimising sum loss[i, k_i] with sum cost[i, k_i] <= budget.

    loss, cost [rows, K] -> chosen option index [rows] (int64). Lagrangian relaxation: for a
    price lam each row takes argmin_k loss + lam * cost; lam is bisected to the cheapest price
    that fits the budget; the budget left is then spent greedily, one row upgrade at a time,
    on the upgrade that removes the most loss per unit of cost while it still fits.
    If even the cheapest option of every row exceeds the budget, those are returned.
    """
    loss, cost = loss.double().cpu(), cost.double().cpu()
    rows = torch.arange(loss.shape[0])

    def pick(lam: float) -> torch.Tensor:
        # ties in loss + lam * cost go to the cheaper option
        return torch.argmin(loss + lam * cost + 1e-12 * cost, dim=1)

    def spent(choice: torch.Tensor) -> float:
        return float(cost[rows, choice].sum())

    cheapest = torch.argmin(cost, dim=1)
    if spent(cheapest) > budget:
        return cheapest
    lo, hi = 0.0, 1.0
    while spent(pick(hi)) > budget:
        lo, hi = hi, hi * 4
    for _ in range(100):
        mid = (lo + hi) / 2
        if spent(pick(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    choice = pick(hi)
    left = budget - spent(choice)
    for _ in range(max_fill_steps):
        extra = cost - cost[rows, choice][:, None]
        gain = loss[rows, choice][:, None] - loss
        fits = (extra > 0) & (extra <= left + 1e-9) & (gain > 0)
        if not fits.any():
            break
        ratio = torch.where(fits, gain / extra.clamp(min=1e-12), torch.full_like(gain, -1.0))
        best = int(torch.argmax(ratio))
        i, k = divmod(best, loss.shape[1])
        left -= float(extra[i, k])
        choice[i] = k
    return choice
