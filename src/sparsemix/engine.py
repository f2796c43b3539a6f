"""One linear, end to end: importance -> bit widths -> SparseGPT sweep -> statistics."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .allocation import allocate_bits, average_bits, knapsack
from .calibration import InputStatistics, OutputStatistics
from .config import CompressionConfig
from .importance import allocation_score, importance_dimensions
from .solver import SolveResult, inverse_hessian, sparsegpt_quantize
from .stats import LayerStats, effective_bits, row_order_bits


@dataclass
class LinearResult:
    weight: torch.Tensor  # [rows, cols] float32, compressed
    bits: torch.Tensor  # [rows] int64, code width of each row
    score: torch.Tensor  # [rows] the importance the allocation ranked by
    solve: SolveResult
    stats: LayerStats


@dataclass
class LossTable:
    """Row losses at every bit option [rows, K], and the sweeps they were measured from."""

    losses: torch.Tensor  # [rows, K] float64: measured at 2, 4 and 16 bits, interpolated between
    mask: torch.Tensor  # [rows, cols] the pruning mask all sweeps share
    sweeps: dict[int, SolveResult]  # width -> the sweep at that width, every row


def row_loss_table(W: torch.Tensor, Hinv: torch.Tensor, config: CompressionConfig) -> LossTable:
    """Row losses at every bit option, from three sweeps sharing one pruning mask.

    The sweeps at 2, 4 and 16 bits are exact (given the mask, rows are independent); between
    them the rounding part R(b) = L(b) - L(16) is interpolated linearly in the squared grid
    step s(b) = 1 / (2^b - 1)^2, and above 4 bits it scales with s(b) (tests/test_optimal.py
    checks them against measured losses: at 3 bits correlation > 0.8 with totals ~10-20% low,
    at 6 and 8 bits correlation > 0.99 within 5%).
    """
    rows = W.shape[0]
    at = {4: sparsegpt_quantize(W, Hinv, torch.full((rows,), 4), config.prune, config.quant, fused=config.fused)}
    mask = at[4].pruned
    for b in (2, 16):
        at[b] = sparsegpt_quantize(W, Hinv, torch.full((rows,), b), config.prune, config.quant, mask=mask,
                                   fused=config.fused)
    pruning = at[16].row_losses.double().cpu()
    rounding = {b: (at[b].row_losses.double().cpu() - pruning).clamp(min=1e-30) for b in (2, 4)}

    def step(b: int) -> float:
        return 1.0 / (2**b - 1) ** 2

    columns = []
    for b in config.allocation.bit_options:
        if b >= 16:
            r = torch.zeros_like(pruning)
        elif b in rounding:
            r = rounding[b]
        elif b < 4:  # linear in s(b) between the 2- and 4-bit measurements
            t = (step(b) - step(2)) / (step(4) - step(2))
            r = rounding[2] * (1 - t) + rounding[4] * t
        else:
            r = rounding[4] * step(b) / step(4)
        columns.append(pruning + r)
    return LossTable(torch.stack(columns, 1), mask, at)


def assemble(table: LossTable, W: torch.Tensor, Hinv: torch.Tensor, bits: torch.Tensor,
             config: CompressionConfig) -> SolveResult:
    """The sweep for per-row ``bits`` under the table's mask: measured rows are reused, the
    rest solved in one sweep over just those rows."""
    weight = torch.empty_like(W)
    row_losses = torch.empty(W.shape[0], device=W.device)
    groups = table.sweeps[4].scale.shape[1]
    scale = torch.empty(W.shape[0], groups, device=W.device)
    zero = torch.empty_like(scale)
    bits = bits.to(W.device)
    todo = torch.ones_like(bits, dtype=torch.bool)
    for b, sweep in table.sweeps.items():
        rows = bits == b
        weight[rows], row_losses[rows] = sweep.weight[rows], sweep.row_losses[rows]
        scale[rows], zero[rows] = sweep.scale[rows], sweep.zero[rows]
        todo &= ~rows
    if todo.any():
        rest = sparsegpt_quantize(W[todo], Hinv, bits[todo], config.prune, config.quant, mask=table.mask[todo],
                                  fused=config.fused)
        weight[todo], row_losses[todo], scale[todo], zero[todo] = rest.weight, rest.row_losses, rest.scale, rest.zero
    return SolveResult(weight, table.mask, row_losses, scale, zero)


def groups_of(cols: int, config: CompressionConfig) -> int:
    """Scale/zero groups per row."""
    return -(-cols // config.quant.group_size) if 0 < config.quant.group_size < cols else 1


def option_costs(rows: int, cols: int, groups: int, config: CompressionConfig) -> torch.Tensor:
    """Cost of each bit option for each row [rows, K] in the unit ``budget_unit`` counts."""
    options = torch.tensor(config.allocation.bit_options, dtype=torch.float64)
    unit = config.allocation.budget_unit
    if unit == "channel":
        per_row = options
    elif unit == "parameter":
        per_row = options * cols
    else:  # effective: codes of the kept weights plus the fp16 scale and zero of quantized rows
        kept = cols * (1 - config.prune.target_sparsity)
        per_row = options * kept + torch.where(options < 16, torch.full_like(options, 32.0 * groups), 0)
    return per_row.expand(rows, -1).clone()


def budget_for(rows: int, cols: int, config: CompressionConfig) -> float:
    """Total cost allowed for the codes and grids of ``rows`` x ``cols`` weights at ``target_avg_bits``
    (in ``effective`` units, net of the sparsity metadata and row permutation)."""
    target = config.allocation.target_avg_bits
    unit = config.allocation.budget_unit
    if unit == "channel":
        return target * rows
    metadata = 0.0
    if unit == "effective":  # sparsity metadata, and the row permutation mixed widths need
        metadata = effective_bits(torch.zeros(1), torch.zeros(1), cols, 0, config.prune) * rows * cols
        metadata += row_order_bits(torch.arange(rows))
    return target * rows * cols - metadata


def optimal_bits(table: torch.Tensor, rows: int, cols: int, groups: int, config: CompressionConfig) -> torch.Tensor:
    """Bits per row minimising the (weighted) loss ``table`` [rows, K] under the linear's budget."""
    choice = knapsack(table, option_costs(rows, cols, groups, config), budget_for(rows, cols, config))
    return torch.tensor(config.allocation.bit_options)[choice]


