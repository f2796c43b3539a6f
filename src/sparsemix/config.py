"""Configuration as frozen dataclasses, validated once when built.

Every check raises ``ConfigError`` with one line that names the bad value and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

UNQUANTIZED_BITS = 16  # a row given 16 bits keeps its (pruned) float weights
VALID_BITS = frozenset(range(1, 9)) | {UNQUANTIZED_BITS}
DEFAULT_BIT_OPTIONS = (2, 3, 4, 6, 8)
BIT_METHODS = ("uniform", "threshold3", "quantile", "budget", "optimal")
ALLOCATION_SCOPES = ("layer", "model")
BUDGET_UNITS = ("channel", "parameter", "effective")
FORWARD_PRECISIONS = ("fp32", "tf32", "bf16")
IMPORTANCE_DIMENSIONS = ("activation", "hessian", "weight", "output", "stability")


class ConfigError(ValueError):
    """A user-facing configuration mistake; its message is one line: what is wrong and how to fix it."""


def parse_bit_options(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """'2,3,4,6,8' -> (2, 3, 4, 6, 8); the tuple is validated by ``AllocationConfig``."""
    if isinstance(text, (tuple, list)):
        return tuple(int(b) for b in text)
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"bit options {text!r} are not integers; write them like 2,3,4,6,8") from None


@dataclass(frozen=True)
class ImportanceWeights:
    """Non-negative weights of the five per-channel importance dimensions (renormalised to sum 1)."""

    activation: float = 0.25
    hessian: float = 0.25
    weight: float = 0.15
    output: float = 0.25
    stability: float = 0.10

    def __post_init__(self):
        values = self.as_dict()
        for name, value in values.items():
            if not value >= 0:  # also rejects NaN
                raise ConfigError(f"importance weight {name}={value} is negative; use a value >= 0")
        if sum(values.values()) <= 0:
            raise ConfigError("importance weights are all zero; give at least one dimension a positive weight")

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}

    def normalized(self) -> dict[str, float]:
        total = sum(self.as_dict().values())
        return {name: value / total for name, value in self.as_dict().items()}

    @classmethod
    def parse(cls, text: str) -> ImportanceWeights:
        """'activation=0.3,hessian=0.2' -> weights; dimensions not named get weight 0."""
        given: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep:
                raise ConfigError(f"importance weight {item!r} has no value; write it as {name}=0.25")
            if name not in IMPORTANCE_DIMENSIONS:
                raise ConfigError(
                    f"unknown importance dimension {name!r}; choose from {', '.join(IMPORTANCE_DIMENSIONS)}"
                )
            try:
                given[name] = float(value)
            except ValueError:
                raise ConfigError(f"importance weight {item!r} is not a number; write it as {name}=0.25") from None
        return cls(**{name: given.get(name, 0.0) for name in IMPORTANCE_DIMENSIONS})


@dataclass(frozen=True)
class PruneConfig:
    """SparseGPT pruning: unstructured ``sparsity`` or an N:M pattern (prunen zeros in every prunem)."""

    sparsity: float = 0.5
    prunen: int = 0
    prunem: int = 0
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity {self.sparsity} is outside [0, 1); use e.g. --sparsity 0.5")
        if (self.prunen > 0) != (self.prunem > 0):
            raise ConfigError("N:M pruning needs both --prunen and --prunem, e.g. --prunen 2 --prunem 4")
        if self.prunen and not 0 < self.prunen < self.prunem:
            raise ConfigError(f"N:M needs 0 < N < M, got {self.prunen}:{self.prunem}; e.g. --prunen 2 --prunem 4")
        if self.blocksize < 1:
            raise ConfigError(f"blocksize {self.blocksize} must be >= 1; the usual value is 128")
        if self.prunem and self.blocksize % self.prunem:
            raise ConfigError(f"blocksize {self.blocksize} must be a multiple of M={self.prunem}")
        if not self.percdamp > 0:
            raise ConfigError(f"percdamp {self.percdamp} must be > 0; the usual value is 0.01")

    @property
    def nm(self) -> bool:
        return self.prunen > 0

    @property
    def target_sparsity(self) -> float:
        """Fraction of weights set to zero (N:M gives N/M)."""
        return self.prunen / self.prunem if self.nm else self.sparsity


@dataclass(frozen=True)
class QuantConfig:
    """Grid of each output channel: asymmetric min-max by default, per row or per group of columns."""

    sym: bool = False
    mse: bool = False  # search a clipping ratio per row that minimises |w - q|^2.4 (GPTQ's option)
    group_size: int = 0  # 0: one scale/zero per row; g: one per g columns, fixed at each group's start

    def __post_init__(self):
        if self.group_size < 0:
            raise ConfigError(f"group size {self.group_size} is negative; use 0 (per row) or e.g. 128")


@dataclass(frozen=True)
class AllocationConfig:
    """How importance turns into a bit width per output channel.

    ``target_avg_bits`` is in channel-average bits (codes only) for quantile and budget.
    """

    method: str = "quantile"
    target_avg_bits: float | None = None
    wbits: int = 4  # the width of `uniform`
    bit_options: tuple[int, ...] = DEFAULT_BIT_OPTIONS
    weights: ImportanceWeights = field(default_factory=ImportanceWeights)
    threshold_high: float = 1.2  # threshold3: contribution above -> highest tier
    threshold_low: float = 0.5  # threshold3: contribution below -> lowest tier
    threshold_bits: tuple[int, int, int] = (2, 4, 8)
    scope: str = "layer"  # optimal: one budget per linear, or one for the whole model
    budget_unit: str = "channel"  # optimal: what target_avg_bits counts (see stats.py for the three figures)
    fisher: bool = True  # optimal: weight row losses by the output channel's Fisher information

    def __post_init__(self):
        if self.method not in BIT_METHODS:
            raise ConfigError(f"unknown bit method {self.method!r}; choose from {', '.join(BIT_METHODS)}")
        validate_bit_options(self.bit_options)
        if self.wbits not in VALID_BITS:
            raise ConfigError(f"--wbits {self.wbits} is not in 1..8 or 16")
        if self.method == "threshold3":
            validate_bit_options(self.threshold_bits)
            if len(self.threshold_bits) != 3:
                raise ConfigError(f"threshold3 needs three bit widths (low, mid, high), got {self.threshold_bits}")
            if not 0 <= self.threshold_low < self.threshold_high:
                raise ConfigError(
                    f"threshold3 needs 0 <= low < high, got low={self.threshold_low} high={self.threshold_high}"
                )
        if self.method in ("budget", "optimal") and self.target_avg_bits is None:
            raise ConfigError(f"bit method {self.method!r} needs a target; add --target-avg-bits, e.g. 4.0")
        if self.scope not in ALLOCATION_SCOPES:
            raise ConfigError(f"unknown allocation scope {self.scope!r}; choose from {', '.join(ALLOCATION_SCOPES)}")
        if self.budget_unit not in BUDGET_UNITS:
            raise ConfigError(f"unknown budget unit {self.budget_unit!r}; choose from {', '.join(BUDGET_UNITS)}")
        if self.target_avg_bits is not None and self.budget_unit != "effective":
            lo, hi = min(self.bit_options), max(self.bit_options)
            if not lo <= self.target_avg_bits <= hi:
                raise ConfigError(
                    f"target {self.target_avg_bits} bits is outside the bit options' range [{lo}, {hi}];"
                    f" choose a target in it or change --bit-options"
                )


def validate_bit_options(options: tuple[int, ...]) -> None:
    if not options:
        raise ConfigError("bit options are empty; give a sorted list such as 2,3,4,6,8")
    bad = [b for b in options if b not in VALID_BITS]
    if bad:
        raise ConfigError(f"bit options {list(options)} contain {bad}; each must be in 1..8 or 16")
    if len(set(options)) != len(options):
        raise ConfigError(f"bit options {list(options)} contain duplicates; list each width once")
    if list(options) != sorted(options):
        raise ConfigError(f"bit options {list(options)} are not sorted; write them ascending, e.g. 2,3,4,6,8")


@dataclass(frozen=True)
class CompressionConfig:
    """Everything the engine needs for one linear, and the driver for every linear."""

    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    # the fast path, same result: stacked sweeps of linears sharing an input, one launch per block's
    # column loop on a GPU, statistics passes stopped after their linears, settled submodules replayed
    # (False: the straightforward path, for checks)
    fused: bool = True
    forward_precision: str = "fp32"  # calibration forward passes on the GPU: fp32, tf32 or bf16 (autocast)
    true_sequential: bool = True  # statistics of each group after the groups before it are compressed

    def __post_init__(self):
        if self.forward_precision not in FORWARD_PRECISIONS:
            raise ConfigError(f"unknown forward precision {self.forward_precision!r};"
                              f" choose from {', '.join(FORWARD_PRECISIONS)}")

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)
