import torch

from sparsemix.config import PruneConfig
from sparsemix.packing import pack_mask, row_grids, unpack_mask
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
