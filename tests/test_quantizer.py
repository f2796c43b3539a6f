import torch
from hypothesis import given, settings, strategies as st

from sparsemix.quantizer import grid_params, maxq_for_bits, quantize


def fake_quant(w, bits, **kw):
    maxq = maxq_for_bits(bits)
    scale, zero = grid_params(w, maxq, **kw)
    return quantize(w, scale, zero, maxq[:, None])


def test_each_row_uses_at_most_2_pow_b_levels_and_keeps_zero():
    torch.manual_seed(0)
    w = torch.randn(5, 300)
    w[:, :50] = 0
    bits = torch.tensor([1, 2, 3, 4, 8])
    q = fake_quant(w, bits)
    for row, b in zip(q, bits.tolist()):
        assert row.unique().numel() <= 2**b
    assert (q[:, :50] == 0).all()


def test_sixteen_bit_rows_keep_their_fp16_values():
    w = torch.randn(3, 17)
    q = fake_quant(w, torch.tensor([16, 4, 16]))
    assert torch.equal(q[0], w[0].half().float()) and torch.equal(q[2], w[2].half().float())
    assert not torch.equal(q[0], w[0])  # fp32 values do not survive: 16 bits are stored as fp16
    assert not torch.equal(q[1], w[1])


def test_more_bits_less_error():
    torch.manual_seed(1)
    w = torch.randn(1, 1000).repeat(5, 1)
    err = ((fake_quant(w, torch.tensor([2, 3, 4, 6, 8])) - w) ** 2).sum(1)
    assert torch.all(err[1:] < err[:-1])


def test_symmetric_grid_is_centred():
    w = torch.randn(4, 64)
    maxq = maxq_for_bits(torch.full((4,), 4))
    _, zero = grid_params(w, maxq, sym=True)
    assert torch.all(zero == 8)


def test_mse_clipping_never_worse_in_its_norm():
    torch.manual_seed(2)
    w = torch.randn(8, 256)
    w[:, 0] = 20  # an outlier that min-max would spend the whole range on
    bits = torch.full((8,), 3)
    plain = (fake_quant(w, bits) - w).abs().pow(2.4).sum(1)
    clipped = (fake_quant(w, bits, mse=True) - w).abs().pow(2.4).sum(1)
    assert torch.all(clipped <= plain + 1e-4) and torch.any(clipped < plain * 0.9)


rows = st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(rows, st.sampled_from([1, 2, 3, 4, 6, 8]), st.booleans())
def test_any_row_quantizes_finite_within_range(values, b, sym):
    w = torch.tensor([values])
    q = fake_quant(w, torch.tensor([b]), sym=sym)
    assert torch.isfinite(q).all()
    assert q.unique().numel() <= 2**b
    span = float(w.max().clamp(min=0) - w.min().clamp(max=0))
    bound = (2 * span if sym else span) / (2**b - 1)  # half a step, generous for sym
    assert float((q - w).abs().max()) <= bound + 1e-3 * (1 + span)


def test_degenerate_rows():
    w = torch.stack([torch.zeros(10), torch.full((10,), 3.0), torch.full((10,), -2.0)])
    q = fake_quant(w, torch.tensor([4, 4, 4]))
    assert torch.isfinite(q).all()
    assert torch.allclose(q, w, atol=1e-6, rtol=2.0**-10)  # fp16 scales: the range end is off by < 1 fp16 ulp
