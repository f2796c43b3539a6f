"""SparseGPT's OBS column sweep: prune and quantize one weight matrix in a single pass.

Columns are processed left to right in blocks of ``blocksize``. Each column is pruned (mask
chosen adaptively per block from w^2 / [H^-1]_jj^2) and the survivors rounded to their row's
grid; the error of both is compensated in the columns not yet processed through the upper
Cholesky factor U of H^-1 (H^-1 = U^T U), lazily for columns right of the block.
Rows are independent given the mask: row i's loss depends only on row i's grid.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import PruneConfig, QuantConfig
from .quantizer import grid_params, maxq_for_bits, quantize

log = logging.getLogger(__name__)


@dataclass
class SolveResult:
    weight: torch.Tensor  # [rows, cols] float32, pruned and fake-quantized
    pruned: torch.Tensor  # [rows, cols] bool, True where the weight was pruned
    row_losses: torch.Tensor  # [rows] OBS loss estimate of each row, sum_j (w - q)^2 / (2 U_jj^2)
    scale: torch.Tensor  # [rows, groups] grid scale of each row (per group with group_size)
    zero: torch.Tensor  # [rows, groups] grid zero point, in codes

    @property
    def loss(self) -> float:
        return float(self.row_losses.sum())

    def rows(self, start: int, stop: int) -> SolveResult:
        """Rows ``start:stop``: one linear's part of a stacked sweep."""
        return SolveResult(*(t[start:stop] for t in (self.weight, self.pruned, self.row_losses, self.scale, self.zero)))


