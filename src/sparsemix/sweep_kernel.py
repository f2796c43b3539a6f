"""SparseGPT's column loop over one block as one Triton launch: the GPU fast path of the solver.

Given the block's mask, rows are independent, so each program holds a tile of rows of the
block in registers and walks its columns left to right, doing what ``solver.sweep_columns``
does for an unstructured or fixed mask: prune, round to the row's grid, spread the error over
the later columns of the block. Divisions are IEEE (``div_rn``), rounding is half-to-even and
multiply-adds are not fused, as in torch: the result equals the column loop's bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 16


@triton.jit
def _round_half_even(x):
    """torch.round: to the nearest integer, ties to even."""
    f = tl.floor(x)
    diff = x - f
    even = (f - 2.0 * tl.floor(f * 0.5)) == 0.0
    return tl.where(diff > 0.5, f + 1.0, tl.where(diff < 0.5, f, tl.where(even, f, f + 1.0)))


@triton.jit
def _sweep_block(W_ptr, U_ptr, mask_ptr, scale_ptr, zero_ptr, maxq_ptr, Q_ptr, Err_ptr, L_ptr, rows, width,
                 QUANTIZED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK)
    live = r < rows
    W = tl.load(W_ptr + r[:, None] * width + c[None, :], mask=live[:, None] & (c[None, :] < width), other=0.0)
    scale = tl.load(scale_ptr + r, mask=live, other=1.0)
    zero = tl.load(zero_ptr + r, mask=live, other=0.0)
    maxq = tl.load(maxq_ptr + r, mask=live, other=1.0)  # < 0 marks a row that keeps fp16 floats
    for i in range(width):
        w = tl.sum(tl.where(c[None, :] == i, W, 0.0), axis=1)  # column i of the tile, as updated so far
        pruned = tl.load(mask_ptr + r * width + i, mask=live, other=0) != 0
        q = tl.where(pruned, 0.0, w)
        as_float = q.to(tl.float16).to(tl.float32)
        if QUANTIZED:
            code = _round_half_even(tl.math.div_rn(q, scale)) + zero
            code = tl.minimum(tl.maximum(code, 0.0), tl.maximum(maxq, 0.0))
            q = tl.where(maxq >= 0, scale * (code - zero), as_float)
        else:
            q = as_float
        err = tl.math.div_rn(w - q, tl.load(U_ptr + i * width + i))
        tl.store(Q_ptr + r * width + i, q, mask=live)
        tl.store(Err_ptr + r * width + i, err, mask=live)
        tl.store(L_ptr + r * width + i, err * err / 2, mask=live)
        u = tl.load(U_ptr + i * width + c, mask=(c >= i) & (c < width), other=0.0)
        W = W - err[:, None] * u[None, :]


def triton_columns(W1, U1, mask1, scale, zero, maxq, quantized: bool, blocksize: int = 128):
    """``sweep_columns`` for a fixed (or adaptive, already chosen) mask in one launch.

    W1 [rows, b], U1 [b, b], mask1 [rows, b] bool, scale/zero/maxq [rows, 1] -> (Q1, Err1, L1) [rows, b].
    ``blocksize`` (b or more): the sweep's block size, so a narrower last block reuses the compiled kernel.
    """
    rows, width = W1.shape
    Q1, Err1, L1 = (torch.empty(rows, width, device=W1.device, dtype=torch.float32) for _ in range(3))
    ones = torch.ones(rows, device=W1.device)
    scale = ones if scale is None else scale.reshape(rows).contiguous()
    zero = ones * 0 if zero is None else zero.reshape(rows).contiguous()
    maxq = torch.where(torch.isfinite(maxq), maxq, -1.0).reshape(rows).contiguous()
    _sweep_block[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
        W1.contiguous(), U1.contiguous(), mask1.contiguous().view(torch.uint8), scale, zero, maxq, Q1, Err1, L1,
        rows, width, QUANTIZED=quantized, ROWS=ROWS_PER_PROGRAM, BLOCK=triton.next_power_of_2(max(width, blocksize)),
        enable_fp_fusion=False)  # no fused multiply-adds: the same roundings as the column loop, bit for bit
    return Q1, Err1, L1
