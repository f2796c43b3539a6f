import pytest
import torch
from torch import nn

from sparsemix.calibration import InputStatistics, OutputStatistics, collect_statistics


def test_running_hessian_equals_batch_formula_for_any_leading_shape():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5)
    stats = InputStatistics(5)
    stats.update(x[:1])  # [1, 7, 5]
    stats.update(x[1:].reshape(14, 5))  # [14, 5]
    flat = x.reshape(-1, 5).double()
    assert stats.tokens == 21
    torch.testing.assert_close(stats.H.double(), 2 / 21 * flat.T @ flat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.abs_mean.double(), flat.abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.sq_mean.double(), (flat**2).mean(0), rtol=1e-5, atol=1e-6)


def test_fp16_inputs_do_not_overflow():
    x = torch.full((4, 8), 300.0, dtype=torch.float16)  # 300^2 * 8 tokens overflows fp16
    stats = InputStatistics(8)
    stats.update(x)
    assert torch.isfinite(stats.H).all() and float(stats.H[0, 0]) == 2 * 300.0**2


def test_output_statistics():
    y = torch.tensor([[1.0, -2.0], [3.0, 2.0]])
    stats = OutputStatistics(2)
    stats.update(y)
    assert stats.abs_mean.tolist() == [2.0, 2.0]
    assert stats.mean.tolist() == [2.0, 0.0]
    assert stats.variance.tolist() == [1.0, 4.0]


def test_hooks_share_input_accumulator_and_are_removed():
    torch.manual_seed(0)
    q, k, o = nn.Linear(4, 3), nn.Linear(4, 2), nn.Linear(3, 4)
    x = torch.randn(2, 5, 4)
    with collect_statistics({"q": q, "k": k, "o": o}, shared_inputs=[["q", "k"]]) as (inputs, outputs):
        o(q(x))
        k(x)
    assert inputs["q"] is inputs["k"] and inputs["o"] is not inputs["q"]
    assert inputs["q"].tokens == 10  # updated once per forward of the owner, not by k
    assert outputs["k"].tokens == 10 and outputs["o"].tokens == 10
    assert not q._forward_hooks and not k._forward_hooks and not o._forward_hooks


def test_moments_kernel_sums_abs_plain_and_squares():
    """The GPU statistics kernel (run here in Triton's interpreter) reads x once for three sums."""
    pytest.importorskip("triton")
    from sparsemix.moments_kernel import triton_column_sums

    gen = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for tokens, features, dtype in [(1000, 70, torch.float32), (33, 130, torch.float16), (5000, 64, torch.float32)]:
        x = (torch.randn(tokens, features, generator=gen) * 3 + 1).to(dtype)
        got = triton_column_sums(x.to(device)).cpu()
        ref = x.double()
        expected = torch.stack([ref.abs().sum(0), ref.sum(0), (ref * ref).sum(0)]).float()
        assert got.shape == (3, features)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
