"""Many configurations under identical conditions: one model load, one calibration set, one
tokenisation of each evaluation corpus. Each finished configuration is cached as its own JSON
(keyed by a hash of model, data, run settings, configuration and package version), so an
interrupted experiment resumes where it stopped.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .config import (
    IMPORTANCE_DIMENSIONS,
    AllocationConfig,
    CompressionConfig,
    ConfigError,
    ImportanceWeights,
    PruneConfig,
    QuantConfig,
    parse_bit_options,
)
from .data import resolve_data_dir
from .files import write_json
from .pipeline import Echo, Prepared, RunConfig, compress_and_evaluate, prepare


@dataclass(frozen=True)
class NamedConfig:
    name: str
    compression: CompressionConfig | None  # None: the dense model


def _compression(sparsity=0.5, method="uniform", target=None, wbits=16, **allocation) -> CompressionConfig:
    return CompressionConfig(PruneConfig(sparsity=sparsity),
                             allocation=AllocationConfig(method=method, target_avg_bits=target, wbits=wbits,
                                                         **allocation))


MODEL_SCOPE = {"scope": "model", "budget_unit": "parameter"}


def guide_preset() -> list[NamedConfig]:
    """The evaluation guide's comparison set, all at 50% unstructured sparsity."""
    return [
        NamedConfig("dense", None),
        NamedConfig("sparsegpt-50%", _compression()),
        NamedConfig("uniform-4bit", _compression(wbits=4)),
        NamedConfig("threshold3", _compression(method="threshold3")),
        NamedConfig("quantile-4.0", _compression(method="quantile", target=4.0)),
        NamedConfig("quantile-3.5", _compression(method="quantile", target=3.5)),
        NamedConfig("budget-4.0", _compression(method="budget", target=4.0)),
        NamedConfig("budget-3.5", _compression(method="budget", target=3.5)),
        NamedConfig("budget-4.5", _compression(method="budget", target=4.5)),
        # sparsemix's own allocator (not in the guide): measured row losses x Fisher, one model-wide budget
        NamedConfig("optimal-4.0", _compression(method="optimal", target=4.0, **MODEL_SCOPE)),
        NamedConfig("optimal-3.5", _compression(method="optimal", target=3.5, **MODEL_SCOPE)),
    ]


CONFIG_KEYS = {"name", "dense", "sparsity", "prunen", "prunem", "blocksize", "percdamp", "bit_method",
               "target_avg_bits", "wbits", "bit_options", "importance_weights", "group_size", "sym", "mse",
               "allocation_scope", "budget_unit", "fisher"}


def config_from_mapping(item: dict) -> NamedConfig:
    """{'name': 'q4', 'bit_method': 'quantile', 'target_avg_bits': 4.0, ...} -> NamedConfig.

    Keys are the CLI's option names with underscores; ``dense: true`` means no compression.
    """
    item = {key.replace("-", "_"): value for key, value in item.items()}
    unknown = sorted(set(item) - CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"config {item.get('name', '?')!r}: unknown key {unknown[0]!r}; use {', '.join(sorted(CONFIG_KEYS))}")
    if "name" not in item:
        raise ConfigError(f"config {item} has no 'name'; give every config a name")
    if item.get("dense"):
        return NamedConfig(str(item["name"]), None)
    weights = item.get("importance_weights")
    if isinstance(weights, str):
        weights = ImportanceWeights.parse(weights)
    elif isinstance(weights, dict):
        weights = ImportanceWeights(**{d: float(weights.get(d, 0)) for d in IMPORTANCE_DIMENSIONS})
    prunen = int(item.get("prunen", 0))
    compression = CompressionConfig(
        PruneConfig(sparsity=float(item.get("sparsity", 0.0 if prunen else 0.5)), prunen=prunen,
                    prunem=int(item.get("prunem", 0)), blocksize=int(item.get("blocksize", 128)),
                    percdamp=float(item.get("percdamp", 0.01))),
        QuantConfig(sym=bool(item.get("sym", False)), mse=bool(item.get("mse", False)),
                    group_size=int(item.get("group_size", 0))),
        AllocationConfig(method=item.get("bit_method", "quantile"), target_avg_bits=item.get("target_avg_bits"),
                         wbits=int(item.get("wbits", 4)),
                         bit_options=parse_bit_options(item.get("bit_options", "2,3,4,6,8")),
                         weights=weights or ImportanceWeights(), scope=item.get("allocation_scope", "layer"),
                         budget_unit=item.get("budget_unit", "channel"), fisher=bool(item.get("fisher", True))),
    )
    return NamedConfig(str(item["name"]), compression)


