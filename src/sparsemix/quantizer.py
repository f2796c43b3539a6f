"""Uniform grids with one bit width per output channel (row).

A row with b bits has integer codes 0..maxq, maxq = 2^b - 1, and dequantizes as
``scale * (code - zero)`` with fp16-representable scales and integer zero points, so a packed
file dequantises to exactly these weights. Rows given 16 bits keep float16 weights (``maxq = inf``).
"""
from __future__ import annotations

import torch

from .config import UNQUANTIZED_BITS


def maxq_for_bits(bits: torch.Tensor) -> torch.Tensor:
    """bits [rows] (int) -> maxq [rows] (float32), inf for unquantized rows."""
    bits = bits.to(torch.float32)
    return torch.where(bits >= UNQUANTIZED_BITS, torch.full_like(bits, float("inf")), 2.0**bits - 1)


def fp16_value(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float16 value (kept above fp16's smallest subnormal), as float32."""
    return x.clamp(min=2.0**-24).to(torch.float16).to(torch.float32)


def _minmax_params(xmin: torch.Tensor, xmax: torch.Tensor, maxq: torch.Tensor, sym: bool):
    """Scale and zero point for each row from its clipping range; maxq is finite here."""
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax  # always centred: a row of positive weights still gets the full range
    empty = (xmin == 0) & (xmax == 0)  # an all-zero row still needs a valid grid
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = fp16_value((xmax - xmin) / maxq)  # the packed format stores fp16 scales: dequantise bit for bit
    zero = (maxq + 1) / 2 if sym else torch.round(-xmin / scale)
    return scale, zero


def grid_params(
    w: torch.Tensor, maxq: torch.Tensor, sym: bool = False, mse: bool = False,
    grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row grid of ``w`` [rows, cols] for ``maxq`` [rows] -> (scale [rows, 1], zero [rows, 1]).

    The range always includes 0 so pruned weights stay exactly 0 after quantization.
    With ``mse`` each row's range is shrunk by the factor (of ``grid`` steps down to
    1 - max_shrink) that minimises sum |w - q|^norm, as in GPTQ's quantizer.
    Unquantized rows (maxq = inf) get scale 1, zero 0, which ``quantize`` ignores.
    """
    w = w.float()
    finite = torch.isfinite(maxq)
    safe_maxq = torch.where(finite, maxq, torch.ones_like(maxq))
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    scale, zero = _minmax_params(xmin, xmax, safe_maxq, sym)
    if mse:
        best = torch.full_like(xmin, float("inf"))
        for i in range(int(max_shrink * grid)):
            p = 1 - i / grid
            s, z = _minmax_params(p * xmin, p * xmax, safe_maxq, sym)
            err = (quantize(w, s[:, None], z[:, None], safe_maxq[:, None]) - w).abs_().pow_(norm).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    scale = torch.where(finite, scale, torch.ones_like(scale))
    zero = torch.where(finite, zero, torch.zeros_like(zero))
    return scale[:, None], zero[:, None]


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    """Round ``w`` [rows, k] to each row's grid and dequantize; scale, zero, maxq are [rows, 1]."""
    finite = torch.isfinite(maxq)
    codes = torch.clamp(torch.round(w / scale) + zero, torch.zeros_like(maxq), torch.where(finite, maxq, 0))
    return torch.where(finite, scale * (codes - zero), w.to(torch.float16).to(w.dtype))  # 16 bits = fp16
