"""One linear, end to end: importance -> bit widths -> SparseGPT sweep -> statistics."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .allocation import allocate_bits, average_bits
from .calibration import InputStatistics, OutputStatistics
from .config import CompressionConfig
from .importance import allocation_score, importance_dimensions
from .solver import SolveResult, inverse_hessian, sparsegpt_quantize
from .stats import LayerStats, effective_bits


@dataclass
class LinearResult:
    weight: torch.Tensor  # [rows, cols] float32, compressed
    bits: torch.Tensor  # [rows] int64, code width of each row
    score: torch.Tensor  # [rows] the importance the allocation ranked by
    solve: SolveResult
    stats: LayerStats


def compress_linear(
    name: str, weight: torch.Tensor, inputs: InputStatistics, outputs: OutputStatistics,
    config: CompressionConfig,
) -> LinearResult:
    """Compress ``weight`` [out, in] of a linear whose calibration statistics are given."""
    start = time.perf_counter()
    W = weight.detach().to(torch.float32).clone()
    if not torch.isfinite(W).all():
        raise FloatingPointError(f"{name}: weight has non-finite values")
    Hinv, dead = inverse_hessian(inputs.H, config.prune.percdamp)
    W[:, dead] = 0
    dims = importance_dimensions(W, torch.diag(Hinv), inputs, outputs)
    score = allocation_score(dims, config.allocation)
    bits = allocate_bits(score, config.allocation)
    solved = sparsegpt_quantize(W, Hinv, bits.to(W.device), config.prune, config.quant)
    if W.is_cuda:
        torch.cuda.synchronize()
    rows, cols = W.shape
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
        seconds=time.perf_counter() - start,
    )
    return LinearResult(solved.weight, bits, score, solved, stats)
