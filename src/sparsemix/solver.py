"""SparseGPT's OBS column sweep: prune and quantize one weight matrix in a single pass.

Columns are processed left to right in blocks of ``blocksize``. Each column is pruned (mask
chosen adaptively per block from w^2 / [H^-1]_jj^2) and the survivors rounded to their row's
grid; the error of both is compensated in the columns not yet processed through the upper
Cholesky factor U of H^-1 (H^-1 = U^T U), lazily for columns right of the block.
Rows are independent given the mask: row i's loss depends only on row i's grid.
"""
from __future__ import annotations

import logging
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


def inverse_hessian(H: torch.Tensor, percdamp: float, max_tries: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """H [cols, cols] -> (damped inverse H^-1 [cols, cols] float32, dead [cols] bool).

    Dead inputs (zero diagonal: the feature never fired) get H_jj = 1 so H stays invertible;
    their weights carry no signal and must be zeroed by the caller. Damping starts at
    ``percdamp`` x mean diagonal and grows tenfold while the Cholesky factorisation fails.
    """
    H = H.detach().to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    mean_diag = torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    damp = percdamp
    for attempt in range(max_tries):
        Hd = H.clone()
        Hd[idx, idx] += damp * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            if torch.isfinite(Hinv).all():
                return Hinv, dead
        log.warning("Cholesky of the Hessian failed with damping %.3g; retrying with %.3g", damp, damp * 10)
        damp *= 10
    raise FloatingPointError(f"Hessian is not positive definite even with damping {damp / 10:.3g} x mean diagonal")


def sparsegpt_quantize(
    W: torch.Tensor, Hinv: torch.Tensor, bits: torch.Tensor,
    prune: PruneConfig = PruneConfig(), quant: QuantConfig = QuantConfig(), mask: torch.Tensor | None = None,
) -> SolveResult:
    """Prune and quantize ``W`` [rows, cols] given the damped inverse Hessian ``Hinv`` [cols, cols].

    ``bits`` [rows]: each row's width (16 = keep floats). Sparsity 0 is plain GPTQ.
    ``mask`` [rows, cols] (True = prune) replaces the adaptive choice; given a mask, rows are
    fully independent, so any subset of rows can be solved on its own.
    Dead input columns must already be zero in ``W``.
    """
    W = W.detach().to(torch.float32).clone()
    rows, cols = W.shape
    U = torch.linalg.cholesky(Hinv, upper=True)
    maxq = maxq_for_bits(bits.to(W.device))[:, None]
    any_quantized = bool(torch.isfinite(maxq).any())
    group = quant.group_size if 0 < quant.group_size < cols else 0
    scales, zeros = [], []
    if not group:
        scale, zero = grid_params(W, maxq[:, 0], quant.sym, quant.mse)
        scales.append(scale)
        zeros.append(zero)

    pruned = torch.zeros_like(W, dtype=torch.bool)
    losses = torch.zeros_like(W)
    n, m = prune.prunen, prune.prunem
    for i1 in range(0, cols, prune.blocksize):
        i2 = min(i1 + prune.blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool) if mask is None else mask[:, i1:i2].clone()
        if mask is None and not n and prune.sparsity > 0:  # adaptive mask: the block's k least salient weights
            k = int(W1.numel() * prune.sparsity)
            saliency = (W1**2 / d**2).flatten()
            mask1.view(-1)[torch.topk(saliency, k, largest=False).indices] = True
        for i in range(i2 - i1):
            w = W1[:, i]
            if mask is None and n and i % m == 0:  # N:M: the n least salient of the next m columns
                saliency = W1[:, i:i + m] ** 2 / d[i:i + m] ** 2
                mask1.scatter_(1, i + torch.topk(saliency, n, dim=1, largest=False).indices, True)
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            if any_quantized:
                if group and (i1 + i) % group == 0:  # grid fixed from the group's current weights
                    ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group]
                    scale, zero = grid_params(ahead, maxq[:, 0], quant.sym, quant.mse)
                    scales.append(scale)
                    zeros.append(zero)
                q = quantize(q[:, None], scale, zero, maxq)[:, 0]
            Q1[:, i] = q
            err = (w - q) / d[i]
            losses[:, i1 + i] = err**2 / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if not scales:  # nothing quantized: report the identity grid
        scales, zeros = [torch.ones(rows, 1, device=W.device)], [torch.zeros(rows, 1, device=W.device)]
    return SolveResult(W, pruned, losses.sum(1), torch.cat(scales, 1), torch.cat(zeros, 1))
