import functools
import operator

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsemix.allocation import allocate_bits
from sparsemix.config import AllocationConfig, ConfigError, ImportanceWeights, parse_bit_options


def alloc(importance, **kw):
    return allocate_bits(importance, AllocationConfig(**kw))


def reachable(total, rows, options=(2, 3, 4, 6, 8)):
    """Whether some mix of ``rows`` widths from ``options`` sums to ``total`` (sumset as a bitset)."""
    sums = 1  # bit t set: total t is reachable
    for _ in range(rows):
        sums = functools.reduce(operator.or_, (sums << b for b in options))
    return bool(sums >> total & 1)


def test_budget_is_exact_over_many_rows_and_targets():
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for rows in list(range(1, 60)) + [97, 128, 500, 1536]:
        importance = torch.rand(rows, generator=gen) ** 3 * 10
        for tenth in range(20, 81, 5):
            target = tenth / 10
            if abs(target * rows - round(target * rows)) > 1e-9 or not reachable(round(target * rows), rows):
                continue
            bits = alloc(importance, method="budget", target_avg_bits=target)
            assert int(bits.sum()) == round(target * rows), (rows, target)
            checked += 1
    assert checked > 500


def test_budget_named_examples():
    importance = torch.rand(64)
    assert float(alloc(importance, method="budget", target_avg_bits=4.0).float().mean()) == 4.0
    assert float(alloc(importance, method="budget", target_avg_bits=3.5).float().mean()) == 3.5


def test_quantile_without_target_gives_equal_tiers():
    bits = alloc(torch.rand(1000), method="quantile")
    counts = {b: int((bits == b).sum()) for b in (2, 3, 4, 6, 8)}
    assert all(abs(c - 200) <= 1 for c in counts.values()), counts
    assert abs(float(bits.float().mean()) - 4.6) < 1e-6


@pytest.mark.parametrize("rows", [7, 64, 333, 1000])
@pytest.mark.parametrize("target", [2.3, 3.0, 3.5, 4.0, 4.5, 6.9])
def test_quantile_with_target_within_one_channel(rows, target):
    bits = alloc(torch.rand(rows), method="quantile", target_avg_bits=target)
    assert abs(float(bits.float().mean()) - target) <= 2 / rows + 1e-9  # 2 = widest step of 2/3/4/6/8
    if rows >= 64 and 3 <= target <= 6:
        assert len(bits.unique()) == 5  # still spread over every tier, not collapsed


def test_quantile_tiers_are_the_most_even_for_the_target():
    bits = alloc(torch.rand(10000), method="quantile", target_avg_bits=4.6)
    counts = torch.tensor([int((bits == b).sum()) for b in (2, 3, 4, 6, 8)])
    assert (counts - 2000).abs().max() <= 2  # 4.6 is the equal-tier mean: max entropy gives 20% each


def test_threshold3_fixed_thresholds():
    contribution = torch.tensor([0.1, 0.49, 0.5, 1.0, 1.2, 1.21, 3.0])
    bits = alloc(contribution, method="threshold3")
    assert bits.tolist() == [2, 2, 4, 4, 4, 8, 8]


def test_uniform():
    assert alloc(torch.rand(5), method="uniform", wbits=3).tolist() == [3] * 5


importances = st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=200)


@settings(max_examples=150, deadline=None)
@given(importances, st.sampled_from(["quantile", "budget", "threshold3"]), st.floats(2.0, 8.0))
def test_more_important_rows_never_get_fewer_bits(values, method, target):
    importance = torch.tensor(values, dtype=torch.float64)
    kwargs = {} if method == "threshold3" else {"target_avg_bits": target}
    bits = alloc(importance, method=method, **kwargs)
    order = torch.argsort(importance)
    sorted_imp, sorted_bits = importance[order], bits[order]
    for i in range(len(values) - 1):
        if sorted_imp[i + 1] > sorted_imp[i]:
            assert sorted_bits[i + 1] >= sorted_bits[i]
    assert set(bits.tolist()) <= ({2, 4, 8} if method == "threshold3" else {2, 3, 4, 6, 8})


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "budget", "target_avg_bits": 1.5}, "outside the bit options' range [2, 8]"),
    ({"method": "quantile", "target_avg_bits": 9}, "outside the bit options' range"),
    ({"method": "budget"}, "needs a target"),
    ({"method": "magic"}, "unknown bit method 'magic'"),
    ({"bit_options": ()}, "empty"),
    ({"bit_options": (4, 2)}, "not sorted"),
    ({"bit_options": (2, 2, 4)}, "duplicates"),
    ({"bit_options": (2, 9)}, "1..8 or 16"),
])
def test_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        AllocationConfig(**kwargs)


def test_parsers():
    assert parse_bit_options("2,3,4,6,8") == (2, 3, 4, 6, 8)
    with pytest.raises(ConfigError, match="not integers"):
        parse_bit_options("2,x")
    w = ImportanceWeights.parse("activation=0.3,hessian=0.2")
    assert w.activation == 0.3 and w.weight == 0.0
    with pytest.raises(ConfigError, match="unknown importance dimension 'speed'"):
        ImportanceWeights.parse("speed=1")
    with pytest.raises(ConfigError, match="all zero"):
        ImportanceWeights.parse("activation=0")
    with pytest.raises(ConfigError, match="negative"):
        ImportanceWeights.parse("activation=-1,weight=1")
