"""What compression did, per linear and for the model, with figures that cannot be confused.

- channel-average bits: mean code width over output channels (rows), every row counts once.
- parameter-weighted bits: code width averaged over weights (a row counts by its length).
- effective bits per weight: everything stored divided by the dense weight count: codes of
  the kept weights, fp16 scale and zero per row (or per group) of each quantized row, and the
  sparsity metadata (1 bit per weight for an unstructured bitmask; for N:M, ceil(log2 M) bits
  of index per kept weight). Unquantized (16-bit) rows store fp16 values.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .config import UNQUANTIZED_BITS, PruneConfig

SCALE_ZERO_BITS = 32  # one fp16 scale + one fp16 zero point per row or group


def index_bits(rows: int) -> int:
    """Bits per stored row index: ceil(log2 rows), at least 1."""
    return max(1, math.ceil(math.log2(rows))) if rows > 1 else 1


def row_order_bits(bits: torch.Tensor) -> int:
    """Bits storing the row permutation that groups rows by width: ``index_bits`` per row, none
    when every row has the same width (the packed format then keeps the natural order)."""
    rows = bits.numel()
    return 0 if rows < 2 or torch.unique(bits).numel() < 2 else rows * index_bits(rows)


def effective_bits(
    bits: torch.Tensor, kept_per_row: torch.Tensor, cols: int, groups: int, prune: PruneConfig,
) -> float:
    """Stored bits per dense weight for rows of ``bits`` [rows] keeping ``kept_per_row`` [rows]:
    codes, fp16 scales and zero points, the row permutation and the sparsity metadata."""
    bits = bits.to(torch.float64).cpu()
    kept = kept_per_row.to(torch.float64).cpu()
    rows = bits.numel()
    codes = float((bits * kept).sum())
    grids = float((bits < UNQUANTIZED_BITS).sum()) * groups * SCALE_ZERO_BITS
    grids += row_order_bits(bits)
    if prune.nm:
        kept_per_block = prune.prunem - prune.prunen
        metadata = rows * cols * kept_per_block * math.ceil(math.log2(prune.prunem)) / prune.prunem
    elif prune.sparsity > 0:
        metadata = rows * cols  # bitmask
    else:
        metadata = 0.0
    return (codes + grids + metadata) / (rows * cols)


@dataclass
class LayerStats:
    """One compressed linear. Bits are code widths; ``effective_bits_per_weight`` includes all overhead."""

    name: str
    rows: int
    cols: int
    bit_counts: dict[int, int]  # bit width -> number of rows
    channel_average_bits: float
    effective_bits_per_weight: float
    importance_min: float
    importance_max: float
    sparsity: float  # fraction of weights pruned
    obs_loss: float  # OBS loss estimate, sum over rows
    seconds: float

    @property
    def parameters(self) -> int:
        return self.rows * self.cols


@dataclass
class CompressionStats:
    """All compressed linears of a model, in order."""

    layers: list[LayerStats] = field(default_factory=list)

    def add(self, layer: LayerStats) -> None:
        self.layers.append(layer)

    @property
    def total_channels(self) -> int:
        return sum(layer.rows for layer in self.layers)

    @property
    def channels_per_bit(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for layer in self.layers:
            for b, c in layer.bit_counts.items():
                counts[int(b)] = counts.get(int(b), 0) + c
        return dict(sorted(counts.items()))

    @property
    def channel_average_bits(self) -> float:
        return sum(b * c for b, c in self.channels_per_bit.items()) / max(self.total_channels, 1)

    @property
    def parameter_weighted_bits(self) -> float:
        weighted = sum(int(b) * c * layer.cols for layer in self.layers for b, c in layer.bit_counts.items())
        return weighted / max(sum(layer.parameters for layer in self.layers), 1)

    @property
    def effective_bits_per_weight(self) -> float:
        stored = sum(layer.effective_bits_per_weight * layer.parameters for layer in self.layers)
        return stored / max(sum(layer.parameters for layer in self.layers), 1)

    @property
    def compressed_megabytes(self) -> float:
        """Size of the compressed linears in MB (10^6 bytes), effective bits included."""
        return sum(layer.effective_bits_per_weight * layer.parameters for layer in self.layers) / 8e6

    @property
    def sparsity(self) -> float:
        pruned = sum(layer.sparsity * layer.parameters for layer in self.layers)
        return pruned / max(sum(layer.parameters for layer in self.layers), 1)

    def summary(self) -> dict:
        total = max(self.total_channels, 1)
        return {
            "total_channels": self.total_channels,
            "channels_per_bit": {str(b): c for b, c in self.channels_per_bit.items()},
            "channel_percent_per_bit": {str(b): 100 * c / total for b, c in self.channels_per_bit.items()},
            "channel_average_bits": self.channel_average_bits,
            "parameter_weighted_bits": self.parameter_weighted_bits,
            "effective_bits_per_weight": self.effective_bits_per_weight,
            "compressed_megabytes": self.compressed_megabytes,
            "sparsity": self.sparsity,
            "obs_loss": sum(layer.obs_loss for layer in self.layers),
            "seconds": sum(layer.seconds for layer in self.layers),
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> CompressionStats:
        layers = []
        for item in data["layers"]:
            item = dict(item, bit_counts={int(b): c for b, c in item["bit_counts"].items()})
            layers.append(LayerStats(**item))
        return cls(layers)

    def format_summary(self, lang: str = "en") -> str:
        """The printed summary, in the shape users of the original tool already read (en or zh)."""
        t = SUMMARY_LABELS[lang]
        lines = [t["title"], f"{t['channels']}: {self.total_channels}", f"{t['distribution']}:"]
        total = max(self.total_channels, 1)
        for b, c in self.channels_per_bit.items():
            lines.append(f"  {b}-bit: {c:>7} {t['unit']} ({100 * c / total:.2f}%)")
        lines += [
            f"{t['average']}: {self.channel_average_bits:.3f} ({t['channel_average']})",
            f"{t['weighted']}: {self.parameter_weighted_bits:.3f}",
            f"{t['effective']}: {self.effective_bits_per_weight:.3f} ({t['effective_note']})",
            f"{t['sparsity']}: {100 * self.sparsity:.2f}%",
            f"{t['per_layer']}:",
        ]
        for layer in self.layers:
            lines.append(
                f"  {layer.name}: avg={layer.channel_average_bits:.2f} bits,"
                f" importance_range=({layer.importance_min:.3f}, {layer.importance_max:.3f}),"
                f" sparsity={100 * layer.sparsity:.1f}%, loss={layer.obs_loss:.4g}"
            )
        return "\n".join(lines)


SUMMARY_LABELS = {
    "en": {"title": "Quantization statistics summary", "channels": "Total channels", "distribution": "Bit distribution",
           "unit": "channels", "average": "Average bits", "channel_average": "channel average",
           "weighted": "Parameter-weighted bits", "effective": "Effective bits per weight",
           "effective_note": "codes + fp16 scales/zeros + sparsity metadata", "sparsity": "Sparsity",
           "per_layer": "Per layer"},
    "zh": {"title": "量化统计摘要", "channels": "总通道数", "distribution": "比特分布", "unit": "通道",
           "average": "平均比特数", "channel_average": "按通道平均", "weighted": "按参数加权平均比特",
           "effective": "每权重有效比特", "effective_note": "编码 + fp16 缩放/零点 + 稀疏元数据",
           "sparsity": "稀疏度", "per_layer": "每层统计"},
}
