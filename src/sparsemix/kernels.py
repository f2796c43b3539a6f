"""Triton kernels for y = x W^T with W in the packed format (``packing.py``), for decode batches.

``packed_matmul`` sends layers whose columns are whole 32-column tiles to the fixed-position kernel
(tensor cores, see "the fixed-position kernel" below) and the rest to the general kernel described
here.

Layouts the general kernel reads (built once per linear by ``kernel_meta``; bytes within a few words
per width segment of the file's):

* ``codes``  int32 [words]: the file's bitstream, cut into one stream per width segment (rows are
  sorted by width, so each width is one contiguous row range) and re-aligned so each segment starts
  at bit 0 of a word (``word_base`` in the block table). Inside a segment every row starts at a
  multiple of its width, so 2/4/8/16-bit codes never straddle a word; 3- and 6-bit codes may.
* ``mask``   int32 [rows, ceil(cols / 32)]: the kept bitmask read as 32-bit words (column j is bit
  j % 32 of word j // 32; the file's bytes, padded per row to 4 bytes when needed). Absent when dense.
* ``chunk_off`` int32 [rows, n_chunks]: bit offset, inside the row's segment stream, of the first
  kept code at column c * CHUNK (derived from the mask; nothing extra is stored in the file).
* ``table``  int32 [row blocks, 4]: (first row, end row, width, word_base) per block of BLOCK_R rows;
  a block never spans two widths, so each program runs one compile-time width.
* ``perm`` int32 [rows], ``scale``/``zero`` fp16 [quantized rows, groups] as in the file.

Grid: (row blocks, column chunks) -- split-K so batch 1 fills the GPU. A program walks its chunk
32 columns (one mask word per row) at a time: kept bit and rank of each column come from the mask
word by shift and popcount, the code from one (two for 3/6 bits) int32 load at bit
``chunk_off + rank * width``; it dequantises ``(code - zero) * scale`` in fp32 (16-bit rows: the
fp16 pattern) and multiplies by x. Batch 1: broadcast multiply, fp32 accumulation, one column
reduction at the end; batch >= DOT_BATCH: ``tl.dot`` on fp16 tiles padded to 16 tokens. Partial rows are atomically added into
a zeroed fp32 y at their original index perm[r]. All index arithmetic is int32 (asserted to fit).

Imported only when a CUDA input (or ``TRITON_INTERPRET=1`` test) needs it: CPU installs need no Triton.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .packing import pack_bits, per_column, signed32, unpack_bits

CHUNK = 1024  # target columns per program: 4096 x 4096 -> 128 row blocks x 4 chunks = 512 programs
BLOCK_R = 32  # rows per program
MAX_BATCH = 16
DOT_BATCH = 2  # from batch 2 on, tl.dot padded to 16 tokens (SASS: ~27 vs ~67 instructions per weight at batch 4)
WIDTHS = (2, 3, 4, 6, 8, 16)
INT32_MAX = 2**31 - 1


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _popc(v, USE_ASM: tl.constexpr):
    """Set bits of each uint32 in v, as int32."""
    if USE_ASM:  # one instruction on NVIDIA GPUs
        return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)
    else:  # the interpreter has no inline asm: SWAR bit count
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        return ((v * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _block(x_ptr, y_ptr, codes_ptr, mask_ptr, chunk_off_ptr, perm_ptr, scale_ptr, zero_ptr,
           row0, row_end, word_base, pid_k, B, R, K, G, GROUP_SIZE, MASK_WORDS, N_CHUNKS,
           W: tl.constexpr, HAS_MASK: tl.constexpr, GROUPED: tl.constexpr, GROUP_TILE: tl.constexpr,
           CHUNK: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
           USE_DOT: tl.constexpr, USE_ASM: tl.constexpr):
    """Rows row0..row_end-1 (all of width W) times columns of chunk pid_k, added into y."""
    rows = row0 + tl.arange(0, BLOCK_R)
    row_ok = rows < row_end
    off = tl.load(chunk_off_ptr + rows * N_CHUNKS + pid_k, mask=row_ok, other=0)  # bit of the chunk's 1st code
    codes_ptr += word_base
    lane = tl.arange(0, 32)
    bit = tl.full([32], 1, tl.uint32) << lane  # column lane's bit in a mask word
    below = bit - 1  # bits of the columns before it
    batch = tl.arange(0, BLOCK_B)
    if W < 16:
        scale_r = tl.load(scale_ptr + rows * G, mask=row_ok, other=1.0).to(tl.float32)
        shift_r = -tl.load(zero_ptr + rows * G, mask=row_ok, other=0.0).to(tl.float32) * scale_r
    if BLOCK_B == 1:
        acc = tl.zeros([BLOCK_R, 32], dtype=tl.float32)  # reduced over columns once, after the loop
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.float32)
    for t in range(CHUNK // 32):  # a ragged last chunk runs its tail tiles fully masked
        col0 = pid_k * CHUNK + t * 32
        cols = col0 + lane
        col_ok = (cols < K) | EVEN_K  # EVEN_K: chunks tile the columns, no column checks
        tile_ok = (rows * 0 + col0 < K) | EVEN_K  # a tensor: Triton 3.9's interpreter rejects tensor & scalar masks
        if HAS_MASK:  # one mask word per row and 32 columns; rank = kept bits below the column
            m = tl.load(mask_ptr + rows * MASK_WORDS + col0 // 32, mask=row_ok & tile_ok, other=0)
            m = m.to(tl.uint32, bitcast=True)
            kept = (m[:, None] & bit[None, :]) != 0
            rank = _popc(m[:, None] & below[None, :], USE_ASM)
            count = _popc(m, USE_ASM)
        else:
            kept = row_ok[:, None] & col_ok[None, :]
            rank = lane[None, :]
            count = 32
        pos = off[:, None] + rank * W
        word = pos >> 5
        shift = (pos & 31).to(tl.uint32)
        # unmasked: every position lies inside the stream or its padding; pruned columns are zeroed below
        code = tl.load(codes_ptr + word).to(tl.uint32, bitcast=True) >> shift
        if W == 3 or W == 6:  # only these straddle: the rest comes from the next word
            hi = tl.load(codes_ptr + word + 1, mask=kept & (shift > 32 - W), other=0).to(tl.uint32, bitcast=True)
            code = code | ((hi << 1) << (31 - shift))  # two shifts: a shift by 32 is undefined
        code = code & ((1 << W) - 1)
        off += count * W
        if W == 16:
            w = code.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            if GROUPED:
                if GROUP_TILE:  # group size a multiple of 32: one group per row and tile
                    g = rows * G + col0 // GROUP_SIZE
                    s = tl.load(scale_ptr + g, mask=row_ok & tile_ok, other=1.0).to(tl.float32)
                    z = -tl.load(zero_ptr + g, mask=row_ok & tile_ok, other=0.0).to(tl.float32) * s
                    s, z = s[:, None], z[:, None]
                else:
                    g = rows[:, None] * G + (cols // GROUP_SIZE)[None, :]
                    s = tl.load(scale_ptr + g, mask=kept, other=1.0).to(tl.float32)
                    z = -tl.load(zero_ptr + g, mask=kept, other=0.0).to(tl.float32) * s
            else:
                s, z = scale_r[:, None], shift_r[:, None]
            w = code.to(tl.float32) * s + z  # (code - zero) * scale as one FMA
        w = tl.where(kept, w, 0.0)
        if BLOCK_B == 1:
            xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += w * xv[None, :]
        else:
            xt = tl.load(x_ptr + batch[None, :] * K + cols[:, None],
                         mask=(batch < B)[None, :] & col_ok[:, None], other=0.0)  # [32, BLOCK_B]
            if USE_DOT:
                acc += tl.dot(w.to(tl.float16), xt)
            else:
                acc += tl.sum(w[:, :, None] * xt.to(tl.float32)[None, :, :], axis=1)
    perm = tl.load(perm_ptr + rows, mask=row_ok, other=0)
    if BLOCK_B == 1:
        tl.atomic_add(y_ptr + perm, tl.sum(acc, axis=1), mask=row_ok, sem="relaxed")
    else:
        tl.atomic_add(y_ptr + batch[None, :] * R + perm[:, None], acc, mask=row_ok[:, None] & (batch < B)[None, :], sem="relaxed")


@triton.jit
def _packed_matmul_kernel(
    x_ptr, y_ptr, codes_ptr, mask_ptr, table_ptr, chunk_off_ptr, perm_ptr, scale_ptr, zero_ptr,
    B, R, K, G, GROUP_SIZE, MASK_WORDS, N_CHUNKS,
    PRESENT: tl.constexpr, HAS_MASK: tl.constexpr, GROUPED: tl.constexpr, GROUP_TILE: tl.constexpr,
    CHUNK: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
    USE_DOT: tl.constexpr, USE_ASM: tl.constexpr,
):
    """One program: the row block table[pid 0] (one width) x column chunk pid 1. PRESENT: bit w set
    when width w occurs, so only those widths are compiled; the branch is uniform per program."""
    pid_r, pid_k = tl.program_id(0), tl.program_id(1)
    row0 = tl.load(table_ptr + pid_r * 4)
    row_end = tl.load(table_ptr + pid_r * 4 + 1)
    width = tl.load(table_ptr + pid_r * 4 + 2)
    word_base = tl.load(table_ptr + pid_r * 4 + 3)
    for w in tl.static_range(2, 17):  # compile time: a branch only for the widths PRESENT names
        if (PRESENT >> w) & 1:  # noqa: SIM102 (constexpr test apart from the runtime one)
            if width == w:
                _block(x_ptr, y_ptr, codes_ptr, mask_ptr, chunk_off_ptr, perm_ptr, scale_ptr, zero_ptr, row0,
                       row_end, word_base, pid_k, B, R, K, G, GROUP_SIZE, MASK_WORDS, N_CHUNKS, w, HAS_MASK, GROUPED,
                       GROUP_TILE, CHUNK, EVEN_K, BLOCK_R, BLOCK_B, USE_DOT, USE_ASM)


# --- the fixed-position kernel: 2:4, dense and unstructured layers on the tensor cores, one launch ---
# When every 4 consecutive columns keep exactly 2 weights (SparseGPT's 2:4 pruning) a row's k-th code
# belongs to column group k // 2; without a mask, to column k. Unstructured masks are made dense at
# load (a pruned weight coded at its row's zero point, which dequantises to exactly 0). Code positions
# are then fixed and the kernel needs no ranks. ``fixed_meta`` rearranges the codes so that each lane
# of a warp finds its part of the A operands of its mma instructions in consecutive words:
#
# * codes come in pairs, two codes at the same bits of the two halves of a 32-bit word, so one shift
#   and one LOP3 give both as fp16 1024 + code (the exponent trick) and one HSUB2 gives code - zero,
#   exact in fp16: an fp16 pair, one register of an A fragment. Dense: a pair is 2 consecutive columns
#   of a row; 2:4: the 2 kept columns of a group of 4 (whose 2- and 4-bit codes are read in place, without
#   the shift: ``_mma_weights``).
# * dense, mma.sync m16n8k16: a warp takes 16 rows and a run of 4 tiles of 32 columns per step. Lane
#   (p, q) (p = lane // 4, q = lane % 4) decodes tile q of rows p and p + 8 into the A fragments of 8
#   mmas (mma m: the tile's columns 4m.. at k positions 2q, 2q + 1, 8 + 2q, 9 + 2q) and loads x of token
#   p at the same columns (16 words, 4 vector loads) as its B fragments: each mma's k runs over 4 tiles'
#   columns, in an order A and B agree on.
# * 2:4, mma.sp.sync m16n8k32 (the sparse tensor cores take the kept values and their 2-bit column
#   indices): a step is a run of SPARSE_RUN tiles, one mma.sp each. Lane (p, q) decodes the pairs of
#   groups q and 4 + q of each tile for rows p and p + 8 and loads words 4i + q (i < 4) of the tile's x.
#   The metadata (kept columns) of rows p and p + 8 comes from 2 lanes per quad, alternating between
#   mmas (sparsity selector 0 and 1), so each lane loads SPARSE_RUN / 2 metadata words per step.
# * one mma serves 8 tokens (B's columns): batches up to 8 decode each weight once. Products of
#   (code - zero) and x are exact in fp32 and summed in fp32, so layers with one grid per row apply the
#   scale once per row after the loop; grouped layers scale each weight in fp16 (HMUL2), as
#   ``dequantise`` rounds it.
# * a program's warps take BLOCK_R // 16 blocks of 16 rows side by side with SPLIT along the columns,
#   and sum their column walks at the end (no atomics, y written in x's dtype; at one token through 64
#   bytes of shared memory a warp and one barrier, ``_shared_sum``); each step first loads the weights
#   of the step AHEAD on.

PAD_ROWS = 16  # each width segment is padded to a multiple of this many rows (aligned vector loads)


@triton.jit
def _halves(v):
    """int32 holding an fp16 pair -> (low, high) as fp32."""
    v = v.to(tl.uint32, bitcast=True)
    lo = (v & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (v >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _pair(lo, hi):
    """Two fp32 values rounded to fp16 and packed into an int32 (low half first)."""
    lo = lo.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    hi = hi.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    return (lo | (hi << 16)).to(tl.int32, bitcast=True)


@triton.jit
def _weights(v, zz, s, USE_ASM: tl.constexpr):
    """A group's 2 fp16 weights (an fp16 pair in int32) from ``v``, its 2 codes as fp16 1024 + code,
    ``zz`` (fp16 1024 + zero) and ``s`` (the scale), twice each: (v - zz) * s, rounded as
    ``dequantise`` rounds (the difference is exact)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("{ .reg .b32 w; sub.rn.f16x2 w, $1, $2; mul.rn.f16x2 $0, w, $3; }",
                                         "=r,r,r,r", [v, zz, s], dtype=tl.int32, is_pure=True, pack=1)
    else:  # the same arithmetic for Triton's CPU interpreter
        v_lo, v_hi = _halves(v)
        z_lo, z_hi = _halves(zz)
        s_lo, s_hi = _halves(s)
        return _pair((v_lo - z_lo) * s_lo, (v_hi - z_hi) * s_hi)


