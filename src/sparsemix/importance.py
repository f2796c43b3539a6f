"""Per-output-channel importance: five dimensions, each normalised to a layer mean of 1.0.

For weight W [rows, cols], inputs x [cols] and dense outputs y [rows]:
  activation  E|y_i|
  hessian     sum_j W_ij^2 / [H^-1]_jj        (OBS saliency of the row)
  weight      mean_j |W_ij|
  output      sqrt(sum_j W_ij^2 E[x_j^2])     (output sensitivity)
  stability   var(y_i)
"""
from __future__ import annotations

import torch

from .calibration import InputStatistics, OutputStatistics
from .config import AllocationConfig, ImportanceWeights


def normalize_mean(x: torch.Tensor) -> torch.Tensor:
    """x [..., rows] / its mean over rows; a dimension that is all zero (or not finite) carries no
    ranking: all ones."""
    x = x.to(torch.float32)
    mean = x.mean(-1, keepdim=True)
    return torch.where(torch.isfinite(mean) & (mean > 0), x / mean, torch.ones_like(x))  # no host sync


def importance_dimensions(
    W: torch.Tensor, hinv_diag: torch.Tensor, inputs: InputStatistics, outputs: OutputStatistics,
) -> dict[str, torch.Tensor]:
    """W [rows, cols], hinv_diag [cols] -> {dimension: [rows]}, each with mean 1."""
    W = W.to(torch.float32)
    W2 = W * W
    raw = {
        "activation": outputs.abs_mean.to(W),
        "hessian": W2 @ (1.0 / hinv_diag.to(W)),
        "weight": W.abs().mean(1),
        "output": torch.sqrt(W2 @ inputs.sq_mean.to(W)),
        "stability": outputs.variance.to(W),
    }
    normalized = normalize_mean(torch.stack(list(raw.values())))  # all five at once: a fifth of the launches
    return dict(zip(raw, normalized.unbind(0)))


def combined_importance(dimensions: dict[str, torch.Tensor], weights: ImportanceWeights) -> torch.Tensor:
    """Weighted sum of the normalised dimensions (weights renormalised to sum 1) -> [rows]."""
    return sum(w * dimensions[name] for name, w in weights.normalized().items() if w > 0)


def contribution(dimensions: dict[str, torch.Tensor]) -> torch.Tensor:
    """The original 3-tier scheme's score: activation x weight importance, normalised to mean 1."""
    return normalize_mean(dimensions["activation"] * dimensions["weight"])


def allocation_score(dimensions: dict[str, torch.Tensor], config: AllocationConfig) -> torch.Tensor:
    """The score a bit method ranks rows by: the contribution for threshold3, else the weighted mix."""
    if config.method == "threshold3":
        return contribution(dimensions)
    return combined_importance(dimensions, config.weights)
