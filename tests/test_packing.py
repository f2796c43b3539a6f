import math

import pytest
import torch

from sparsemix.config import PruneConfig, QuantConfig
from sparsemix.packing import dequantise, pack_bits, pack_linear, pack_mask, row_grids, unpack_bits, unpack_mask
from sparsemix.stats import effective_bits
from sparsemix.solver import inverse_hessian, sparsegpt_quantize


def test_mask_packing_round_trips_for_any_width():
    gen = torch.Generator().manual_seed(0)
    for cols in (1, 7, 8, 13, 64):
        mask = torch.rand(5, cols, generator=gen) > 0.5
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.shape == (5, -(-cols // 8))
        assert torch.equal(unpack_mask(packed, cols), mask)
    assert pack_mask(torch.tensor([[True, False, True] + [False] * 5])).item() == 0b101


def test_grids_dequantise_the_solved_weights_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(512, 48, generator=gen)
    W = torch.randn(20, 48, generator=gen)
    Hinv, _ = inverse_hessian(2 / 512 * X.T @ X, 0.01)
    bits = torch.tensor([2, 3, 4, 6, 8, 16] * 3 + [4, 4])
    solved = sparsegpt_quantize(W, Hinv, bits, PruneConfig(0.5))
    grids = row_grids("lin", bits, solved)
    scale, zero = grids["lin.scale"], grids["lin.zero"]
    assert scale.dtype == torch.float16 and zero.dtype == torch.uint8
    quantized = bits < 16
    s, z = scale.float()[quantized], zero.float()[quantized]
    w = solved.weight[quantized]
    codes = torch.round(w / s) + z
    assert (codes >= 0).all() and (codes <= (2.0 ** bits[quantized] - 1)[:, None]).all()
    kept = unpack_mask(grids["lin.kept"], 48)
    assert torch.equal(kept, ~solved.pruned)
    assert (solved.weight[~kept] == 0).all()
    assert torch.equal(s * (codes - z) * kept[quantized], w)  # exact: the packed format relies on it
    float_rows = solved.weight[~quantized]
    assert torch.equal(float_rows.half().float(), float_rows)  # 16-bit rows are fp16 values


def test_bitstream_round_trips_and_wastes_no_bits():
    gen = torch.Generator().manual_seed(2)
    widths = torch.tensor([2, 3, 4, 6, 8, 16, 32, 13])[torch.randint(0, 8, (999,), generator=gen)]
    values = (torch.rand(999, generator=gen, dtype=torch.float64) * 2.0 ** widths).long()
    words = pack_bits(values, widths)
    assert words.dtype == torch.int32 and words.numel() == math.ceil(int(widths.sum()) / 32)
    assert torch.equal(unpack_bits(words, widths), values)
    # LSB first, 3-bit codes straddle the word boundary: 11 codes = 33 bits
    words = pack_bits(torch.full((11,), 0b101), torch.full((11,), 3))
    assert words.numel() == 2 and words[1].item() == 0b1 and (words[0].item() & 0b111) == 0b101


def solved_linear(rows, cols, bits, prune, quant, seed=3):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(256, cols, generator=gen)
    W = torch.randn(rows, cols, generator=gen)
    Hinv, _ = inverse_hessian(2 / 256 * X.T @ X, 0.01)
    return sparsegpt_quantize(W, Hinv, bits, prune, quant)


@pytest.mark.parametrize("prune, group_size", [
    (PruneConfig(0.5), 0), (PruneConfig(0.0), 0), (PruneConfig(0.0, prunen=2, prunem=4), 0), (PruneConfig(0.5), 16),
])
def test_packed_linear_dequantises_bit_for_bit_at_the_reported_size(prune, group_size):
    rows, cols = 23, 48
    bits = torch.tensor([2, 3, 4, 6, 8, 16, 3, 6])[torch.arange(rows) * 5 % 8]
    solved = solved_linear(rows, cols, bits, prune, QuantConfig(group_size=group_size))
    grids = row_grids("lin", bits, solved)
    kept = unpack_mask(grids["lin.kept"], cols)
    sparse = prune.sparsity > 0 or prune.nm
    packed = pack_linear(solved.weight, grids["lin.bits"], grids["lin.scale"], grids["lin.zero"], kept,
                         group_size or cols, sparse)
    assert torch.equal(dequantise(packed), solved.weight)
    assert ("mask" in packed.tensors) == sparse and "perm" in packed.tensors
    assert list(packed.widths) == sorted(packed.widths)  # rows grouped by ascending width
    reported = effective_bits(bits, kept.sum(1), cols, solved.scale.shape[1], prune) * rows * cols / 8
    assert 0 <= packed.nbytes() - reported < 8  # codes and perm streams are each padded to a 32-bit word


def test_one_width_stores_no_permutation():
    bits = torch.full((9,), 4)
    solved = solved_linear(9, 32, bits, PruneConfig(0.5), QuantConfig())
    grids = row_grids("lin", bits, solved)
    packed = pack_linear(solved.weight.half(), bits, grids["lin.scale"], grids["lin.zero"],
                         unpack_mask(grids["lin.kept"], 32), 32, True)
    assert "perm" not in packed.tensors and packed.dtype == "float16"
    assert torch.equal(dequantise(packed), solved.weight.half())
