"""Triton kernel for y = x W^T with W in the packed format (``packing.py``), for decode batches.

Layouts the kernel reads (built once per linear by ``kernel_meta``; bytes within a few words per
width segment of the file's):

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

import os

import torch
import triton
import triton.language as tl

from .packing import pack_bits, signed32, unpack_bits

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


# --- 2:4 layers, one token per launch -----------------------------------------------------------------
# When every 4 consecutive columns keep exactly 2 weights (SparseGPT's 2:4 pruning), the file's bitmask
# is 2:4 metadata as it stands: a row's k-th kept code belongs to column group k // 2, and the
# group's mask nibble says which 2 of its 4 columns. Code positions are then fixed, so a tile's codes
# need no popcounts: each (tile column, row) element of a program walks 64-column tiles with every
# shift known at compile time, and the program sums its rows over the tiles itself.

TILE = 64  # columns per tile: 32 kept codes of W bits fill W whole words


@triton.jit
def _tile_code(words, rows_stride, k: tl.constexpr, W: tl.constexpr, row_ok):
    """Code k (0..31) of the tile whose W words start at ``words`` (one word per row, words
    ``rows_stride`` apart), as uint32; 3- and 6-bit codes may straddle two words."""
    first: tl.constexpr = (k * W) // 32
    shift: tl.constexpr = (k * W) % 32
    code = tl.load(words + first * rows_stride, mask=row_ok, other=0).to(tl.uint32, bitcast=True) >> shift
    if shift + W > 32:
        code = code | (tl.load(words + (first + 1) * rows_stride, mask=row_ok, other=0).to(tl.uint32, bitcast=True)
                       << (32 - shift))
    return code & ((1 << W) - 1)


@triton.jit
def _two_four_block(x_ptr, y_ptr, codes_ptr, mask_ptr, perm_ptr, scale_ptr, zero_ptr,
                    row0, row_end, word_base, seg_row0, seg_rows, R, RQ, K, GROUP_SIZE,
                    W: tl.constexpr, GROUPED: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
                    EVEN: tl.constexpr):
    """Rows row0..row_end-1 (all of width W) times all columns into y[perm[row]]: element (k, r) of
    the [SPLIT, BLOCK_R] program walks tiles k, k + SPLIT, ... of row r; the program then sums over k."""
    rows = row0 + tl.arange(0, BLOCK_R)[None, :]  # rows last: a thread's elements share a tile (and its x)
    row_ok = rows < row_end
    local = rows - seg_row0
    split = tl.arange(0, SPLIT)[:, None]
    n_tiles = K // 64
    acc = tl.zeros([SPLIT, BLOCK_R], dtype=tl.float32)
    if W < 16:  # codes become floats by the exponent trick: bits 0x4B000000 | c are the float 2^23 + c
        zz = 8388608.0 + tl.load(zero_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    for i in range(0, n_tiles, SPLIT):
        t = i + split
        ok = (t < n_tiles) | EVEN  # EVEN: SPLIT divides the tiles, no checks
        t = tl.where(ok, t, 0)  # loads of a spare tile repeat tile 0; its x is read as 0
        if W < 16 and GROUPED:  # group size a multiple of 64: one group per tile
            g = (t * 64) // GROUP_SIZE
            zz = 8388608.0 + tl.load(zero_ptr + g * RQ + rows, mask=row_ok, other=0.0).to(tl.float32)
        m0 = tl.load(mask_ptr + (2 * t) * R + rows, mask=row_ok, other=0).to(tl.uint32, bitcast=True)
        m1 = tl.load(mask_ptr + (2 * t + 1) * R + rows, mask=row_ok, other=0).to(tl.uint32, bitcast=True)
        words = codes_ptr + word_base + t * W * seg_rows + local
        xs = x_ptr + t * 64
        part = tl.zeros([SPLIT, BLOCK_R], dtype=tl.float32)  # sum of (code - zero) * x over the tile
        for g4 in tl.static_range(16):
            if g4 < 8:
                n = (m0 >> (4 * g4)) & 15
            else:
                n = (m1 >> (4 * (g4 - 8))) & 15
            x0 = tl.load(xs + 4 * g4, mask=ok, other=0.0).to(tl.float32)
            x1 = tl.load(xs + 4 * g4 + 1, mask=ok, other=0.0).to(tl.float32)
            x2 = tl.load(xs + 4 * g4 + 2, mask=ok, other=0.0).to(tl.float32)
            x3 = tl.load(xs + 4 * g4 + 3, mask=ok, other=0.0).to(tl.float32)
            x_lo = tl.where((n & 1) != 0, x0, tl.where((n & 2) != 0, x1, x2))  # the lower kept column
            x_hi = tl.where((n & 8) != 0, x3, tl.where((n & 4) != 0, x2, x1))  # the upper one
            lo = _tile_code(words, seg_rows, 2 * g4, W, row_ok)
            hi = _tile_code(words, seg_rows, 2 * g4 + 1, W, row_ok)
            if W == 16:
                part += lo.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * x_lo
                part += hi.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * x_hi
            else:
                part += ((lo | 0x4B000000).to(tl.float32, bitcast=True) - zz) * x_lo
                part += ((hi | 0x4B000000).to(tl.float32, bitcast=True) - zz) * x_hi
        if W < 16 and GROUPED:
            acc += tl.load(scale_ptr + g * RQ + rows, mask=row_ok, other=0.0).to(tl.float32) * part
        else:
            acc += part
    y = tl.sum(acc, axis=0)
    rows = row0 + tl.arange(0, BLOCK_R)
    row_ok = rows < row_end
    if W < 16 and not GROUPED:  # one scale per row: applied once
        y *= tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + tl.load(perm_ptr + rows, mask=row_ok, other=0), y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _two_four_kernel(x_ptr, y_ptr, codes_ptr, mask_ptr, table_ptr, perm_ptr, scale_ptr, zero_ptr,
                     R, RQ, K, GROUP_SIZE,
                     PRESENT: tl.constexpr, GROUPED: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
                     EVEN: tl.constexpr):
    """One program: the row block table[pid] (one width) over all columns, summed in the program (no
    atomics, no zeroed output, y written in x's dtype: the whole product is one launch)."""
    entry = table_ptr + tl.program_id(0) * 6
    row0, row_end, width = tl.load(entry), tl.load(entry + 1), tl.load(entry + 2)
    word_base, seg_row0, seg_rows = tl.load(entry + 3), tl.load(entry + 4), tl.load(entry + 5)
    for w in tl.static_range(2, 17):
        if (PRESENT >> w) & 1:  # noqa: SIM102 (constexpr test apart from the runtime one)
            if width == w:
                _two_four_block(x_ptr, y_ptr, codes_ptr, mask_ptr, perm_ptr, scale_ptr, zero_ptr, row0, row_end,
                                word_base, seg_row0, seg_rows, R, RQ, K, GROUP_SIZE, w, GROUPED, BLOCK_R, SPLIT, EVEN)


TWO_FOUR_ELEMENTS = 2048  # (row, tile column) pairs per program (tuned on an H100 at 4096 x 4096)
TWO_FOUR_WARPS = 16
TWO_FOUR_SPLIT = 64  # at most this many tile columns per row walked side by side


def two_four_shape(cols: int) -> tuple[int, int]:
    """(rows per program, tiles walked side by side) for a layer of ``cols`` columns."""
    split = min(triton.next_power_of_2(cols // TILE), TWO_FOUR_SPLIT)
    return max(TWO_FOUR_ELEMENTS // split, 1), split


def two_four_meta(module) -> dict | None:
    """The 2:4 kernel's arrangement of a PackedLinear (read once per token), or None when its mask
    is not 2:4 (or the columns or groups are not whole 64-column tiles). Per width segment, codes as int32
    [tiles, W, segment rows] (tile t's 32 codes of a row in W words); mask words [cols / 32, rows];
    scale/zero [groups, quantized rows]: loads of consecutive rows read consecutive words."""
    packed = module.packed()
    rows, cols, group_size = packed.rows, packed.cols, packed.group_size
    if "mask" not in packed.tensors or cols % TILE or (group_size != cols and group_size % TILE):
        return None
    kept = packed.kept()
    if not bool((kept.view(rows, cols // 4, 4).sum(-1) == 2).all()):
        return None
    device = module.codes.device
    widths = packed.row_widths.to(device)
    values = unpack_bits(packed.tensors["codes"], widths[:, None].expand(rows, cols // 2).flatten())
    values = values.view(rows, cols // 2)
    tiles = cols // TILE
    block_r, _ = two_four_shape(cols)
    parts, table, base, seg_row = [], [], 0, 0
    for width, n in packed.widths.items():
        seg = pack_bits(values[seg_row:seg_row + n].flatten(), torch.full((n * cols // 2,), width, device=device))
        parts.append(seg.view(n, tiles, width).permute(1, 2, 0).flatten())
        table += [[r, seg_row + n, width, base, seg_row, n] for r in range(seg_row, seg_row + n, block_r)]
        base += seg.numel()
        seg_row += n
    assert base < INT32_MAX and rows * cols // 32 < INT32_MAX, "offsets need int32"
    mask = module.mask.contiguous().view(torch.int32).T.contiguous()  # cols % 64 == 0: rows of whole words
    quantized = int((widths < 16).sum())
    scale = packed.tensors["scale"].T.contiguous() if quantized else torch.ones(1, 1, dtype=torch.float16, device=device)
    zero = packed.tensors["zero"].T.contiguous() if quantized else torch.zeros(1, 1, dtype=torch.float16, device=device)
    return {"codes": torch.cat(parts), "mask": mask, "table": torch.tensor(table, dtype=torch.int32, device=device),
            "perm": packed.perm.to(device=device, dtype=torch.int32), "scale": scale, "zero": zero,
            "quantized_rows": max(quantized, 1), "present": sum(1 << w for w in packed.widths)}


def _two_four_matvec(x: torch.Tensor, meta: dict, rows: int, cols: int, group_size: int) -> torch.Tensor:
    """x [1, cols] fp16 -> x W^T [1, rows] in x's dtype through the 2:4 kernel (one launch)."""
    y = torch.empty(1, rows, dtype=x.dtype, device=x.device)
    block_r, split = two_four_shape(cols)
    _two_four_kernel[(meta["table"].shape[0],)](
        x, y, meta["codes"], meta["mask"], meta["table"], meta["perm"], meta["scale"], meta["zero"],
        rows, meta["quantized_rows"], cols, group_size,
        PRESENT=meta["present"], GROUPED=group_size != cols, BLOCK_R=block_r, SPLIT=split,
        EVEN=(cols // TILE) % split == 0, num_warps=TWO_FOUR_WARPS,
    )
    return y


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
    """Bytes one packed_matmul call reads or writes at least once: the arrangement, x and fp32 y."""
    read = sum(meta[k].numel() * meta[k].element_size()
               for k in ("codes", "mask", "table", "chunk_off", "perm", "scale", "zero") if meta.get(k) is not None)
    return read + batch * cols * 2 + batch * rows * 4


ROW_BY_ROW = 4  # up to this many tokens the batch-1 path once per token beats the tl.dot path
# (H100, 4096 x 4096, 4 bits, 50%: 42 µs per token against about 330 µs for a batch of 4)


def packed_matmul(x: torch.Tensor, module) -> torch.Tensor:
    """x [..., cols] with at most 16 rows in all -> x W^T [..., rows] (no bias), in x's dtype; W packed.

    2:4 layers take the 2:4 kernel once per token (7 µs each at 4096 x 4096); other layers the
    general kernel, per token up to ROW_BY_ROW tokens, else once for the whole batch."""
    header = module.header
    rows, cols = header["rows"], header["cols"]
    flat = x.reshape(-1, cols).to(torch.float16).contiguous()
    batch = flat.shape[0]
    assert batch <= MAX_BATCH, f"the packed kernel takes at most {MAX_BATCH} tokens, got {batch}"
    if module.two_four_meta is None:
        module.two_four_meta = two_four_meta(module) or {}
    if module.two_four_meta:
        y = torch.cat([_two_four_matvec(token, module.two_four_meta, rows, cols, header["group_size"])
                       for token in flat.split(1)])
    elif batch <= ROW_BY_ROW:
        y = torch.cat([_general_matmul(token, module) for token in flat.split(1)])
    else:
        y = _general_matmul(flat, module)
    return y.to(x.dtype).reshape(*x.shape[:-1], rows)


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