def inverse_hessian(H: torch.Tensor, percdamp: float, max_tries: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """H [cols, cols] -> (damped inverse H^-1 [cols, cols] float32, dead [cols] bool).

    Dead inputs (zero diagonal: the feature never fired) get H_jj = 1 so H stays invertible;
    their weights carry no signal and must be zeroed by the caller. Damping starts at
    ``percdamp`` x mean diagonal and grows tenfold while the Cholesky factorisation fails.
    """
    H = H.detach().to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H.diagonal().masked_fill_(dead, 1)
    mean_diag = torch.mean(torch.diag(H))
    damp = percdamp
    for attempt in range(max_tries):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        Hinv = torch.cholesky_inverse(L)
        if bool((info == 0) & torch.isfinite(Hinv).all()):  # one wait for the GPU, not two
            return Hinv, dead
        log.warning("Cholesky of the Hessian failed with damping %.3g; retrying with %.3g", damp, damp * 10)
        damp *= 10
    raise FloatingPointError(f"Hessian is not positive definite even with damping {damp / 10:.3g} x mean diagonal")


def sparsegpt_quantize(
    W: torch.Tensor, Hinv: torch.Tensor, bits: torch.Tensor,
    prune: PruneConfig = PruneConfig(), quant: QuantConfig = QuantConfig(), mask: torch.Tensor | None = None,
    fused: bool = True, segments: Sequence[int] | None = None,
) -> SolveResult:
    """Prune and quantize ``W`` [rows, cols] given the damped inverse Hessian ``Hinv`` [cols, cols].

    ``bits`` [rows]: each row's width (16 = keep floats). Sparsity 0 is plain GPTQ.
    ``mask`` [rows, cols] (True = prune) replaces the adaptive choice; given a mask, rows are
    fully independent, so any subset of rows can be solved on its own. ``fused`` (GPU) runs each
    block's column loop as one Triton launch and replays a sweep shape seen before as one CUDA
    graph (same arithmetic, far fewer launches).
    ``segments`` (row counts summing to rows) marks stacked linears that share H (q/k/v): each
    keeps its own adaptive sparsity, so the stacked sweep equals one sweep per linear.
    Dead input columns must already be zero in ``W``.
    """
    W = W.detach().to(torch.float32).clone()
    rows, cols = W.shape
    U = torch.linalg.cholesky(Hinv, upper=True)
    maxq = maxq_for_bits(bits.to(W.device))[:, None]
    ends = list(itertools.accumulate(segments or [rows]))
    if ends[-1] != rows:
        raise ValueError(f"segments {list(segments)} do not add up to the {rows} rows")
    group = _group_size(quant, cols)
    fused = fused and W.is_cuda and not (group and group % prune.blocksize)  # no grid change inside a block
    plan = SweepPlan(rows, cols, tuple(ends), prune, quant, bool(torch.isfinite(maxq).any()), mask is not None, fused)
    if fused:
        return _graphed_sweep(plan, str(W.device))(W, U, maxq, mask)
    return SolveResult(*_sweep(W, U, maxq, mask, plan))


@dataclass(frozen=True)
class SweepPlan:
    """Everything about a sweep but its tensors: one CUDA graph serves every sweep with the same plan."""

    rows: int
    cols: int
    ends: tuple[int, ...]  # cumulative row counts of the stacked linears
    prune: PruneConfig
    quant: QuantConfig
    any_quantized: bool  # some row has a grid (bits < 16)
    fixed_mask: bool  # the mask is given (an input of the graph), not chosen on the way
    fused: bool  # Triton block sweeps (GPU)

    @property
    def group(self) -> int:
        return _group_size(self.quant, self.cols)


def _group_size(quant: QuantConfig, cols: int) -> int:
    """Columns per grid group, 0 for one grid per row."""
    return quant.group_size if 0 < quant.group_size < cols else 0


def _sweep(W: torch.Tensor, U: torch.Tensor, maxq: torch.Tensor, mask: torch.Tensor | None, plan: SweepPlan):
    """The blocked OBS sweep, in place on ``W`` -> (weight, pruned, row_losses, scale, zero)."""
    prune, quant, group, rows = plan.prune, plan.quant, plan.group, plan.rows
    scales, zeros = [], []
    if not group:
        scale, zero = grid_params(W, maxq[:, 0], quant.sym, quant.mse)
        scales.append(scale)
        zeros.append(zero)
    bounds = list(zip((0,) + plan.ends[:-1], plan.ends))
    pruned = torch.zeros_like(W, dtype=torch.bool)
    losses = torch.zeros_like(W)
    nm = (prune.prunen, prune.prunem) if prune.nm and mask is None else None
    for i1 in range(0, plan.cols, prune.blocksize):
        i2 = min(i1 + prune.blocksize, plan.cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool) if mask is None else mask[:, i1:i2].clone()
        if mask is None and not nm and prune.sparsity > 0:  # adaptive mask: the block's k least salient weights
            saliency = W1**2 / torch.diag(U1) ** 2
            for a, b in bounds:
                k = int((b - a) * (i2 - i1) * prune.sparsity)
                least = torch.topk(saliency[a:b].flatten(), k, largest=False, sorted=False).indices
                mask1[a:b].view(-1).index_fill_(0, least, True)  # not `[least] = True`: a host copy, uncapturable

        def regrid(i: int, W1: torch.Tensor = W1, i1: int = i1, i2: int = i2):
            """At a group's first column: its grid from the group's current weights."""
            if not (plan.any_quantized and group and (i1 + i) % group == 0):
                return None
            ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group]
            params = grid_params(ahead, maxq[:, 0], quant.sym, quant.mse)
            scales.append(params[0])
            zeros.append(params[1])
            return params

        if plan.fused and group:  # fused: groups start at block boundaries
            regrid(0)
        current = (scales[-1], zeros[-1]) if scales else (None, None)
        if plan.fused and nm is None and triton_available():
            from .sweep_kernel import triton_columns
            Q1, Err1, L1 = triton_columns(W1, U1, mask1, *current, maxq, plan.any_quantized, prune.blocksize)
        else:
            Q1, Err1, L1 = sweep_columns(W1, U1, mask1, *current, maxq, nm, plan.any_quantized,
                                         regrid if group and not plan.fused else None)
        W[:, i1:i2] = Q1
        losses[:, i1:i2] = L1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if not scales:  # nothing quantized: report the identity grid
        scales, zeros = [torch.ones(rows, 1, device=W.device)], [torch.zeros(rows, 1, device=W.device)]
    return W, pruned, losses.sum(1), torch.cat(scales, 1), torch.cat(zeros, 1)


