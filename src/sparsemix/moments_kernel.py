"""Per-feature sums of |x|, x and x^2 over the tokens of an activation in one read: the GPU fast
path of the calibration statistics (torch's reductions read the tensor once per sum, plus a
temporary for x^2).

Each program sums a strip of features over a fixed slice of tokens; the slices' partial sums
are added by torch afterwards, so the result does not depend on scheduling (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FEATURES_PER_PROGRAM = 64
TOKENS_PER_STEP = 32
TOKEN_SLICES = 128  # enough programs to fill the GPU for a few hundred features


@triton.jit
def _column_sums(x_ptr, out_ptr, tokens, features, tokens_per_slice,
                 FEATURES: tl.constexpr, TOKENS: tl.constexpr):
    f = tl.program_id(0) * FEATURES + tl.arange(0, FEATURES)
    first = tl.program_id(1) * tokens_per_slice
    last = tl.minimum(first + tokens_per_slice, tokens)
    absolute = tl.zeros([TOKENS, FEATURES], dtype=tl.float32)
    plain = tl.zeros([TOKENS, FEATURES], dtype=tl.float32)
    squares = tl.zeros([TOKENS, FEATURES], dtype=tl.float32)
    for start in range(first, last, TOKENS):
        t = start + tl.arange(0, TOKENS)
        live = (t[:, None] < last) & (f[None, :] < features)
        x = tl.load(x_ptr + t[:, None].to(tl.int64) * features + f[None, :], mask=live, other=0.0).to(tl.float32)
        absolute += tl.abs(x)
        plain += x
        squares += x * x
    out = out_ptr + tl.program_id(1) * 3 * features + f
    tl.store(out, tl.sum(absolute, 0), mask=f < features)
    tl.store(out + features, tl.sum(plain, 0), mask=f < features)
    tl.store(out + 2 * features, tl.sum(squares, 0), mask=f < features)


def triton_column_sums(x: torch.Tensor) -> torch.Tensor:
    """x [tokens, features] (any float dtype) -> [3, features] float32: sums of |x|, x and x^2."""
    x = x.contiguous()
    tokens, features = x.shape
    per_slice = max(TOKENS_PER_STEP, -(-tokens // TOKEN_SLICES))
    slices = -(-tokens // per_slice)
    partial = torch.empty(slices, 3, features, device=x.device, dtype=torch.float32)
    _column_sums[(triton.cdiv(features, FEATURES_PER_PROGRAM), slices)](
        x, partial, tokens, features, per_slice, FEATURES=FEATURES_PER_PROGRAM, TOKENS=TOKENS_PER_STEP)
    return partial.sum(0)
