"""The packed mixed-precision format: what a compressed linear stores, bit for bit.

This module starts with what the compressor hands over (``row_grids``): each row's width,
its fp16 grid and the kept-mask, bit-packed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .solver import SolveResult


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """[rows, cols] bool -> [rows, ceil(cols / 8)] uint8; column j is bit j % 8 of byte j // 8."""
    rows, cols = mask.shape
    padded = F.pad(mask.to(torch.uint8), (0, -cols % 8)).view(rows, -1, 8)
    return (padded << torch.arange(8, dtype=torch.uint8, device=mask.device)).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of ``pack_mask``: [rows, ceil(cols / 8)] uint8 -> [rows, cols] bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[:, :, None] >> shifts) & 1).flatten(1)[:, :cols].bool()


def row_grids(name: str, bits: torch.Tensor, solve: SolveResult) -> dict[str, torch.Tensor]:
    """What packing needs besides the weights, on the CPU, keyed ``{name}.{bits,scale,zero,kept}``:
    widths int8 [rows], fp16 scales and uint8 zero points [rows, groups], kept-mask bit-packed."""
    return {
        f"{name}.bits": bits.to(torch.int8).cpu(),
        f"{name}.scale": solve.scale.to(torch.float16).cpu(),
        f"{name}.zero": solve.zero.to(torch.uint8).cpu(),
        f"{name}.kept": pack_mask(~solve.pruned).cpu(),
    }