@triton.jit
def _codes(prev, cur, exponent, g: tl.constexpr, W: tl.constexpr):
    """Group g's two codes (W < 16) as fp16 pair 1024 + code, from the words holding the start
    (``prev``) and the end (``cur``) of its W bits (the same word unless the codes straddle two);
    ``exponent`` is 1024's sign and exponent bits in both halves (0x64006400)."""
    start: tl.constexpr = g * W
    shift: tl.constexpr = start % 16
    if shift + W <= 16:
        v = (cur >> shift) & (((1 << W) - 1) * 0x10001)
    else:  # bits shift..15 of each half of prev, then bits 0.. of each half of cur
        low: tl.constexpr = (1 << (16 - shift)) - 1
        v = ((prev >> shift) & (low * 0x10001)) | ((cur << (16 - shift)) & ((((1 << W) - 1) ^ low) * 0x10001))
    return v | exponent


MMA_TOKENS = 8  # tokens per mma (its n)
SPARSE_RUN = 8  # 2:4: 32-column tiles (one mma.sp each) per run, the columns a lane takes per step (4 or 8)


def run_tiles(dense: bool) -> int:
    """32-column tiles per run, the columns a lane of the tensor-core kernel takes per step: 4 dense, one
    per lane of a quad; SPARSE_RUN 2:4, one per mma.sp."""
    return 4 if dense else SPARSE_RUN


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, USE_ASM: tl.constexpr):
    """D = A B + C per warp, mma.sync m16n8k16: a0..a3 a lane's fp16 pairs of A (rows p, p + 8 at k
    2q.., then rows p, p + 8 at k 8 + 2q..), b0, b1 its pairs of B (k 2q.. and 8 + 2q.., column p), c0..c3
    fp32 C at (row p, columns 2q, 2q + 1) and (row p + 8, the same columns). Tensors of one element per
    thread, element i in thread i (lane i % 32)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
            "{$10, $11, $12, $13};", "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
            [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:  # the interpreter: the same sums from the whole block's fragments, [warps, p, q] per lane
        n: tl.constexpr = a0.shape[0] // 32
        top_lo, top_hi = _halves(a0.reshape(n, 8, 1, 4))  # A[p, 2q + i] as [warp, p, 1, q]
        bottom_lo, bottom_hi = _halves(a1.reshape(n, 8, 1, 4))
        top_lo8, top_hi8 = _halves(a2.reshape(n, 8, 1, 4))
        bottom_lo8, bottom_hi8 = _halves(a3.reshape(n, 8, 1, 4))
        x_lo, x_hi = _halves(b0.reshape(n, 1, 8, 4))  # B[2q + i, column] as [warp, 1, column, q]
        x_lo8, x_hi8 = _halves(b1.reshape(n, 1, 8, 4))
        top = tl.sum(top_lo * x_lo + top_hi * x_hi + top_lo8 * x_lo8 + top_hi8 * x_hi8, axis=3)  # [warp, p, column]
        bottom = tl.sum(bottom_lo * x_lo + bottom_hi * x_hi + bottom_lo8 * x_lo8 + bottom_hi8 * x_hi8, axis=3)
        d0, d1 = tl.split(top.reshape(n, 8, 4, 2))  # columns 2q and 2q + 1 at lane (p, q)
        d2, d3 = tl.split(bottom.reshape(n, 8, 4, 2))
        return (c0 + d0.reshape(n * 32), c1 + d1.reshape(n * 32), c2 + d2.reshape(n * 32), c3 + d3.reshape(n * 32))


@triton.jit
def _mma_sp(a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e, SELECTOR: tl.constexpr, USE_ASM: tl.constexpr):
    """D = A B + C per warp, mma.sp.sync m16n8k32 (A 2:4 sparse): a0..a3 a lane's fp16 pairs of A's kept
    values (rows p, p + 8 of k group q, then of k group 4 + q: the lower kept column's value in the low
    half), b0..b3 its pairs of B (k 2q + 8i.., column p), c0..c3 as for ``_mma``, e the metadata: in lanes
    q = 2 SELECTOR (k groups 0-3) and 2 SELECTOR + 1 (groups 4-7) the kept columns of row p (bits 0-15)
    and row p + 8 (bits 16-31), 4 bits per group: lower | upper << 2 (as probed on an H100:
    benchmarks/results-h100-matvec27-sparse.txt)."""
    if USE_ASM:
        if SELECTOR == 0:
            return tl.inline_asm_elementwise(
                "mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, "
                "{$8, $9, $10, $11}, {$12, $13, $14, $15}, $16, 0x0;", "=f,=f,=f,=f,r,r,r,r,r,r,r,r,f,f,f,f,r",
                [a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(
                "mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, "
                "{$8, $9, $10, $11}, {$12, $13, $14, $15}, $16, 0x1;", "=f,=f,=f,=f,r,r,r,r,r,r,r,r,f,f,f,f,r",
                [a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:  # the interpreter: A made whole from its kept values and metadata, as [warp, row, k group, column]
        n: tl.constexpr = a0.shape[0] // 32
        q = tl.arange(0, 4)[None, None, :]
        e = e.to(tl.uint32, bitcast=True).reshape(n, 8, 4)
        low = tl.sum(tl.where(q == 2 * SELECTOR, e, 0), axis=2)[:, :, None]  # [warp, p, 1]: groups 0-3
        high = tl.sum(tl.where(q == 2 * SELECTOR + 1, e, 0), axis=2)[:, :, None]  # groups 4-7
        j = tl.arange(0, 8)[None, None, :]
        column = tl.arange(0, 4)[None, None, None, :]
        d = ()
        for half in tl.static_range(2):  # rows p, p + 8
            first_a, second_a = _halves((a0 if half == 0 else a1).reshape(n, 8, 4))
            first_b, second_b = _halves((a2 if half == 0 else a3).reshape(n, 8, 4))
            first = tl.permute(tl.join(first_a, first_b), (0, 1, 3, 2)).reshape(n, 8, 8)  # [warp, p, group j]
            second = tl.permute(tl.join(second_a, second_b), (0, 1, 3, 2)).reshape(n, 8, 8)
            nibble = ((tl.where(j < 4, low, high) >> (4 * (j % 4) + 16 * half)) & 15)[:, :, :, None]
            whole = (tl.where(column == (nibble & 3), first[:, :, :, None], 0.0)
                     + tl.where(column == (nibble >> 2), second[:, :, :, None], 0.0))  # [warp, p, j, column]
            whole = whole.reshape(n, 8, 4, 4, 2)  # k = 8i + 2q + h as [i, q, h]
            lo_k, hi_k = tl.split(whole)  # h = 0, 1: [warp, p, i, q]
            i = tl.arange(0, 4)[None, None, :, None]
            total = tl.zeros([n, 8, 8], dtype=tl.float32)
            for step in tl.static_range(4):
                b = b0 if step == 0 else b1 if step == 1 else b2 if step == 2 else b3
                b_lo, b_hi = _halves(b.reshape(n, 8, 4))  # [warp, column, q]
                a_lo = tl.sum(tl.where(i == step, lo_k, 0.0), axis=2)  # [warp, p, q]
                a_hi = tl.sum(tl.where(i == step, hi_k, 0.0), axis=2)
                products = a_lo[:, :, None, :] * b_lo[:, None, :, :] + a_hi[:, :, None, :] * b_hi[:, None, :, :]
                total += tl.sum(products, axis=3)
            d = d + tl.split(total.reshape(n, 8, 4, 2))  # columns 2q and 2q + 1 at lane (p, q)
        return (c0 + d[0].reshape(n * 32), c1 + d[1].reshape(n * 32), c2 + d[2].reshape(n * 32),
                c3 + d[3].reshape(n * 32))


@triton.jit
def _less(v, zz, USE_ASM: tl.constexpr):
    """v - zz for fp16 pairs in int32 (exact on codes and zero points)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("sub.rn.f16x2 $0, $1, $2;", "=r,r,r", [v, zz], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        v_lo, v_hi = _halves(v)
        z_lo, z_hi = _halves(zz)
        return _pair(v_lo - z_lo, v_hi - z_hi)


# PTX of the vector loads of ``_words``: VECTOR words $0.. from address $VECTOR where $VECTOR+1 != 0 (zeros else)
_LOAD2 = tl.constexpr("{ .reg .pred p; setp.ne.b32 p, $3, 0; @p ld.global.v2.b32 {$0, $1}, [$2]; }")
_LOAD2_ZEROS = tl.constexpr("{ .reg .pred p; setp.ne.b32 p, $3, 0; mov.b32 $0, 0; mov.b32 $1, 0; "
                            "@p ld.global.v2.b32 {$0, $1}, [$2]; }")
_LOAD4 = tl.constexpr("{ .reg .pred p; setp.ne.b32 p, $5, 0; @p ld.global.v4.b32 {$0, $1, $2, $3}, [$4]; }")
_LOAD4_ZEROS = tl.constexpr("{ .reg .pred p; setp.ne.b32 p, $5, 0; mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; "
                            "mov.b32 $3, 0; @p ld.global.v4.b32 {$0, $1, $2, $3}, [$4]; }")


@triton.jit
def _words(ptr, offset, ok, COUNT: tl.constexpr, VECTOR: tl.constexpr, ZERO: tl.constexpr, PURE: tl.constexpr,
           USE_ASM: tl.constexpr):
    """COUNT int32 words from word ``offset`` on (a multiple of VECTOR: 1, 2 or 4), by loads of VECTOR words;
    where not ``ok`` nothing is read and the words are zeros if ZERO, else undefined (no instructions to
    zero them). PURE False keeps the loads after a PDL wait."""
    out = ()
    for i in tl.static_range(0, COUNT, VECTOR):
        if USE_ASM:
            address = (ptr + offset + i).to(tl.int64, bitcast=True)
            if VECTOR == 4:
                out = out + tl.inline_asm_elementwise(_LOAD4_ZEROS if ZERO else _LOAD4, "=r,=r,=r,=r,l,r",
                                                      [address, ok.to(tl.int32)], dtype=(tl.int32,) * 4,
                                                      is_pure=PURE, pack=1)
            elif VECTOR == 1:
                out = out + (tl.load(ptr + offset + i, mask=ok, other=0),)
            else:
                out = out + tl.inline_asm_elementwise(_LOAD2_ZEROS if ZERO else _LOAD2, "=r,=r,l,r",
                                                      [address, ok.to(tl.int32)], dtype=(tl.int32,) * 2,
                                                      is_pure=PURE, pack=1)
        else:
            for j in tl.static_range(VECTOR):
                out = out + (tl.load(ptr + offset + i + j, mask=ok, other=0),)
    return out


@triton.jit
def _mma_load(codes_ptr, index_ptr, scale_ptr, zz_ptr, word_base, top, lane, run, meta_run, inside, tile, n_tiles, P,
              GROUP_SIZE, W: tl.constexpr, SPARSE: tl.constexpr, GROUPED: tl.constexpr, RUN: tl.constexpr,
              USE_ASM: tl.constexpr):
    """What a lane reads of its ``run`` (of RUN tiles of 32 columns) besides x, nothing where not ``inside``:
    (dense and GROUPED: grids (zz, s) of rows top and top + 8 for tile ``tile``, zeros past ``n_tiles``,
    else (); the lane's code words, 2W (dense: W of row top, then W of row top + 8) or W RUN / 4 (2:4);
    2:4: its RUN / 2 metadata words (run ``meta_run`` of the whole layer), else ())."""
    grid = ()
    if GROUPED and not SPARSE:  # group size a multiple of the tile: one group per tile
        g = (tile * 32) // GROUP_SIZE
        real = inside & (tile < n_tiles)
        grid = (tl.load(zz_ptr + g * P + top, mask=real, other=0), tl.load(scale_ptr + g * P + top, mask=real, other=0),
                tl.load(zz_ptr + g * P + top + 8, mask=real, other=0),
                tl.load(scale_ptr + g * P + top + 8, mask=real, other=0))
    LANE_WORDS: tl.constexpr = W * RUN // 4 if SPARSE else 2 * W  # dense: RUN = 4
    # codes decode to finite fp16 whatever their bits, so skipped words need no zeros (x is 0 there); fp16 rows do
    words = _words(codes_ptr, word_base + (run * 32 + lane) * LANE_WORDS, inside, LANE_WORDS,
                   4 if LANE_WORDS % 4 == 0 else (2 if LANE_WORDS % 2 == 0 else 1), W == 16, True, USE_ASM)
    meta = ()
    if SPARSE:
        meta = _words(index_ptr, (meta_run * 32 + lane) * (RUN // 2), inside, RUN // 2, 2 if RUN == 4 else 4, False,
                      True, USE_ASM)
    return grid, words, meta


@triton.jit
def _scaled_less(v, SCALE: tl.constexpr, offset, USE_ASM: tl.constexpr):
    """v * SCALE + offset for fp16 pairs in int32 (SCALE the fp16 bits of a power of 2; exact on codes)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                         [v, tl.full(v.shape, SCALE * 0x10001, tl.int32), offset], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        v_lo, v_hi = _halves(v)
        s_lo, _ = _halves(tl.full(v.shape, SCALE, tl.int32))
        o_lo, o_hi = _halves(offset)
        return _pair(v_lo * s_lo + o_lo, v_hi * s_lo + o_hi)


LOW_OFFSET = tl.constexpr((0x6200, 0x6380, 0x63E0))  # 1024 - 1024 / 2^k as fp16 bits, k = 2, 4, 6
POWER = tl.constexpr((0x3400, 0x2C00, 0x2400))  # 2^-k as fp16 bits, k = 2, 4, 6


@triton.jit
def _offsets(zz, W: tl.constexpr, USE_ASM: tl.constexpr):
    """-(1024 / 2^k + zero) for k = 2, 4, 6 as fp16 pairs (what ``_mma_weights`` adds to codes read in place at
    bit k of a byte), from zz = 1024 + zero; only k = 4 for 4-bit codes (the unused slots hold zz)."""
    out = ()
    for i in tl.static_range(3):
        if W == 2 or (W == 4 and i == 1):
            out = out + (_less(tl.full(zz.shape, LOW_OFFSET[i] * 0x10001, tl.int32), zz, USE_ASM),)
        else:
            out = out + (zz,)
    return out


@triton.jit
def _mma_weights(words, zz, s, exponent, grp: tl.constexpr, W: tl.constexpr, GROUPED: tl.constexpr,
                 IN_PLACE: tl.constexpr, USE_ASM: tl.constexpr):
    """Group ``grp``'s 2 weights of a row as an fp16 pair: code - zero (times the scale when GROUPED).
    IN_PLACE (2:4 rows of 2 or 4 bits with one grid, one token): a code at bits k..k+W of a byte is masked where it
    lies, 1024 + code 2^k (exact: below 2048), and one FMA times 2^-k plus ``s[k / 2 - 1]`` = -(1024 / 2^k +
    zero) gives code - zero, so the 4 codes of a 16-bit half cost one shift (of the upper byte), not three.
    Dense rows and batches keep the shifts: there the change was slower or no faster on an H100
    (benchmarks/results-h100-matvec29-ab.txt)."""
    if W == 16:
        return words[grp].to(tl.int32, bitcast=True)
    if (W == 2 or W == 4) and IN_PLACE and not GROUPED:
        SHIFT: tl.constexpr = (grp * W) % 16
        K: tl.constexpr = SHIFT % 8
        word = words[(grp * W) // 16].to(tl.uint32, bitcast=True)
        if SHIFT >= 8:
            word = word >> 8
        v = ((word & ((((1 << W) - 1) << K) * 0x10001)) | exponent).to(tl.int32, bitcast=True)
        if K == 0:
            return _less(v, zz, USE_ASM)
        return _scaled_less(v, POWER[K // 2 - 1], s[K // 2 - 1], USE_ASM)
    start, end = words[(grp * W) // 16], words[(grp * W + W - 1) // 16]
    v = _codes(start.to(tl.uint32, bitcast=True), end.to(tl.uint32, bitcast=True), exponent, grp, W)
    v = v.to(tl.int32, bitcast=True)
    if GROUPED:
        return _weights(v, zz, s, USE_ASM)
    return _less(v, zz, USE_ASM)


def _pinned_asm(n: int) -> tuple[str, str]:
    """PTX and constraints of ``_pinned`` for n words: a performance-monitor trigger of no event, then the words
    passed through."""
    moves = " ".join(f"mov.b32 ${i}, ${n + i};" for i in range(n))
    return "{ pmevent.mask 0; " + moves + " }", ",".join(["=r"] * n + ["r"] * n)


PINNED_PTX = tl.constexpr(tuple(_pinned_asm(n)[0] for n in range(33)))
PINNED_CONSTRAINTS = tl.constexpr(tuple(_pinned_asm(n)[1] for n in range(33)))


@triton.jit
def _pinned(words, USE_ASM: tl.constexpr):
    """``words`` (a tuple of at most 32 int32 tensors) unchanged, after an instruction that ptxas moves nothing
    across (``pmevent``; ``nanosleep`` or a bare ``griddepcontrol.wait`` still let it sink arithmetic below), so
    that what computed them runs above it."""
    if USE_ASM:
        n: tl.constexpr = len(words)
        return tl.inline_asm_elementwise(PINNED_PTX[n], PINNED_CONSTRAINTS[n], words, dtype=(tl.int32,) * n,
                                         is_pure=False, pack=1)
    return words


@triton.jit
def _scratch(v):
    """The shared-memory address (32 bits) of the kernel's scratch, Triton's ``global_smem``, per element of v."""
    return tl.inline_asm_elementwise("mov.b32 $0, global_smem;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _barrier(v):
    """All threads of the program meet (``bar.sync``); shared-memory writes before it are seen after it."""
    return tl.inline_asm_elementwise("bar.sync 0; mov.b32 $0, 0;", "=r,r", [v], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _put_pair(address, a, b, ok):
    """Where ``ok``: fp32 a into shared memory at ``address`` and b 32 bytes on."""
    return tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $4, 0; @p st.shared.f32 [$1], $2; "
                                     "@p st.shared.f32 [$1+32], $3; mov.b32 $0, 0; }", "=r,r,f,f,r",
                                     [address, a, b, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _get(address):
    """The fp32 in shared memory at ``address``."""
    return tl.inline_asm_elementwise("ld.shared.f32 $0, [$1];", "=f,r", [address], dtype=tl.float32, is_pure=False,
                                     pack=1)


@triton.jit
def _reserve_scratch(side, N: tl.constexpr):
    """True for each of the N threads, computed so that Triton gives the kernel N * 4 bytes of shared scratch (a
    cross-warp max of the warps' ``side``, all >= 0), which ``_shared_sum`` reuses: Triton allocates shared memory
    only for its own operations. Ends with a barrier, so that no warp writes there while another still reads."""
    top = tl.max(tl.reshape(side, (N // 32, 32)), axis=0)
    kept = tl.reshape(tl.broadcast_to(top[None, :], (N // 32, 32)), (N,)) >= 0
    _barrier(side)
    return kept


@triton.jit
def _shared_sum(accs, e, lane, block, side, quad, SPLIT: tl.constexpr, BLOCKS: tl.constexpr):
    """One token: the sum of the SPLIT column walks of each block's 16 rows, in thread (side 0, lane r < 16) of the
    block for its row r. The token's output column of each mma (``accs`` c0: row p = lane // 4, c2: row p + 8, in the
    lanes of quad 0) goes to shared memory, 64 bytes per warp, and after one barrier 16 threads of each block add
    their row's SPLIT values: Triton's cross-warp sum took 5 barriers and butterfly shuffles for the two halves."""
    sums = _scratch(e) + block * (64 * SPLIT)
    _put_pair(sums + side * 64 + (lane // 4) * 4, accs[0], accs[2], quad == 0)
    _barrier(e)
    total = _get(sums + (lane % 16) * 4)
    for s in tl.static_range(1, SPLIT):
        total += _get(sums + s * 64 + (lane % 16) * 4)
    return total


PREFETCH_THREADS = tl.constexpr(8)  # threads of a prefetching program that each ask the L2 for a slice (not all 256)


@triton.jit
def _prefetch_l2(ptr, nbytes, part, PARTS: tl.constexpr, N: tl.constexpr, USE_ASM: tl.constexpr):
    """Ask the L2 for slice ``part`` of PARTS of the ``nbytes`` bytes from ``ptr`` (16-byte aligned), without
    waiting for it: one bulk prefetch (sm_90) from each of PREFETCH_THREADS of the program's N threads, in 16-byte
    multiples, nothing past the end."""
    if USE_ASM:
        THREADS: tl.constexpr = PREFETCH_THREADS
        e = tl.arange(0, N)
        chunk = tl.cdiv(tl.cdiv(nbytes, PARTS * THREADS), 16) * 16
        start = (part * THREADS + e // (N // THREADS)).to(tl.int64) * chunk
        size = tl.minimum(tl.maximum(nbytes - start, 0), chunk) & -16
        size = tl.where(e % (N // THREADS) == 0, size, 0).to(tl.int32)
        tl.inline_asm_elementwise("{ .reg .pred p; setp.gt.s32 p, $2, 0; "
                                  "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }", "=r,l,r",
                                  [ptr.to(tl.pointer_type(tl.int8)) + start, size], dtype=tl.int32, is_pure=False,
                                  pack=1)


@triton.jit
def _mma_x(x_ptr, tile, n_tiles, lane, B, X_STRIDE, NB: tl.constexpr, EVEN: tl.constexpr, SPARSE: tl.constexpr,
           RUN: tl.constexpr, USE_ASM: tl.constexpr):
    """Per block of 8 tokens, the x words of token p = lane // 4 for the B fragments of the run of RUN tiles
    from tile ``tile``: dense, the 16 words (32 columns) of tile ``tile`` + q (4 vector loads); 2:4, words
    4i + q (i < 4) of each tile of the run. Zeros in tiles at or past ``n_tiles`` (never when EVEN); past
    the batch, the last token's (its mma output columns are not stored)."""
    q = lane % 4
    xs = ()
    for nb in tl.static_range(NB):
        token = tl.minimum(nb * 8 + lane // 4, B - 1)
        if SPARSE:
            words = ()
            for m in tl.static_range(RUN):
                ok = (tile + m < n_tiles) | EVEN
                for i in tl.static_range(4):
                    words = words + (tl.load(x_ptr + token * X_STRIDE + (tile + m) * 16 + 4 * i + q, mask=ok, other=0),)
        else:
            ok = (tile + q < n_tiles) | EVEN
            words = _words(x_ptr, token * X_STRIDE + (tile + q) * 16, ok, 16, 4, not EVEN, False, USE_ASM)
        xs = xs + (words,)
    return xs


@triton.jit
def _fragment(grid, words, first, m: tl.constexpr, pointers, lanes, grids, P, GROUP_SIZE, n_tiles, W: tl.constexpr,
              SPARSE: tl.constexpr, GROUPED: tl.constexpr, IN_PLACE: tl.constexpr, RUN: tl.constexpr,
              USE_ASM: tl.constexpr):
    """A lane's A fragment (a0, a1, a2, a3) for mma ``m`` of the step from tile ``first`` (2:4: mma.sp m on tile
    first + RUN side + m), from the step's ``grid`` and code ``words`` (``_mma_load``); nothing here reads x."""
    x_ptr, codes_ptr, index_ptr, scale_ptr, zz_ptr = pointers
    top, lane, side, quad, inside, runs_before, meta_offset = lanes
    zz_top, s_top, zz_bottom, s_bottom, exponent = grids
    if SPARSE:
        if GROUPED:  # group size a multiple of 32: one group per tile (a spare tile's: zeros)
            g = ((first + side * RUN + m) * 32) // GROUP_SIZE
            real = inside & (first + side * RUN + m < n_tiles)
            zz_top = tl.load(zz_ptr + g * P + top, mask=real, other=0)
            s_top = tl.load(scale_ptr + g * P + top, mask=real, other=0)
            zz_bottom = tl.load(zz_ptr + g * P + top + 8, mask=real, other=0)
            s_bottom = tl.load(scale_ptr + g * P + top + 8, mask=real, other=0)
        fragment = (_mma_weights(words, zz_top, s_top, exponent, 4 * m, W, GROUPED, IN_PLACE, USE_ASM),
                    _mma_weights(words, zz_bottom, s_bottom, exponent, 4 * m + 1, W, GROUPED, IN_PLACE, USE_ASM),
                    _mma_weights(words, zz_top, s_top, exponent, 4 * m + 2, W, GROUPED, IN_PLACE, USE_ASM),
                    _mma_weights(words, zz_bottom, s_bottom, exponent, 4 * m + 3, W, GROUPED, IN_PLACE, USE_ASM))
    else:
        if GROUPED:
            zz_top, s_top, zz_bottom, s_bottom = grid
        upper, lower = (), ()  # rows top, top + 8
        for h in tl.static_range(W):
            upper = upper + (words[h],)
            lower = lower + (words[W + h],)
        fragment = (_mma_weights(upper, zz_top, s_top, exponent, 2 * m, W, GROUPED, False, USE_ASM),
                    _mma_weights(lower, zz_bottom, s_bottom, exponent, 2 * m, W, GROUPED, False, USE_ASM),
                    _mma_weights(upper, zz_top, s_top, exponent, 2 * m + 1, W, GROUPED, False, USE_ASM),
                    _mma_weights(lower, zz_bottom, s_bottom, exponent, 2 * m + 1, W, GROUPED, False, USE_ASM))
    return fragment


@triton.jit
def _mma_step(pending, accs, first, pointers, lanes, sizes, grids, W: tl.constexpr, SPARSE: tl.constexpr,
              GROUPED: tl.constexpr, IN_PLACE: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr, NB: tl.constexpr,
              AHEAD: tl.constexpr, RUN: tl.constexpr, USE_ASM: tl.constexpr, DECODED: tl.constexpr):
    """One step of a warp's column walk (``_mma_block``), from tile ``first`` of the block: queue the weights of the
    step AHEAD on, take the oldest of ``pending`` (or load them now when AHEAD is 0), load x and add the run's
    products to ``accs``; returns the new (pending, accs). DECODED: ``pending`` holds every remaining step's
    A fragments in place of its words (``_fragment``'s a0..a3 of each mma in turn), and nothing is queued. The
    other arguments are ``_mma_block``'s, as tuples."""
    x_ptr, codes_ptr, index_ptr, scale_ptr, zz_ptr = pointers
    top, lane, side, quad, inside, runs_before, meta_offset = lanes
    word_base, n_tiles, P, GROUP_SIZE, B, X_STRIDE = sizes
    STRIDE: tl.constexpr = RUN * SPLIT
    tile = first + side * RUN + quad  # dense: the lane's tile
    run = runs_before + first // RUN + side
    if AHEAD > 0:  # take the oldest loads, queue the step AHEAD on
        grid, words, meta = pending[0]
        queued = ()
        for d in tl.static_range(1, len(pending)):
            queued = queued + (pending[d],)
        pending = queued
        if not DECODED:
            later = first + AHEAD * STRIDE + side * RUN
            pending = pending + (_mma_load(codes_ptr, index_ptr, scale_ptr, zz_ptr, word_base, top, lane,
                                           run + AHEAD * SPLIT, run + AHEAD * SPLIT + meta_offset,
                                           inside & (later < n_tiles), later + quad, n_tiles, P, GROUP_SIZE, W, SPARSE,
                                           GROUPED, RUN, USE_ASM),)
    else:
        grid, words, meta = _mma_load(codes_ptr, index_ptr, scale_ptr, zz_ptr, word_base, top, lane, run,
                                      run + meta_offset, inside & (first + side * RUN < n_tiles), tile, n_tiles, P,
                                      GROUP_SIZE, W, SPARSE, GROUPED, RUN, USE_ASM)
    xs = _mma_x(x_ptr, first + side * RUN, n_tiles, lane, B, X_STRIDE, NB, EVEN, SPARSE, RUN, USE_ASM)
    for m in tl.static_range(RUN if SPARSE else 8):
        if DECODED:
            a0, a1, a2, a3 = words[4 * m], words[4 * m + 1], words[4 * m + 2], words[4 * m + 3]
        else:
            a0, a1, a2, a3 = _fragment(grid, words, first, m, pointers, lanes, grids, P, GROUP_SIZE, n_tiles, W, SPARSE,
                                       GROUPED, IN_PLACE, RUN, USE_ASM)
        updated = ()
        for nb in tl.static_range(NB):
            c0, c1, c2, c3 = accs[nb]
            x = xs[nb]
            if SPARSE:
                updated = updated + (_mma_sp(a0, a1, a2, a3, x[4 * m], x[4 * m + 1], x[4 * m + 2], x[4 * m + 3],
                                             c0, c1, c2, c3, meta[m // 2], m % 2, USE_ASM),)
            else:
                updated = updated + (_mma(a0, a1, a2, a3, x[2 * m], x[2 * m + 1], c0, c1, c2, c3, USE_ASM),)
        accs = updated
    return pending, accs


@triton.jit
def _mma_block(x_ptr, y_ptr, codes_ptr, index_ptr, perm_ptr, scale_ptr, zz_ptr, row0, word_base, seg_row0, seg_rows,
               P, K, GROUP_SIZE, B, X_STRIDE, Y_STRIDE, W: tl.constexpr, SPARSE: tl.constexpr, GROUPED: tl.constexpr,
               BLOCK_R: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr, NB: tl.constexpr,
               USE_ASM: tl.constexpr, PDL: tl.constexpr, AHEAD: tl.constexpr, RUN: tl.constexpr,
               ONE_TOKEN: tl.constexpr, STEPS: tl.constexpr, SHARED_SUM: tl.constexpr):
    """Padded rows row0.. (all of width W) times all columns for B <= 8 NB tokens, into y[token, perm[row]]
    on the tensor cores: BLOCK_R // 16 warps of 16 rows side by side with SPLIT along the columns, each
    warp walking every SPLIT-th run of RUN tiles (see above); the column walks are summed at the end.
    Dense (RUN 4): 8 mma per run (lane q: tile q); 2:4 (SPARSE): RUN mma.sp (mma m: tile m). ONE_TOKEN (B == 1):
    only the walks of the output column that holds the token are summed. STEPS > 0: the walk is that many steps
    of straight-line code (``FixedConfig.unrolled``), 0: a loop."""
    BLOCKS: tl.constexpr = BLOCK_R // 16
    N: tl.constexpr = 32 * BLOCKS * SPLIT  # one element per thread
    IN_PLACE: tl.constexpr = SPARSE and ONE_TOKEN  # 2:4 codes read in place (``_mma_weights``)
    e = tl.arange(0, N)
    lane = e % 32
    block = (e // 32) % BLOCKS
    side = e // (32 * BLOCKS)
    quad = lane % 4
    top = row0 + block * 16 + lane // 4  # its rows: top and top + 8 (padded row indices)
    local = top - seg_row0
    inside = local < seg_rows  # segments are whole blocks of 16 rows
    n_tiles = K // 32
    block_runs = tl.cdiv(n_tiles, RUN)  # runs per block of 16 rows
    runs_before = (local // 16) * block_runs  # the runs of the segment's blocks above this one
    meta_offset = (seg_row0 // 16) * block_runs  # 2:4 metadata runs of the segments before
    if not GROUPED:  # one grid per row
        zz_top = tl.load(zz_ptr + top, mask=inside, other=0)
        zz_bottom = tl.load(zz_ptr + top + 8, mask=inside, other=0)
        s_top, s_bottom = zz_top, zz_bottom  # unused: the scales come after the loop
        if IN_PLACE:
            s_top, s_bottom = _offsets(zz_top, W, USE_ASM), _offsets(zz_bottom, W, USE_ASM)
    else:  # each step loads its groups' grids
        zz_top = tl.zeros([N], dtype=tl.int32)
        s_top, zz_bottom, s_bottom = zz_top, zz_top, zz_top
    exponent = (zz_top if not GROUPED else tl.load(zz_ptr + top, mask=inside, other=0)) & -67044352  # 0xFC00FC00
    accs = ()
    for nb in tl.static_range(NB):
        zero = tl.zeros([N], dtype=tl.float32)
        accs = accs + ((zero, zero, zero, zero),)
    # what the stores need, loaded before the walk so that its latency hides behind it: output rows (perm) and, one
    # grid per row, their scales. SHARED_SUM: the walks are summed through shared memory (``_shared_sum``) and thread
    # (side 0, lane r < 16) of each block stores row r; else per element block * 32 + lane of Triton's sum of the walks
    if SHARED_SUM:
        row = row0 + block * 16 + lane % 16
        storing = (side == 0) & (lane < 16) & (row - seg_row0 < seg_rows)
        target = tl.load(perm_ptr + row, mask=storing, other=-1)
        scale = 1.0
        if W < 16 and not GROUPED:  # (code - zero) x summed, times the row's scale
            scale = _halves(tl.load(scale_ptr + row, mask=storing, other=0))[0]
    else:
        f = tl.arange(0, 32 * BLOCKS)
        out = row0 + (f // 32) * 16 + (f % 32) // 4
        column = 2 * (f % 4)  # of the mma's output: its token in the block
        mine = out - seg_row0 < seg_rows
        targets = (tl.load(perm_ptr + out, mask=mine, other=-1), tl.load(perm_ptr + out + 8, mask=mine, other=-1))
        scales = (1.0, 1.0)
        if W < 16 and not GROUPED:
            scales = (_halves(tl.load(scale_ptr + out, mask=mine, other=0))[0],
                      _halves(tl.load(scale_ptr + out + 8, mask=mine, other=0))[0])
    STRIDE: tl.constexpr = RUN * SPLIT  # tiles per step of the loop
    pending = ()  # the next AHEAD steps' weights
    for d in tl.static_range(AHEAD):
        tile = d * STRIDE + side * RUN + quad
        run = runs_before + d * SPLIT + side
        pending = pending + (_mma_load(codes_ptr, index_ptr, scale_ptr, zz_ptr, word_base, top, lane, run, run + meta_offset,
                                       inside & (d * STRIDE + side * RUN < n_tiles), tile, n_tiles, P, GROUP_SIZE, W, SPARSE,
                                       GROUPED, RUN, USE_ASM),)
    if SHARED_SUM:  # after the loads above: its barrier would hold them back
        storing = storing & _reserve_scratch(side, N)
    pointers = (x_ptr, codes_ptr, index_ptr, scale_ptr, zz_ptr)
    lanes = (top, lane, side, quad, inside, runs_before, meta_offset)
    sizes, grids = (word_base, n_tiles, P, GROUP_SIZE, B, X_STRIDE), (zz_top, s_top, zz_bottom, s_bottom, exponent)
    # one token, 2:4, a walk of 2 steps or more whose weights all load above: decode them there too, so that the
    # wait leaves only x and the mma.sp (4096 x 4096 at 3 bits 3.68-3.72 against 4.13-4.17 µs, 4 and 5 bits as
    # fast or 1% faster; slower at 4 and 16 tokens and on 1-step walks: benchmarks/results-h100-matvec34-decode.txt)
    DECODED: tl.constexpr = SPARSE and ONE_TOKEN and STEPS >= 2 and AHEAD >= STEPS
    if DECODED:
        decoded = ()
        for d in tl.static_range(STEPS):
            grid, words, meta = pending[d]
            fragments = ()  # a0..a3 of each mma.sp in turn
            for m in tl.static_range(RUN):
                fragments = fragments + _fragment(grid, words, d * STRIDE, m, pointers, lanes, grids, P, GROUP_SIZE,
                                                  n_tiles, W, SPARSE, GROUPED, IN_PLACE, RUN, USE_ASM)
            decoded = decoded + ((grid, _pinned(fragments, USE_ASM), meta),)
        pending = decoded
    if PDL:  # weights above, x below
        tl.extra.cuda.gdc_wait()
    if STEPS > 0:  # straight line: each step's loads get registers of their own (see FixedConfig.unrolled)
        for k in tl.static_range(STEPS):
            pending, accs = _mma_step(pending, accs, k * STRIDE, pointers, lanes, sizes, grids, W, SPARSE, GROUPED,
                                      IN_PLACE, SPLIT, EVEN, NB, AHEAD, RUN, USE_ASM, DECODED)
    else:
        for first in range(0, n_tiles, STRIDE):
            pending, accs = _mma_step(pending, accs, first, pointers, lanes, sizes, grids, W, SPARSE, GROUPED,
                                      IN_PLACE, SPLIT, EVEN, NB, AHEAD, RUN, USE_ASM, False)
    if SHARED_SUM:
        total = _shared_sum(accs[0], e, lane, block, side, quad, SPLIT, BLOCKS) * scale
        tl.store(y_ptr + target, total.to(y_ptr.dtype.element_ty), mask=storing & (target >= 0))
    else:
        for half in tl.static_range(2):  # rows top, top + 8
            target = targets[half]
            for nb in tl.static_range(NB):
                for j in tl.static_range(2):
                    if j == 0 or not ONE_TOKEN:  # one token: only its column (2q, j = 0) is stored
                        y = tl.sum(accs[nb][2 * half + j].reshape(SPLIT, 32 * BLOCKS), axis=0) * scales[half]
                        token = nb * 8 + column + j
                        tl.store(y_ptr + token * Y_STRIDE + target, y.to(y_ptr.dtype.element_ty),
                                 mask=(target >= 0) & (token < B))


@triton.jit
def _segment_rows(W: tl.constexpr, ROWS_2, ROWS_3, ROWS_4, ROWS_6, ROWS_8, ROWS_16):
    """The padded row count of width W's segment, among the kernel's arguments."""
    if W == 2:
        return ROWS_2
    elif W == 3:
        return ROWS_3
    elif W == 4:
        return ROWS_4
    elif W == 6:
        return ROWS_6
    elif W == 8:
        return ROWS_8
    else:
        return ROWS_16


@triton.jit
def _fixed_kernel(x_ptr, y_ptr, codes_ptr, index_ptr, perm_ptr, scale_ptr, zz_ptr,
                  ROWS_2, ROWS_3, ROWS_4, ROWS_6, ROWS_8, ROWS_16, P, K, GROUP_SIZE, B, X_STRIDE, Y_STRIDE,
                  PRESENT: tl.constexpr, DENSE: tl.constexpr, GROUPED: tl.constexpr, BLOCK_R: tl.constexpr,
                  SPLIT: tl.constexpr, EVEN: tl.constexpr, NB: tl.constexpr, USE_ASM: tl.constexpr,
                  PDL: tl.constexpr, AHEAD: tl.constexpr, RUN: tl.constexpr, ONE_TOKEN: tl.constexpr,
                  STEPS: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr, CODE_BYTES, INDEX_BYTES,
                  PREFETCHERS: tl.constexpr, SHARED_SUM: tl.constexpr):
    """One program: BLOCK_R padded rows of one width over all columns and all B tokens (``_mma_block``).
    Segments follow in ascending width, ROWS_w padded rows each (0 when absent): a program finds its
    rows from these arguments alone, with no table to load before its first weight load.
    PDL (programmatic dependent launch, Hopper on): the next kernel in the stream may start as soon
    as every program here has started, and this one waits for its predecessor only before reading x.
    PROGRAMS_PER_SM only keys the compiled kernel: a capped launch shape gets a kernel of its own to cap
    (``_cap_residency``). SHARED_SUM: the column walks are summed through shared memory (``uses_shared_sum``).
    The first PREFETCHERS programs ask the L2 for all CODE_BYTES of code words (and the INDEX_BYTES of 2:4
    metadata) at entry, so that the weights of the programs that start late are on their way before those start."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    if PREFETCHERS > 0:  # the first programs to start ask the L2 for the whole call's weights
        if pid < PREFETCHERS:
            THREADS: tl.constexpr = 32 * (BLOCK_R // 16) * SPLIT
            _prefetch_l2(codes_ptr, CODE_BYTES, pid, PREFETCHERS, THREADS, USE_ASM)
            if not DENSE:
                _prefetch_l2(index_ptr, INDEX_BYTES, pid, PREFETCHERS, THREADS, USE_ASM)
    first, seg_row0, word_base = 0, 0, 0  # the segment's first program, padded row and code word
    for w in tl.static_range(2, 17):
        if (PRESENT >> w) & 1:  # noqa: SIM102 (constexpr test apart from the runtime one)
            seg_rows = _segment_rows(w, ROWS_2, ROWS_3, ROWS_4, ROWS_6, ROWS_8, ROWS_16)
            programs = tl.cdiv(seg_rows, BLOCK_R)
            if (pid >= first) & (pid < first + programs):
                row0 = tl.multiple_of(seg_row0 + (pid - first) * BLOCK_R, 16)  # PAD_ROWS
                _mma_block(x_ptr, y_ptr, codes_ptr, index_ptr, perm_ptr, scale_ptr, zz_ptr, row0,
                           tl.multiple_of(word_base, 16), tl.multiple_of(seg_row0, 16), seg_rows, P, K, GROUP_SIZE,
                           B, X_STRIDE, Y_STRIDE, w, not DENSE, GROUPED, BLOCK_R, SPLIT, EVEN, NB, USE_ASM, PDL,
                           AHEAD, RUN, ONE_TOKEN, STEPS, SHARED_SUM)
            first += programs
            seg_row0 += seg_rows
            # whole runs of RUN tiles of 32 columns; 2:4 keeps half of them
            word_base += tl.cdiv(K // 32, RUN) * (RUN if DENSE else RUN // 2) * w * seg_rows


@dataclass(frozen=True)
class FixedConfig:
    """A launch shape of the fixed-position kernel: ``rows`` per program (a multiple of PAD_ROWS),
    ``split`` warps side by side along the columns per 16 rows (so ``warps`` = split * rows / 16),
    ``warps`` per program, whether to launch it with programmatic dependent launch where the GPU has it
    (Hopper on), how many steps of the loop ahead the weights are loaded (``ahead``; each step
    ahead holds a run's code words in registers), and whether the column walk is straight-line code
    (``unrolled``: one copy of the step per step of the walk, so each step's loads have registers of their
    own and the compiler issues x a step early; a loop carries its queued loads in registers that a copy
    at its top waits for, so there each step waits on the loads it queued one step before), and at most how
    many programs may share a multiprocessor (``programs_per_sm``, 0: as many as registers allow; see
    ``_cap_residency``), and how many of the first programs ask the L2 for the whole call's weights at entry
    (``prefetchers``, 0: none)."""
    rows: int
    split: int
    warps: int
    pdl: bool = True
    ahead: int = 0
    unrolled: bool = False
    programs_per_sm: int = 0
    prefetchers: int = 0


UNROLLED_STEPS = 4  # the longest column walk a dense program of one block runs as straight-line code
SPARSE_UNROLLED_STEPS = 2  # the same for 2:4 programs of one block, at most 2 to a multiprocessor
PREFETCHERS = 32  # programs asking the L2 for a call's weights, where its dense unrolled programs overflow a wave
NARROW_BITS = 3.0  # layers of at most this many code bits a row on average decode more per byte than they read
# and of no row wider than this (dense, 2:4): their loops then take at most 64 registers (4 programs a multiprocessor)
NARROW_WIDEST = {True: 6, False: 4}


def is_narrow(widths: dict[int, int], dense: bool) -> bool:
    """Whether a layer of ``widths`` (code bits -> rows; fp16 rows count as 16) is narrow for ``fixed_config``:
    its rows average at most NARROW_BITS code bits and none is wider than NARROW_WIDEST (dense or 2:4)."""
    return (sum(w * n for w, n in widths.items()) <= NARROW_BITS * sum(widths.values())
            and max(widths) <= NARROW_WIDEST[dense])


def walk_steps(cols: int, dense: bool, split: int) -> int:
    """Steps of a warp's column walk over ``cols`` columns with ``split`` walks side by side."""
    return -(-(cols // 32) // (run_tiles(dense) * split))


@functools.cache  # called on every launch: a dictionary lookup after the first
def fixed_config(rows: int, cols: int, dense: bool, sms: int, batch: int, narrow: bool) -> FixedConfig:
    """The launch shape for ``batch`` tokens and a layer of ``rows`` padded rows (width segments each padded to
    PAD_ROWS) by ``cols`` columns, dense or 2:4, ``narrow`` or not (see below), on a GPU of ``sms`` multiprocessors:
    8 warps; one block of 16 rows per program while they number at most 2 per multiprocessor, else 2 blocks (4 warps
    each along the columns), so that all programs run in one wave; weights loaded 2 steps ahead, but 1 for 2:4
    programs of 2 blocks (2 steps of 256 columns take about 98 registers a thread: 2 programs per multiprocessor,
    two waves). From A/B sweeps on an H100 at 4 bits, batch 1, from DRAM (benchmarks/results-h100-matvec26-mma.txt,
    -matvec27-sparse.txt): the fastest of the shapes tried, or within 3%, on 5 of the 6 benchmark layers; loading
    further ahead, loading x ahead, more warps per block or capping registers was slower. ``batch`` does not change
    the shape: one mma serves 8 tokens. Dense programs of one block walk up to UNROLLED_STEPS steps unrolled: 4096 x
    4096 at 4 bits 4.57 against 5.05 µs at batch 1, 5.88 against 6.22 at 4, 8.65 against 8.92 at 16 (H100,
    benchmarks/results-h100-matvec32-unrolled.txt); longer walks were as fast or slower unrolled, and loading all 4
    steps ahead no faster at batch 1 and slower at 4 and 16 (6.35 against 5.74, 9.64 against 8.76 µs). 2:4 programs
    of one block walk up to SPARSE_UNROLLED_STEPS steps unrolled, at most 2 programs to a multiprocessor
    (``programs_per_sm``): 4096 x 4096 at 4 bits 4.03-4.06 against 4.76-4.79 µs at batch 1, 4.73 against 5.83 at 2,
    5.61 against 8.00 at 4, 7.77 against 12.09 at 8, 13.65 against 13.92 at 16; at batch 1 with 3 and 5 bits 4.16
    and 4.27 against 4.95 and 5.22 (H100, benchmarks/results-h100-matvec33-residency.txt). Unrolled alone: 4.67 at
    batch 1, 17.5 at 16 (registers then let 4 programs in, and the trace had 4 of a call on some multiprocessors
    while others ran none); the cap alone: 5.14 at batch 2, 15.28 at 16. Dense unrolled layers of more programs than
    multiprocessors (4096 x 4096) have PREFETCHERS programs ask the L2 for all the call's weights at entry, up to 8
    tokens: 4096 x 4096 at batch 1 and 4 bits 4.35-4.49 against 4.57-4.68 µs (50% unstructured 4.49-4.67 against
    4.79-4.85), 3 bits 4.22 against 4.45, 5 bits 5.04 against 5.15, batch 4 5.77 against 5.98, batch 8 6.61 against
    6.77 (H100, benchmarks/results-h100-matvec35-prefetch.txt). Not elsewhere: at 16 tokens 9.00 against 8.70; 2:4
    gained 2-5% at 4 bits but lost at 3 (3.77 against 3.67) and at 16 tokens (16.1 against 13.6); 8 programs or all,
    or every thread of a program asking, were slower, and so were the long walks of 4096 x 11008 and 11008 x 4096
    (14.2 against 10.8 µs, every thread asking).
    Narrow layers (rows of NARROW_BITS code bits or fewer on average, none wider than NARROW_WIDEST: 6 dense, 4
    2:4) whose walk is a loop, at one token: at most a fair share of the call's programs to a multiprocessor
    (``programs_per_sm``, the programs over ``sms``, rounded up). Their loop takes 58-64 registers a thread,
    so 4 programs fit a multiprocessor, and behind the previous call the programs of one call crowd some
    multiprocessors, on layers whose decoding, not their bytes, sets the pace. 3-bit mixes (widths 2-4) at
    batch 1: 4096 x 11008 10.78-10.81 against 13.43-13.45 µs, 11008 x 4096 8.45-8.56 against 10.14-10.29 (H100,
    benchmarks/results-h100-matvec36-session15.txt); 2:4 3-bit mixes 10.25-10.28 against 10.51-10.63 and 8.21-8.27
    against 8.49-8.53 (2:4 programs of 32 rows with 6-bit rows take 67 registers, hence 2:4's lower limit). Not
    elsewhere: the cap's shared memory shrinks the L1, and 4-bit (3 programs a multiprocessor by registers) and
    5-bit mixes were 6-19% slower under it."""
    blocks = 1 if -(-rows // PAD_ROWS) <= 2 * sms else 2
    split = 8 // blocks
    unrolled = blocks == 1 and walk_steps(cols, dense, split) <= (UNROLLED_STEPS if dense else SPARSE_UNROLLED_STEPS)
    prefetchers = PREFETCHERS if dense and unrolled and -(-rows // PAD_ROWS) > sms and batch <= MMA_TOKENS else 0
    cap = 2 if unrolled and not dense else 0
    if narrow and not unrolled and batch == 1:
        programs = -(-rows // (PAD_ROWS * blocks)) + (blocks - 1) * len(WIDTHS)  # + a part-filled one per segment
        cap = -(-programs // sms)
    return FixedConfig(PAD_ROWS * blocks, split, 8, True, 2 if dense or blocks == 1 else 1, unrolled, cap, prefetchers)


def launch_config(meta: dict, batch: int) -> FixedConfig:
    """The launch shape ``_fixed_matmul`` uses for ``batch`` tokens on a ``fixed_meta`` arrangement."""
    padded_rows = meta["perm"].numel()  # perm has an entry per padded row (-1 on padding)
    return meta["config"] or fixed_config(padded_rows, meta["cols"], meta["dense"], meta["sms"], batch, meta["narrow"])


def uses_shared_sum(config: FixedConfig, dense: bool, batch: int) -> bool:
    """Whether the compiled kernel sums its column walks through shared memory (``_shared_sum``): at one token, when
    the walks lie side by side (split > 1), except dense loop walks at free residency. There ptxas then settles at
    64 registers (4 bytes spilled) and 4 programs crowd a multiprocessor instead of 3: 4096 x 11008 and 11008 x 4096
    at 4 bits were 6-10% slower. Elsewhere at batch 1, 4 bits: 4096 x 4096 dense 4.19-4.28 against 4.44-4.49 µs, 50%
    4.30-4.40 against 4.61-4.63, 2:4 3.77-3.84 against 4.01-4.06; 2:4 4096 x 11008 and 11008 x 4096 2-3% faster,
    3-bit dense 4096 x 11008 9.51 against 10.75 (H100, benchmarks/results-h100-matvec38-session17.txt)."""
    return batch == 1 and not _interpreted() and config.split > 1 and (
        not dense or config.unrolled or config.programs_per_sm > 0)


def uses_pdl(meta: dict, config: FixedConfig) -> bool:
    """Whether ``config`` launches on the ``fixed_meta`` arrangement ``meta`` with programmatic dependent
    launch: the policy (or an override) asks for it and the GPU has it (``meta["pdl"]``)."""
    return meta["pdl"] and config.pdl


def _pairs(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Two 16-bit tensors [..., n] -> int32 [..., n] holding ``low`` in the low half, ``high`` in the high."""
    return torch.stack([low, high], -1).view(torch.int32).squeeze(-1)


def fixed_meta(module) -> dict | None:
    """The fixed-position kernel's arrangement of a PackedLinear: 2:4 layers as 2:4 (pairs of the 2 kept
    codes of 4 columns), every other layer as dense (pairs of 2 consecutive columns); a pruned weight
    of an unstructured mask becomes the code of its row's zero point, which dequantises to exactly 0
    (fp16 rows: +0), so the kernel reads 4 bits per column where the file stores about 3 (50% kept at
    4 bits plus the bitmask) but runs without ranks. None when the columns or scale groups are not whole
    32-column tiles, a zero point is not a code (never from ``quantizer``), or the GPU has no
    mma.sync m16n8k16 (before Ampere), leaving the layer to the general kernel.

    Rows in packed order, each width segment padded to a multiple of PAD_ROWS rows (no kept weights),
    P padded rows in all. Per segment, codes int32 [blocks of 16 rows, runs (of 4 tiles dense, of
    SPARSE_RUN tiles 2:4; the last one padded with zeros), lane (p, q), words]: lane (p, q)'s pairs in the
    order the kernel takes them (see the comment above PAD_ROWS), 16 pairs per W words: word h holds
    bits 16h.. of the stream of their first codes (W bits each) in its low half and of their second
    codes in its high half. 2:4 ``index``: mma.sp metadata int32 [blocks, runs, lane (p, q), SPARSE_RUN / 2]:
    slot s has the kept columns of groups 8 SPARSE_RUN run + 16 s + 4 q.. (4 bits each, lower | upper << 2)
    of rows p (bits 0-15) and p + 8 (bits 16-31). scale and 1024 + zero as fp16 pairs [groups, P]."""
    packed = module.packed()
    rows, cols, group_size = packed.rows, packed.cols, packed.group_size
    device = module.codes.device
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    compiled = props is not None and not _interpreted()  # a GPU launch, not Triton's interpreter
    if cols % 32 or (group_size != cols and group_size % 32) or (compiled and props.major < 8):
        return None
    assert list(packed.widths) == sorted(packed.widths), "segments come in ascending width (the file's order)"
    if not set(packed.widths) <= set(WIDTHS):
        return None
    kept = packed.kept()
    groups4 = kept.view(rows, cols // 4, 4)
    dense = "mask" not in packed.tensors or not bool((groups4.sum(-1) == 2).all())
    widths = packed.row_widths.to(device)
    values = unpack_bits(packed.tensors["codes"], widths[:, None].expand(rows, cols)[kept])
    quantized = int((widths < 16).sum())
    if quantized:  # the kernel subtracts 1024 + zero in fp16: exact for codes only
        zero = packed.tensors["zero"].float()
        maxq = (1 << widths[:quantized].to(torch.int64)) - 1
        if not bool(((zero == zero.round()) & (zero >= 0) & (zero <= maxq[:, None])).all()):
            return None
    if dense and "mask" in packed.tensors:  # unstructured: pruned weights at their zero point's code
        full = torch.zeros(rows, cols, dtype=torch.int64, device=device)
        full[:quantized] = per_column(packed.tensors["zero"], group_size, cols).round().to(torch.int64)
        full[kept] = values
        values = full
    pairs = values.view(rows, -1, 2)  # [rows, pairs of a row, first and second code]
    run = run_tiles(dense)
    runs = -(-cols // (32 * run))
    run_pairs = 64 if dense else 8 * run  # pairs of a row in a run: 2 columns (dense) or a group of 4 (2:4) each
    padded = [-(-n // PAD_ROWS) * PAD_ROWS for n in packed.widths.values()]
    total = sum(padded)
    groups = -(-cols // group_size)
    if not dense:  # metadata nibbles per (row, group); padding rows and groups: columns 0 and 1
        nibbles = torch.full((total, runs * run_pairs), 4, dtype=torch.int64, device=device)
    one = torch.ones(groups, total, dtype=torch.float16, device=device)
    scale, zz = _pairs(one, one), _pairs(1024 * one, 1024 * one)  # padding rows: weights (c - 0) * 1 of codes 0
    perm = torch.full((total,), -1, dtype=torch.int32, device=device)  # padding rows: not stored
    parts, seg_row, pad_row = [], 0, 0
    for (width, n), n_pad in zip(packed.widths.items(), padded):
        real, seg = slice(pad_row, pad_row + n), slice(seg_row, seg_row + n)
        lane_pairs = torch.zeros(n_pad, runs * run_pairs, 2, dtype=torch.int64, device=device)
        lane_pairs[:n, :pairs.shape[1]] = pairs[seg]
        if dense:  # [fs, block, run, p, q, h, k]: pair k of tile 4 run + q in row p + 8h
            planes = lane_pairs.view(n_pad // 16, 2, 8, runs, 4, 16, 2).permute(6, 0, 3, 2, 4, 1, 5)
        else:  # [fs, block, run, p, q, m, h', h]: group 8m + 4h' + q of the run in row p + 8h
            planes = lane_pairs.view(n_pad // 16, 2, 8, runs, run, 2, 4, 2).permute(7, 0, 3, 2, 6, 4, 5, 1)
            lower = groups4[seg].int().argmax(-1)
            upper = 3 - groups4[seg].flip(-1).int().argmax(-1)
            nibbles[real, :cols // 4] = lower | (upper << 2)
        planes = planes.flatten()
        halves = pack_bits(planes, torch.full_like(planes, width)).view(torch.int16).view(2, -1)
        parts.append(_pairs(halves[0], halves[1]))
        perm[real] = packed.perm[seg].to(device=device, dtype=torch.int32)
        if width < 16:  # quantized rows come first in packed order: their grids are rows seg_row.. too
            grid_scale, grid_zz = packed.tensors["scale"][seg].T, 1024 + packed.tensors["zero"][seg].T
            scale[:, real], zz[:, real] = _pairs(grid_scale, grid_scale), _pairs(grid_zz, grid_zz)
        seg_row += n
        pad_row += n_pad
    index = torch.zeros(1, dtype=torch.int32, device=device)  # dense: not read
    if not dense:  # [block, h, p, run, s, q, j] nibbles -> a word per (block, run, p, q, s)
        shifts = (16 * torch.arange(2, device=device).view(1, 2, 1, 1, 1, 1, 1)
                  + 4 * torch.arange(4, device=device).view(1, 1, 1, 1, 1, 1, 4))
        words = (nibbles.view(total // 16, 2, 8, runs, run // 2, 4, 4) << shifts).sum((1, 6))  # [block, p, run, s, q]
        index = signed32(words.permute(0, 2, 1, 4, 3).flatten())
    codes = torch.cat(parts)
    assert codes.numel() < INT32_MAX and index.numel() < INT32_MAX, "offsets need int32"
    segment_rows = dict(zip(packed.widths, padded))
    sms = props.multi_processor_count if props else 132
    shared_per_sm = getattr(props, "shared_memory_per_multiprocessor", 0) if compiled else 0
    hopper = compiled and props.major >= 9  # programmatic dependent launch and bulk L2 prefetches (sm_90 on)
    return {"codes": codes, "index": index, "segment_rows": [segment_rows.get(w, 0) for w in WIDTHS],
            "perm": perm, "scale": scale.contiguous(), "zero": zz.contiguous(),
            "present": sum(1 << w for w in packed.widths), "dense": dense,
            "narrow": is_narrow(packed.widths, dense),
            "sms": sms, "cols": cols, "shared_per_sm": shared_per_sm,
            "pdl": hopper,  # pdl: the GPU has programmatic dependent launch (the benchmark can turn it off)
            "prefetch": hopper,  # prefetch: the GPU has bulk L2 prefetches (``FixedConfig.prefetchers``)
            "config": None}  # config: a FixedConfig overriding fixed_config (benchmark sweeps)


def _fixed_matmul(x: torch.Tensor, meta: dict, rows: int, cols: int, group_size: int) -> torch.Tensor:
    """x [batch, cols] fp16 -> x W^T [batch, rows] fp16 through the fixed-position kernel: one launch,
    the weights read once per MMA_TOKENS tokens."""
    batch = x.shape[0]
    dense = meta["dense"]
    y = torch.empty(batch, rows, dtype=torch.float16, device=x.device)
    config = launch_config(meta, batch)
    assert config.warps * PAD_ROWS == config.rows * config.split, f"warps = split * rows / 16, got {config}"
    if x.data_ptr() % 16:  # 16-byte loads of x
        x = x.clone()
    words = x.view(torch.int32)
    pdl = uses_pdl(meta, config)
    prefetchers = config.prefetchers if meta["prefetch"] else 0
    programs = sum(-(-n // config.rows) for n in meta["segment_rows"])
    run = run_tiles(dense)
    shared_sum = uses_shared_sum(config, dense, batch)
    kernel = _fixed_kernel[(programs,)](
        words, y, meta["codes"], meta["index"], meta["perm"], meta["scale"], meta["zero"], *meta["segment_rows"],
        meta["perm"].numel(), cols, group_size, batch, words.shape[1], rows,
        PRESENT=meta["present"], DENSE=dense, GROUPED=group_size != cols, BLOCK_R=config.rows, SPLIT=config.split,
        EVEN=(cols // 32) % (run * config.split) == 0, NB=-(-batch // MMA_TOKENS), USE_ASM=not _interpreted(),
        PDL=pdl, AHEAD=config.ahead, RUN=run, ONE_TOKEN=batch == 1,
        STEPS=walk_steps(cols, dense, config.split) if config.unrolled else 0, PROGRAMS_PER_SM=config.programs_per_sm,
        # the sizes only where read: an integer argument keys the compiled kernel (its divisibility by 16)
        CODE_BYTES=meta["codes"].numel() * 4 if prefetchers else 0,
        INDEX_BYTES=meta["index"].numel() * 4 if prefetchers else 0, PREFETCHERS=prefetchers, SHARED_SUM=shared_sum,
        num_warps=config.warps, launch_pdl=pdl,
    )
    if shared_sum:
        _check_scratch(kernel, config.warps)
    if config.programs_per_sm and meta["shared_per_sm"]:  # from the next launch on
        _cap_residency(kernel, config.programs_per_sm, meta["shared_per_sm"])
    return y


def _check_scratch(kernel, warps: int) -> None:
    """The shared sum writes 64 bytes a warp into the scratch that ``_reserve_scratch`` has Triton allocate (4 bytes a
    thread, 128 a warp, in Triton 3.6): fail loudly should a Triton give less."""
    shared = getattr(getattr(kernel, "metadata", None), "shared", None)
    if shared is not None and shared < 64 * warps:
        raise RuntimeError(f"sparsemix: Triton gave the packed kernel {shared} bytes of shared memory, its shared sum "
                           f"needs {64 * warps}: run it with Triton 3.6, whose scratch it was written for")


def _cap_residency(kernel, programs_per_sm: int, shared_per_sm: int) -> None:
    """Let at most ``programs_per_sm`` programs of the compiled ``kernel`` share a multiprocessor, by having
    each launch ask for just over a 1 / (programs_per_sm + 1) share of its shared memory (``shared_per_sm``
    bytes). Registers alone let more in, and then the programs of one call crowd some multiprocessors while
    others idle.
    Triton has no launch option for it: this changes the launch metadata of Triton 3's CompiledKernel and has
    its module reloaded (where they are not there, nothing changes; the product never depends on it)."""
    shared = shared_per_sm // (programs_per_sm + 1) + 1
    metadata = getattr(kernel, "metadata", None)
    if not hasattr(kernel, "packed_metadata") or not hasattr(metadata, "_replace") or metadata.shared >= shared:
        return
    kernel.metadata = metadata._replace(shared=shared)
    kernel.packed_metadata = (metadata.num_warps, metadata.num_ctas, shared)
    kernel.module = kernel._run = None  # the next launch loads it again, with the larger shared-memory limit


def _realign(codes: torch.Tensor, segments: list[tuple[int, int]]) -> tuple[torch.Tensor, list[int]]:
    """The bitstream ``codes`` and (start bit, bits) per segment -> one int32 stream in which each
    segment starts at bit 0 of a word, and each segment's first word there."""
    words = torch.cat([codes.to(torch.int64) & 0xFFFFFFFF, codes.new_zeros(2, dtype=torch.int64)])
    parts, bases, base = [], [], 0
    for start, bits in segments:
        first, shift, n = start // 32, start % 32, -(-bits // 32)
        part = ((words[first:first + n] >> shift) | (words[first + 1:first + n + 1] << (32 - shift))) & 0xFFFFFFFF
        parts.append(part)
        bases.append(base)
        base += n
    parts.append(codes.new_zeros(17, dtype=torch.int64))  # padding: loads of pruned or past-the-end columns
    return signed32(torch.cat(parts)), bases


def chunk_columns(cols: int) -> int:
    """Columns per program: a multiple of 32 near CHUNK that divides cols when one does (no column
    checks in the kernel then; 11008 -> 1376), else CHUNK."""
    if cols % 32:
        return CHUNK
    tiles = cols // 32
    near = [d for d in range(CHUNK // 64, CHUNK // 16 + 1) if tiles % d == 0]
    return 32 * min(near, key=lambda d: abs(d - CHUNK // 32)) if near else CHUNK


def kernel_meta(module) -> dict:
    """Device-side arrangement of a PackedLinear for the kernel (see the module docstring)."""
    packed = module.packed()
    device = module.codes.device
    rows, cols = packed.rows, packed.cols
    widths = packed.row_widths.to(device)
    assert set(packed.widths) <= set(WIDTHS), f"the kernel takes widths {WIDTHS}, got {sorted(packed.widths)}"
    chunk = chunk_columns(cols)
    n_chunks = -(-cols // chunk)
    kept = packed.kept()
    per_chunk = torch.nn.functional.pad(kept, (0, n_chunks * chunk - cols)).view(rows, n_chunks, chunk).sum(-1)
    row_bits = per_chunk.sum(1) * widths
    row_start = torch.cumsum(row_bits, 0) - row_bits  # in the file's stream: offsets follow from the mask
    segments, table, seg_row = [], [], 0
    for width, n in packed.widths.items():
        start = int(row_start[seg_row]) if n else 0
        end = int(row_start[seg_row + n - 1] + row_bits[seg_row + n - 1])
        segments.append((start, end - start))
        table += [[r, seg_row + n, width, len(segments) - 1] for r in range(seg_row, seg_row + n, BLOCK_R)]
        seg_row += n
    codes, bases = _realign(module.codes, segments)
    seg_start = torch.tensor([s for s, _ in segments], device=device)
    seg_of_row = torch.repeat_interleave(torch.arange(len(segments), device=device),
                                         torch.tensor(list(packed.widths.values()), device=device))
    chunk_off = (row_start - seg_start[seg_of_row])[:, None] + (torch.cumsum(per_chunk, 1) - per_chunk) * widths[:, None]
    assert max(bits for _, bits in segments) < INT32_MAX - 64 and codes.numel() < INT32_MAX, "bit offsets need int32"
    for entry in table:
        entry[3] = bases[entry[3]]
    mask = None
    if "mask" in packed.tensors:
        mask = module.mask
        mask_words = -(-cols // 32)
        if mask.shape[1] != 4 * mask_words:
            mask = torch.nn.functional.pad(mask, (0, 4 * mask_words - mask.shape[1]))
        mask = mask.contiguous().view(torch.int32)
        assert rows * mask_words < INT32_MAX
    quantized = int((widths < 16).sum())
    groups = -(-cols // packed.group_size)
    scale = packed.tensors["scale"] if quantized else torch.ones(1, groups, dtype=torch.float16, device=device)
    zero = packed.tensors["zero"] if quantized else torch.zeros(1, groups, dtype=torch.float16, device=device)
    return {"codes": codes, "mask": mask, "table": torch.tensor(table, dtype=torch.int32, device=device),
            "chunk_off": chunk_off.to(torch.int32).contiguous(),
            "perm": packed.perm.to(device=device, dtype=torch.int32), "scale": scale.contiguous(),
            "zero": zero.contiguous(), "groups": groups, "n_chunks": n_chunks, "chunk": chunk,
            "present": sum(1 << w for w in packed.widths)}


def kernel_bytes(meta: dict, batch: int, rows: int, cols: int) -> int:
    """Bytes one packed_matmul call reads or writes at least once: the arrangement, fp16 x and y (fp16 from the
    fixed-position kernel, a ``fixed_meta`` with its "segment_rows"; fp32 from the general kernel's atomics)."""
    read = sum(meta[k].numel() * meta[k].element_size()
               for k in ("codes", "mask", "index", "table", "chunk_off", "perm", "scale", "zero") if meta.get(k) is not None)
    y_bytes = 2 if "segment_rows" in meta else 4
    return read + batch * cols * 2 + batch * rows * y_bytes


ROW_BY_ROW = 4  # up to this many tokens the batch-1 path once per token beats the tl.dot path
# (H100, 4096 x 4096, 4 bits, 50%: 42 µs per token against about 330 µs for a batch of 4)


def packed_matmul(x: torch.Tensor, module) -> torch.Tensor:
    """x [..., cols] with at most 16 rows in all -> x W^T [..., rows] (no bias), in x's dtype; W packed.

    Layers ``fixed_meta`` arranges take the fixed-position kernel, one launch for the batch (at batch 1,
    4 bits, weights from DRAM on an H100: 4.0-10.9 µs, 3.3-4.4x fp16 on 4096 x 4096, 4096 x 11008 and
    11008 x 4096 layers, session 15); the rest the general kernel, once per token for 2 to ROW_BY_ROW tokens
    (faster than its tl.dot path there), else once for the batch."""
    header = module.header
    rows, cols = header["rows"], header["cols"]
    flat = x.reshape(-1, cols).to(torch.float16).contiguous()
    batch = flat.shape[0]
    assert batch <= MAX_BATCH, f"the packed kernel takes at most {MAX_BATCH} tokens, got {batch}"
    if module.fixed_meta is None:
        module.fixed_meta = fixed_meta(module) or {}
    if module.fixed_meta:
        y = _fixed_matmul(flat, module.fixed_meta, rows, cols, header["group_size"])
    elif 1 < batch <= ROW_BY_ROW:
        y = torch.cat([_general_matmul(token, module) for token in flat.split(1)])
    else:
        y = _general_matmul(flat, module)
    return y.to(x.dtype).reshape(*x.shape[:-1], rows)  # no copy when x is fp16


def _general_matmul(flat: torch.Tensor, module) -> torch.Tensor:
    """flat [batch, cols] fp16 -> [batch, rows] fp32 through ``_packed_matmul_kernel``."""
    if module.kernel_meta is None:
        module.kernel_meta = kernel_meta(module)
    meta, header = module.kernel_meta, module.header
    rows, cols = header["rows"], header["cols"]
    batch = flat.shape[0]
    y = torch.zeros(batch, rows, dtype=torch.float32, device=flat.device)
    block_b = 1 if batch == 1 else (16 if batch >= DOT_BATCH else triton.next_power_of_2(batch))
    mask = meta["mask"] if meta["mask"] is not None else meta["codes"]  # any pointer: never read when dense
    group_size = header["group_size"]
    grid = (meta["table"].shape[0], meta["n_chunks"])
    _packed_matmul_kernel[grid](
        flat, y, meta["codes"], mask, meta["table"], meta["chunk_off"], meta["perm"], meta["scale"], meta["zero"],
        batch, rows, cols, meta["groups"], group_size, -(-cols // 32), meta["n_chunks"],
        PRESENT=meta["present"], HAS_MASK=meta["mask"] is not None, GROUPED=meta["groups"] > 1,
        GROUP_TILE=group_size % 32 == 0, CHUNK=meta["chunk"], EVEN_K=cols % meta["chunk"] == 0, BLOCK_R=BLOCK_R, BLOCK_B=block_b,
        USE_DOT=block_b >= DOT_BATCH, USE_ASM=not _interpreted(),
    )
    return y