def load_configs(path: str | Path) -> list[NamedConfig]:
    """A YAML or JSON list of named configs (see ``config_from_mapping``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--configs {path}: no such file; give a YAML or JSON list of named configs")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        items = yaml.safe_load(text)
    else:
        items = json.loads(text)
    if not isinstance(items, list) or not items:
        raise ConfigError(f"--configs {path}: expected a non-empty list of configs")
    configs = [config_from_mapping(item) for item in items]
    _check_unique(configs)
    return configs


def _check_unique(configs: list[NamedConfig]) -> None:
    names = [c.name for c in configs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"config name {duplicate!r} is used twice; give each config its own name")


def sweep_configs(
    targets: Iterable[float], methods: Iterable[str], prune: PruneConfig, **optimal,
) -> list[NamedConfig]:
    """One config per (method, target); ``uniform`` takes the integer targets as its width;
    ``optimal`` configs get the ``optimal`` fields (scope, budget_unit, fisher)."""
    configs = []
    for method in methods:
        for target in targets:
            if method == "uniform":
                if float(target).is_integer():
                    allocation = AllocationConfig(method="uniform", wbits=int(target))
                    configs.append(NamedConfig(f"uniform-{int(target)}bit", CompressionConfig(prune, allocation=allocation)))
                continue
            extra = optimal if method == "optimal" else {}
            allocation = AllocationConfig(method=method, target_avg_bits=float(target), **extra)
            configs.append(NamedConfig(f"{method}-{target:g}", CompressionConfig(prune, allocation=allocation)))
    if not configs:
        raise ConfigError("the sweep is empty; uniform needs integer targets, e.g. --targets 3,4")
    return configs


def ablation_configs(
    method: str, target: float | None, prune: PruneConfig, extra: dict[str, ImportanceWeights] | None = None,
) -> list[NamedConfig]:
    """Importance weights: each dimension alone, activation + hessian, the default mix, and ``extra``."""
    mixes = {f"only-{d}": ImportanceWeights(**{k: float(k == d) for k in IMPORTANCE_DIMENSIONS})
             for d in IMPORTANCE_DIMENSIONS}
    mixes["activation+hessian"] = ImportanceWeights(activation=1, hessian=1, weight=0, output=0, stability=0)
    mixes["default"] = ImportanceWeights()
    mixes.update(extra or {})
    return [NamedConfig(name, CompressionConfig(prune, allocation=AllocationConfig(
        method=method, target_avg_bits=target, weights=weights))) for name, weights in mixes.items()]


def data_fingerprint(run: RunConfig) -> dict:
    """What identifies the corpora: the local files' sizes and modification times, or 'online'."""
    directory = resolve_data_dir(run.data_dir)
    if directory is None:
        return {"source": "online"}
    files = sorted(p for p in directory.iterdir() if p.is_file())
    return {"source": str(directory.resolve()), "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


def cache_key(run: RunConfig, named: NamedConfig) -> str:
    settings = dataclasses.asdict(dataclasses.replace(run, compression=CompressionConfig()))
    for volatile in ("compression", "device", "batch_size", "data_dir", "checkpoint_dir"):
        settings.pop(volatile)
    payload = {
        "version": __version__, "run": settings, "data": data_fingerprint(run),
        "compression": dataclasses.asdict(named.compression) if named.compression else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "config"


def run_experiment(
    run: RunConfig, configs: list[NamedConfig], out_dir: str | Path, force: bool = False,
    progress: bool = False, echo: Echo = None,
) -> list[dict]:
    """Run (or take from the cache in ``out_dir/runs``) every config -> their records, in order.

    The model is loaded only if some config is not cached; each compressed config works on a
    copy of the dense model. Every record is written as soon as it is done.
    """
    _check_unique(configs)
    runs_dir = Path(out_dir) / "runs"
    records: dict[str, dict] = {}
    todo = []
    for named in configs:
        key = cache_key(run, named)
        path = runs_dir / f"{slug(named.name)}.json"
        cached = json.loads(path.read_text()) if path.is_file() and not force else None
        if cached and cached.get("cache_key") == key:
            records[named.name] = cached
            if echo:
                echo(f"[cached] {named.name}")
        else:
            todo.append((named, key, path))

    prepared: Prepared | None = prepare(run) if todo else None
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc="configs", unit="config",
               disable=not progress)
    for named, key, path in todo:
        bar.set_postfix_str(named.name)
        model = copy.deepcopy(prepared.model)  # the dense original stays untouched on the CPU
        record, _ = compress_and_evaluate(model, prepared, named.compression, progress)
        record.update(name=named.name, cache_key=key)
        write_json(path, record)
        records[named.name] = record
        if echo:
            ppl = ", ".join(f"{c} {v:.3f}" for c, v in record["perplexity"].items())
            echo(f"[done] {named.name}: {ppl}")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        bar.update(1)
    bar.close()
    return [records[named.name] for named in configs]
