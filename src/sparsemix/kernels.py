"""Triton kernel for y = x W^T with W in the packed format (``packing.py``), for decode batches.

One launch per linear covers every width: each program takes BLOCK_R packed rows and one chunk of
CHUNK columns (split-K, so a batch-1 matvec still fills the GPU), walks the chunk in tiles of
BLOCK_K columns, finds each kept weight's rank in its row's code stream from the kept-mask
(running offset + in-tile prefix count), pulls its ``width`` bits out of the 64-bit window of the
two words holding them, dequantises ``(code - zero) * scale`` (16-bit rows: the fp16 pattern) and
accumulates ``w @ x^T`` in fp32; rows are atomically added to y at their original index perm[r].

Imported only when a CUDA input (or ``TRITON_INTERPRET=1`` test) needs it: CPU installs need no Triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 1024  # columns per program; chunk start offsets are precomputed per row
BLOCK_R = 16
BLOCK_K = 128
MAX_BATCH = 16


@triton.jit
def _packed_matmul_kernel(
    x_ptr, y_ptr, codes_ptr, mask_ptr, width_ptr, chunk_off_ptr, perm_ptr, scale_ptr, zero_ptr,
    B, R, K, Q, G, GROUP_SIZE, MASK_BYTES, N_CHUNKS,
    HAS_MASK: tl.constexpr, GROUPED: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid_r, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    width = tl.load(width_ptr + rows, mask=row_ok, other=2)
    width64 = width.to(tl.uint64)
    code_mask = (tl.full([BLOCK_R], 1, tl.uint64) << width64) - 1
    offset = tl.load(chunk_off_ptr + rows.to(tl.int64) * N_CHUNKS + pid_k, mask=row_ok, other=0)  # bit position
    quantized = width < 16
    grid_row = tl.minimum(rows, Q - 1).to(tl.int64)  # rows sorted by width: quantized rows come first
    if not GROUPED:
        scale = tl.load(scale_ptr + grid_row * G, mask=row_ok & quantized, other=1.0).to(tl.float32)
        zero = tl.load(zero_ptr + grid_row * G, mask=row_ok & quantized, other=0.0).to(tl.float32)
    batch = tl.arange(0, BLOCK_B)
    acc = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.float32)
    for tile in range(CHUNK // BLOCK_K):
        cols = pid_k * CHUNK + tile * BLOCK_K + tl.arange(0, BLOCK_K)
        inside = row_ok[:, None] & (cols < K)[None, :]
        if HAS_MASK:
            byte = tl.load(mask_ptr + rows[:, None].to(tl.int64) * MASK_BYTES + (cols // 8)[None, :],
                           mask=inside, other=0)
            kept = ((byte.to(tl.int32) >> (cols % 8)[None, :]) & 1) == 1
        else:
            kept = inside
        kept_i = kept.to(tl.int32)
        rank = (tl.cumsum(kept_i, axis=1) - kept_i).to(tl.int64)  # kept weights before this one in the tile
        pos = offset[:, None] + rank * width[:, None]
        word = pos >> 5
        shift = (pos & 31).to(tl.uint64)
        lo = tl.load(codes_ptr + word, mask=kept, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        straddles = kept & ((pos & 31) + width[:, None] > 32)
        hi = tl.load(codes_ptr + word + 1, mask=straddles, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        code = ((lo | (hi << 32)) >> shift) & code_mask[:, None]
        offset += tl.sum(kept_i, axis=1).to(tl.int64) * width
        if GROUPED:
            g = grid_row[:, None] * G + (cols // GROUP_SIZE)[None, :]
            scale_t = tl.load(scale_ptr + g, mask=inside & quantized[:, None], other=1.0).to(tl.float32)
            zero_t = tl.load(zero_ptr + g, mask=inside & quantized[:, None], other=0.0).to(tl.float32)
        else:
            scale_t, zero_t = scale[:, None], zero[:, None]
        w_q = (code.to(tl.float32) - zero_t) * scale_t
        w_16 = code.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        w = tl.where(kept, tl.where(quantized[:, None], w_q, w_16), 0.0).to(tl.float16)
        xt = tl.load(x_ptr + batch[None, :] * K + cols[:, None], mask=(batch < B)[None, :] & (cols < K)[:, None],
                     other=0.0)  # [BLOCK_K, BLOCK_B]
        acc += tl.dot(w, xt)
    perm = tl.load(perm_ptr + rows, mask=row_ok, other=0)
    tl.atomic_add(y_ptr + batch[None, :] * R + perm[:, None], acc, mask=row_ok[:, None] & (batch < B)[None, :])


def kernel_meta(module) -> dict:
    """Per-row device metadata of a PackedLinear: width, bit offset of each CHUNK of columns, perm."""
    packed = module.packed()
    device = module.codes.device
    rows, cols = packed.rows, packed.cols
    widths = packed.row_widths.to(device)
    n_chunks = -(-cols // CHUNK)
    kept = packed.kept().to(device)
    per_chunk = torch.nn.functional.pad(kept, (0, n_chunks * CHUNK - cols)).view(rows, n_chunks, CHUNK).sum(-1)
    row_bits = per_chunk.sum(1) * widths
    row_start = torch.cumsum(row_bits, 0) - row_bits  # offsets follow from the mask: none are stored
    chunk_off = row_start[:, None] + (torch.cumsum(per_chunk, 1) - per_chunk) * widths[:, None]
    quantized = int((widths < 16).sum())
    groups = -(-cols // packed.group_size)
    scale = packed.tensors["scale"] if quantized else torch.ones(1, groups, dtype=torch.float16, device=device)
    zero = packed.tensors["zero"] if quantized else torch.zeros(1, groups, dtype=torch.float16, device=device)
    return {"width": widths.to(torch.int32).contiguous(), "chunk_off": chunk_off.to(torch.int64).contiguous(),
            "perm": packed.perm.to(device=device, dtype=torch.int32), "scale": scale.contiguous(),
            "zero": zero.contiguous(), "quantized": max(quantized, 1), "groups": groups,
            "n_chunks": n_chunks, "has_mask": "mask" in packed.tensors}


def packed_matmul(x: torch.Tensor, module) -> torch.Tensor:
    """x [..., cols] with at most 16 rows in all -> x W^T [..., rows] (no bias), in x's dtype; W packed."""
    if module.kernel_meta is None:
        module.kernel_meta = kernel_meta(module)
    meta, header = module.kernel_meta, module.header
    rows, cols = header["rows"], header["cols"]
    flat = x.reshape(-1, cols).to(torch.float16).contiguous()
    batch = flat.shape[0]
    assert batch <= MAX_BATCH, f"the packed kernel takes at most {MAX_BATCH} tokens, got {batch}"
    y = torch.zeros(batch, rows, dtype=torch.float32, device=x.device)
    mask = module.mask if meta["has_mask"] else module.codes  # any pointer: never read without a mask
    grid = (triton.cdiv(rows, BLOCK_R), meta["n_chunks"])
    _packed_matmul_kernel[grid](
        flat, y, module.codes, mask, meta["width"], meta["chunk_off"], meta["perm"], meta["scale"], meta["zero"],
        batch, rows, cols, meta["quantized"], meta["groups"], header["group_size"], -(-cols // 8), meta["n_chunks"],
        HAS_MASK=meta["has_mask"], GROUPED=meta["groups"] > 1, CHUNK=CHUNK,
        BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_B=16,
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], rows)
