import json

import pytest
import torch

from sparsemix.config import PruneConfig
from sparsemix.stats import CompressionStats, LayerStats, effective_bits


def layer(name, rows, cols, bit_counts, eff=4.0):
    avg = sum(b * c for b, c in bit_counts.items()) / rows
    return LayerStats(name, rows, cols, bit_counts, avg, eff, 0.5, 2.0, 0.5, 1.0, 0.1)


def test_effective_bits_counts_codes_grids_and_metadata():
    bits = torch.tensor([4, 2])
    kept = torch.tensor([50, 50])  # 50% of 100 columns kept
    # codes (4+2)*50 = 300, grids 2 rows * 1 group * 32 = 64, row order 2 * 1, bitmask 200 -> 566 / 200
    assert effective_bits(bits, kept, 100, 1, PruneConfig(sparsity=0.5)) == pytest.approx(566 / 200)
    # 2:4: index of 2 kept per 4, 2 bits each -> 1 bit per weight, same as the bitmask here
    assert effective_bits(bits, kept, 100, 1, PruneConfig(sparsity=0, prunen=2, prunem=4)) == pytest.approx(566 / 200)
    # dense, per-group grids (4 groups), no metadata
    dense = effective_bits(bits, torch.tensor([100, 100]), 100, 4, PruneConfig(sparsity=0))
    assert dense == pytest.approx((600 + 2 * 4 * 32 + 2) / 200)
    # one width for every row: natural order, no permutation stored
    same = effective_bits(torch.tensor([4] * 5), torch.tensor([10] * 5), 10, 1, PruneConfig(sparsity=0))
    assert same == pytest.approx((200 + 5 * 32) / 50)
    # five rows of two widths: ceil(log2 5) = 3 bits each
    mixed = effective_bits(torch.tensor([4, 4, 4, 4, 2]), torch.tensor([10] * 5), 10, 1, PruneConfig(sparsity=0))
    assert mixed == pytest.approx((180 + 5 * 32 + 15) / 50)
    # unquantized rows carry no grid
    assert effective_bits(torch.tensor([16]), torch.tensor([10]), 10, 1, PruneConfig(sparsity=0)) == 16


def test_model_figures_are_distinct_and_correct():
    stats = CompressionStats([layer("a", 2, 10, {2: 1, 8: 1}, eff=5.0), layer("b", 2, 30, {4: 2}, eff=3.0)])
    assert stats.total_channels == 4
    assert stats.channels_per_bit == {2: 1, 4: 2, 8: 1}
    assert stats.channel_average_bits == 4.5  # (2 + 8 + 4 + 4) / 4
    assert stats.parameter_weighted_bits == pytest.approx((2 * 10 + 8 * 10 + 4 * 60) / 80)
    assert stats.effective_bits_per_weight == pytest.approx((5 * 20 + 3 * 60) / 80)
    assert stats.compressed_megabytes == pytest.approx((5 * 20 + 3 * 60) / 8e6)


def test_summary_text_shape_and_json_roundtrip():
    stats = CompressionStats([layer("layers.0.self_attn.q_proj", 5, 10, {2: 2, 4: 3})])
    text = stats.format_summary()
    assert "Total channels: 5" in text
    assert "  2-bit:       2 channels (40.00%)" in text
    assert "Average bits: 3.200 (channel average)" in text
    assert "layers.0.self_attn.q_proj: avg=3.20 bits, importance_range=(0.500, 2.000)" in text
    again = CompressionStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again.format_summary() == text
    assert again.to_dict()["summary"]["channel_average_bits"] == 3.2


def test_summary_in_chinese_has_the_guide_shape():
    text = CompressionStats([layer("layers.0.mlp.up_proj", 4, 10, {2: 1, 8: 3})]).format_summary("zh")
    assert "总通道数: 4" in text and "比特分布:" in text
    assert "  2-bit:       1 通道 (25.00%)" in text
    assert "平均比特数: 6.500" in text
