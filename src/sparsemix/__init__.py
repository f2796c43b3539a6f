"""sparsemix: SparseGPT pruning + per-channel mixed-precision quantization in one OBS sweep."""
from .config import (
    AllocationConfig,
    CompressionConfig,
    ConfigError,
    ImportanceWeights,
    PruneConfig,
    QuantConfig,
)
from .engine import LinearResult, compress_linear
from .stats import CompressionStats, LayerStats

__version__ = "0.1.0"

__all__ = [
    "AllocationConfig",
    "CompressionConfig",
    "CompressionStats",
    "ConfigError",
    "ImportanceWeights",
    "LayerStats",
    "LinearResult",
    "PruneConfig",
    "QuantConfig",
    "__version__",
    "compress_linear",
]
