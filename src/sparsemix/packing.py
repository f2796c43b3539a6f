"""The packed mixed-precision format: what a compressed linear stores, bit for bit.

What the compressor hands over (``row_grids``): each row's width, its fp16 grid and the
kept-mask, bit-packed. Then the packed format itself (``pack_linear``, ``dequantise``): rows
grouped by width, codes of kept weights in one bitstream, fp16 scales and zero points.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .solver import SolveResult
from .stats import index_bits


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


# --- the packed format --------------------------------------------------------------------------
# Per linear: rows stable-sorted by width (``perm[i]`` = original row of packed row i), then ONE
# LSB-first bitstream of 32-bit words holding, row after row, the codes of each row's kept
# weights at that row's width (16-bit rows: the fp16 bit pattern). Codes straddle word
# boundaries: no padding anywhere but after the last code.

FORMAT = "sparsemix-packed"
VERSION = 1
UNQUANTIZED = 16


def pack_bits(values: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """values [n] (ints, each < 2^width) at widths [n] (1..32 bits) -> int32 words [ceil(sum(widths) / 32)].

    Value i occupies bits offset_i .. offset_i + width_i - 1, offset = exclusive cumsum of widths;
    bit k of the stream is bit k % 32 of word k // 32."""
    values, widths = values.to(torch.int64).flatten(), widths.to(torch.int64).flatten()
    ends = torch.cumsum(widths, 0)
    offsets = ends - widths
    words = torch.zeros(int(ends[-1]) // 32 + 2 if len(ends) else 1, dtype=torch.int64, device=values.device)
    shift = offsets % 32
    # bits never overlap, so adding equals OR-ing; the part past bit 31 spills into the next word
    words.index_add_(0, offsets // 32, (values << shift) & 0xFFFFFFFF)
    words.index_add_(0, offsets // 32 + 1, values >> (32 - shift))
    return signed32(words[: -(-int(ends[-1]) // 32) if len(ends) else 0])


def signed32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bits(words: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_bits``: int32 words and widths [n] -> values [n] int64."""
    widths = widths.to(torch.int64).flatten()
    offsets = torch.cumsum(widths, 0) - widths
    padded = torch.cat([words.to(torch.int64) & 0xFFFFFFFF, words.new_zeros(1, dtype=torch.int64)])
    index, shift = offsets // 32, offsets % 32
    both = padded[index] | (padded[torch.clamp(index + 1, max=len(padded) - 1)] << 32)  # 64-bit window
    return (both >> shift) & ((1 << widths) - 1)


def per_column(grid: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """[rows, groups] scales or zero points -> [rows, cols] float32, each column its group's value."""
    return grid.float().repeat_interleave(group_size, dim=1)[:, :cols]


@dataclass(frozen=True)
class PackedWeight:
    """One linear in the packed format; ``tensors`` are what the file stores under ``{name}.{key}``:
    codes int32 [words], mask uint8 [rows, ceil(cols / 8)] (packed order; absent when dense),
    perm int32 [words] (absent when one width), scale, zero fp16 [quantized rows, groups]."""

    rows: int
    cols: int
    group_size: int  # columns per scale/zero group (cols when one per row)
    dtype: str  # of the original weight, e.g. "float32"
    widths: dict[int, int]  # width -> rows, in packed (ascending width) order
    tensors: dict[str, torch.Tensor]

    def header(self) -> dict:
        return {"rows": self.rows, "cols": self.cols, "group_size": self.group_size, "dtype": self.dtype,
                "widths": {str(b): n for b, n in self.widths.items()}}

    @classmethod
    def from_header(cls, header: dict, tensors: dict[str, torch.Tensor]) -> PackedWeight:
        widths = {int(b): n for b, n in header["widths"].items()}
        return cls(header["rows"], header["cols"], header["group_size"], header["dtype"], widths, tensors)

    @property
    def row_widths(self) -> torch.Tensor:
        """[rows] int64 width of each packed row."""
        return torch.cat([torch.full((n,), b, dtype=torch.int64) for b, n in self.widths.items()])

    @property
    def perm(self) -> torch.Tensor:
        """[rows] int64: packed row i is row perm[i] of the weight."""
        if "perm" not in self.tensors:
            return torch.arange(self.rows)
        words = self.tensors["perm"]
        return unpack_bits(words, torch.full((self.rows,), index_bits(self.rows), device=words.device))

    def kept(self) -> torch.Tensor:
        """[rows, cols] bool in packed order."""
        if "mask" not in self.tensors:
            return torch.ones(self.rows, self.cols, dtype=torch.bool, device=self.tensors["codes"].device)
        return unpack_mask(self.tensors["mask"], self.cols)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def pack_linear(weight: torch.Tensor, bits: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                kept: torch.Tensor, group_size: int, sparse: bool) -> PackedWeight:
    """A fake-quantised ``weight`` [rows, cols] with its grids (scale fp16, zero [rows, groups], ``bits``
    [rows], ``kept`` [rows, cols] bool) -> PackedWeight; codes are recovered as round(w / scale) + zero."""
    rows, cols = weight.shape
    bits = bits.to(device=weight.device, dtype=torch.int64)
    kept = kept.to(weight.device)
    perm = torch.argsort(bits, stable=True)
    w, kept, b = weight[perm].float(), kept[perm], bits[perm]
    quantized = b < UNQUANTIZED
    s, z = per_column(scale[perm], group_size, cols), per_column(zero[perm], group_size, cols)
    codes = (torch.round(w / s) + z).clamp(min=0)
    fp16_bits = weight[perm].to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    codes = torch.where(quantized[:, None], codes.to(torch.int64), fp16_bits)
    codes = torch.minimum(codes, (1 << b)[:, None] - 1)  # a bad code shows up in the bit-exact check
    widths = {int(v): int(n) for v, n in zip(*torch.unique(b, return_counts=True))}
    tensors = {"codes": pack_bits(codes[kept], b[:, None].expand(rows, cols)[kept]),
               "scale": scale[perm][quantized].to(torch.float16).contiguous(),
               "zero": zero[perm][quantized].to(torch.float16).contiguous()}
    if sparse:
        tensors["mask"] = pack_mask(kept)
    if len(widths) > 1:
        tensors["perm"] = pack_bits(perm, torch.full((rows,), index_bits(rows), device=perm.device))
    return PackedWeight(rows, cols, group_size, str(weight.dtype).removeprefix("torch."), widths, tensors)


def dequantise(packed: PackedWeight) -> torch.Tensor:
    """PackedWeight -> weight [rows, cols] in the original dtype and row order, bit for bit:
    ``scale * (code - zero)`` in fp32 (the expression of ``quantizer.quantize``), 0 where pruned."""
    t = packed.tensors
    kept, b = packed.kept(), packed.row_widths.to(t["codes"].device)
    rows, cols = kept.shape
    codes = torch.zeros(rows, cols, dtype=torch.int64, device=kept.device)
    codes[kept] = unpack_bits(t["codes"], b[:, None].expand(rows, cols)[kept])
    quantized = b < UNQUANTIZED
    s, z = per_column(t["scale"], packed.group_size, cols), per_column(t["zero"], packed.group_size, cols)
    w = torch.empty(rows, cols, dtype=torch.float32, device=kept.device)
    w[quantized] = s * (codes[quantized].float() - z)
    pattern = codes[~quantized]
    w[~quantized] = torch.where(pattern >= 2**15, pattern - 2**16, pattern).to(torch.int16).view(torch.float16).float()
    w = torch.where(kept, w, torch.zeros_like(w))
    out = torch.empty_like(w)
    out[packed.perm.to(w.device)] = w
    return out.to(getattr(torch, packed.dtype))


def random_packed(bits: torch.Tensor, cols: int, sparsity: float, group_size: int,
                  generator: torch.Generator, device: str = "cpu", two_four: bool = False) -> PackedWeight:
    """A random layer with rows of widths ``bits`` [rows] and ``sparsity`` (0: dense, no mask) in the
    packed format on ``device``, for kernel tests and benchmarks: random codes on random fp16 grids.
    ``two_four``: 2 kept weights in every 4 consecutive columns instead (``sparsity`` is then 0.5)."""
    rows = bits.numel()
    groups = -(-cols // group_size)
    maxq = (2.0 ** bits.clamp(max=8) - 1)[:, None]
    scale = (torch.rand(rows, groups, generator=generator) * 0.02 + 0.001).half()
    zero = torch.round(torch.rand(rows, groups, generator=generator) * maxq).to(torch.uint8)
    codes = torch.floor(torch.rand(rows, cols, generator=generator) * (maxq + 1)).clamp(max=maxq)
    s, z = per_column(scale, group_size, cols), per_column(zero, group_size, cols)
    floats = (0.05 * torch.randn(rows, cols, generator=generator)).half().float()
    weight = torch.where(bits[:, None] < UNQUANTIZED, s * (codes - z), floats)
    kept = torch.rand(rows, cols, generator=generator) >= sparsity
    if two_four:  # the 2 of each 4 with the largest random keys
        keys = torch.rand(rows, -(-cols // 4), 4, generator=generator)
        kept = (keys.argsort(-1).argsort(-1) >= 2).flatten(1)[:, :cols]
        sparsity = 0.5
    weight = torch.where(kept, weight, torch.zeros_like(weight)).half()
    return pack_linear(weight.to(device), bits, scale.to(device), zero.to(device), kept, group_size, sparsity > 0)