def sweep_columns(W1, U1, mask1, scale, zero, maxq, nm, quantized: bool, regrid=None):
    """OBS over one block's columns, left to right, in place on W1 [rows, b] and mask1 [rows, b].

    Each column is pruned where mask1 says (N:M masks chosen on the way), rounded to its
    row's grid, and its error spread over the block's later columns through U1 [b, b].
    ``regrid(i)`` may return a new (scale, zero) at column i. -> (Q1, Err1, losses1), each [rows, b].
    """
    Q1, Err1, L1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
    d = torch.diag(U1)
    for i in range(W1.shape[1]):
        if regrid is not None:
            scale, zero = regrid(i) or (scale, zero)
        w = W1[:, i]
        if nm and i % nm[1] == 0:  # N:M: the n least salient of the next m columns
            saliency = W1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]] ** 2
            mask1.scatter_(1, i + torch.topk(saliency, nm[0], dim=1, largest=False).indices, True)
        q = torch.where(mask1[:, i], torch.zeros_like(w), w)
        if quantized:
            q = quantize(q[:, None], scale, zero, maxq)[:, 0]
        else:  # every row keeps floats: stored as fp16, like quantize's 16-bit rows
            q = q.to(torch.float16).to(torch.float32)
        Q1[:, i] = q
        err = (w - q) / d[i]
        L1[:, i] = err**2 / 2
        W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
        Err1[:, i] = err
    return Q1, Err1, L1


class _GraphedSweep:
    """``_sweep`` for one plan as a CUDA graph: a whole sweep (hundreds of kernels per block,
    a top-k per stacked linear) in one launch, so the solve is no longer bound by the host.

    The first sweep of a plan runs eagerly; the second runs on a side stream as capture requires,
    then is captured; later ones copy their tensors into the graph's inputs and replay it.
    """

    def __init__(self, plan: SweepPlan):
        self.plan, self.calls, self.graph, self.capturable = plan, 0, None, True

    def __call__(self, W, U, maxq, mask) -> SolveResult:
        self.calls += 1
        if self.graph is not None:
            for static, value in zip(self.inputs, (W, U, maxq, mask)):
                if value is not None:
                    static.copy_(value)
            self.graph.replay()
            return SolveResult(*(t.clone() for t in self.outputs))
        if self.calls == 1 or not self.capturable:  # a plan seen once (a one-off row subset) is not worth it
            return SolveResult(*_sweep(W, U, maxq, mask, self.plan))
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.inputs = [None if t is None else t.clone() for t in (W, U, maxq, mask)]
            result = _sweep(W, U, maxq, mask, self.plan)  # warm-up outside the graph, on a side stream
            graph = torch.cuda.CUDAGraph()
            try:
                graph.capture_begin()
                try:
                    self.outputs = _sweep(*self.inputs, self.plan)
                finally:
                    graph.capture_end()
                self.graph = graph
            except RuntimeError as error:  # an op that cannot be captured: stay eager, correct and slower
                log.warning("sweep not captured as a CUDA graph (%s); running it eagerly", str(error).splitlines()[0])
                self.capturable = False
        main.wait_stream(side)
        for t in result:
            t.record_stream(main)
        return SolveResult(*result)


@functools.lru_cache(maxsize=16)
def _graphed_sweep(plan: SweepPlan, device: str) -> _GraphedSweep:
    # a handful of plans per model (stacked q/k/v, o, stacked gate/up, down), kept for the process
    # so that later runs (compare, sweep) replay them too; the device is part of the key because
    # a graph belongs to one GPU
    return _GraphedSweep(plan)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
