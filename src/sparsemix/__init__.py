"""sparsemix: SparseGPT pruning + per-channel mixed-precision quantization in one OBS sweep."""
from .config import (
    AllocationConfig, CompressionConfig, ConfigError, ImportanceWeights, PruneConfig, QuantConfig,
)
from .engine import LinearResult, compress_linear
from .stats import CompressionStats, LayerStats

__version__ = "0.1.0"

__all__ = [
    "AllocationConfig", "CompressionConfig", "ConfigError", "ImportanceWeights", "PruneConfig",
    "QuantConfig", "LinearResult", "compress_linear", "CompressionStats", "LayerStats", "__version__",
]