def solvable_weight(weight: torch.Tensor, H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 copy of ``weight`` with dead input columns zeroed, damped H^-1): what the sweeps take."""
    Hinv, dead = inverse_hessian(H, percdamp)
    return _without_dead(weight, dead), Hinv


def _without_dead(weight: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    W = weight.detach().to(torch.float32).clone()
    W.masked_fill_(dead[None, :], 0)  # inputs that never fired: their weights carry no signal
    return W


def compress_linear(
    name: str, weight: torch.Tensor, inputs: InputStatistics, outputs: OutputStatistics,
    config: CompressionConfig, bits: torch.Tensor | None = None, row_weights: torch.Tensor | None = None,
) -> LinearResult:
    """Compress ``weight`` [out, in] of a linear whose calibration statistics are given.

    ``bits`` [rows] fixes the widths (a model-wide plan); otherwise the bit method chooses them.
    ``row_weights`` [rows] scale each row's loss for ``optimal`` (the output channel's Fisher).
    """
    return compress_linears([name], [weight], inputs, [outputs], config, [bits], [row_weights])[0]


def compress_linears(
    names: list[str], weights: list[torch.Tensor], inputs: InputStatistics, outputs: list[OutputStatistics],
    config: CompressionConfig, bits: list[torch.Tensor | None], row_weights: list[torch.Tensor | None],
) -> list[LinearResult]:
    """Compress linears that read the same input (q/k/v, gate/up), each as ``compress_linear`` would.

    They share H^-1; each chooses its own widths. With ``config.fused`` their rows are stacked
    into one column sweep (rows are independent given each linear's own mask, so the result is
    the same, with a fraction of the sequential column steps).
    """
    start = time.perf_counter()
    for name, weight in zip(names, weights):
        if not torch.isfinite(weight).all():
            raise FloatingPointError(f"{name}: weight has non-finite values")
    Hinv, dead = inverse_hessian(inputs.H, config.prune.percdamp)
    plans = []
    for weight, out_stats, fixed, row_weight in zip(weights, outputs, bits, row_weights):
        plans.append(_choose_bits(_without_dead(weight, dead), Hinv, inputs, out_stats, config, fixed, row_weight))
    solves: list[SolveResult | None] = [plan.solved for plan in plans]
    todo = [i for i, solved in enumerate(solves) if solved is None]
    stacked = config.fused and len(todo) > 1
    for group in ([todo] if stacked else [[i] for i in todo]):
        W = torch.cat([plans[i].W for i in group])
        row_bits = torch.cat([plans[i].bits for i in group]).to(W.device)
        solved = sparsegpt_quantize(W, Hinv, row_bits, config.prune, config.quant, fused=config.fused,
                                    segments=[plans[i].W.shape[0] for i in group])
        offset = 0
        for i in group:
            rows = plans[i].W.shape[0]
            solves[i] = solved.rows(offset, offset + rows)
            offset += rows
    if Hinv.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    total = sum(w.numel() for w in weights)
    return [_result(name, plan, solved, config, seconds * plan.W.numel() / total)
            for name, plan, solved in zip(names, plans, solves)]


@dataclass
class _Plan:
    W: torch.Tensor  # [rows, cols] float32, dead columns zeroed
    bits: torch.Tensor  # [rows] chosen widths
    score: torch.Tensor  # [rows] what the allocation ranked by
    solved: SolveResult | None  # already solved (optimal assembles from its table's sweeps)


def _choose_bits(W, Hinv, inputs, outputs, config: CompressionConfig, bits, row_weights) -> _Plan:
    rows, cols = W.shape
    dims = importance_dimensions(W, torch.diag(Hinv), inputs, outputs)
    score = allocation_score(dims, config.allocation)
    if bits is None and config.allocation.method == "optimal":
        table = row_loss_table(W, Hinv, config)
        weighted = table.losses if row_weights is None else table.losses * row_weights.double().cpu()[:, None]
        score = weighted.mean(1)  # what the knapsack weighs: the row's (Fisher-weighted) loss
        bits = optimal_bits(weighted, rows, cols, groups_of(cols, config), config)
        return _Plan(W, bits, score, assemble(table, W, Hinv, bits, config))
    if bits is None:
        bits = allocate_bits(score, config.allocation)
    return _Plan(W, bits, score, None)


def _result(name: str, plan: _Plan, solved: SolveResult, config: CompressionConfig, seconds: float) -> LinearResult:
    bits, score = plan.bits, plan.score
    rows, cols = plan.W.shape
    stats = LayerStats(
        name=name,
        rows=rows,
        cols=cols,
        bit_counts={int(b): int(c) for b, c in zip(*torch.unique(bits, return_counts=True))},
        channel_average_bits=average_bits(bits),
        effective_bits_per_weight=effective_bits(
            bits, (~solved.pruned).sum(1), cols, solved.scale.shape[1], config.prune),
        importance_min=float(score.min()),
        importance_max=float(score.max()),
        sparsity=float(solved.pruned.float().mean()),
        obs_loss=solved.loss,
        seconds=seconds,
    )
    return LinearResult(solved.weight, bits, score, solved, stats)
