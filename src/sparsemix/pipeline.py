"""The whole job as a Python API: load, calibrate, compress, evaluate, save, and its JSON record."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .config import CompressionConfig, ConfigError
from .data import CORPORA, calibration_windows, eval_windows
from .driver import CompressionResult, compress_model, warm_up_device
from .evaluation import perplexity
from .files import write_directory, write_json
from .models import DEFAULT_MODEL, load_model, max_sequence_length

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SIDECAR = "sparsemix.json"
Echo = Callable[[str], None] | None
BITS_FILE = "sparsemix_bits.safetensors"
GRIDS_FILE = "sparsemix_grids.safetensors"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """One compression run: model, calibration, compression settings, evaluation."""

    model: str = DEFAULT_MODEL
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int | None = None  # None: 2048, or the model's maximum if smaller
    seed: int = 0
    eval: tuple[str, ...] = CORPORA
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 8
    data_dir: str | None = None
    checkpoint_dir: str | None = None  # save after every decoder layer; rerun to resume

    def __post_init__(self):
        if self.calib not in CORPORA:
            raise ConfigError(f"unknown calibration corpus {self.calib!r}; choose from {', '.join(CORPORA)}")
        unknown = [c for c in self.eval if c not in CORPORA]
        if unknown:
            raise ConfigError(f"unknown evaluation corpus {unknown[0]!r}; choose from {', '.join(CORPORA)}")
        if self.nsamples < 1:
            raise ConfigError(f"--nsamples {self.nsamples} must be at least 1")
        if self.seqlen is not None and self.seqlen < 2:
            raise ConfigError(f"--seqlen {self.seqlen} must be at least 2")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size} must be at least 1")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.device != "auto" and torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} asked for but no CUDA GPU is visible; use --device cpu")

    @property
    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def environment(device: str) -> dict:
    import transformers

    info = {
        "sparsemix": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "device": device,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


DEFAULT_SEQLEN = 2048


def with_model_seqlen(run: RunConfig, model) -> RunConfig:
    """``run`` with its window length fixed for ``model``: an explicit one must fit the model."""
    limit = max_sequence_length(model)
    if run.seqlen is None:
        return dataclasses.replace(run, seqlen=min(DEFAULT_SEQLEN, limit))
    if run.seqlen > limit:
        raise ConfigError(f"--seqlen {run.seqlen} exceeds the model's maximum of {limit}; use --seqlen {limit} or less")
    return run


def fits_on_device(model, device: str, headroom: float = 0.6) -> bool:
    """Whether the whole model fits in the device's free memory with room for activations."""
    if torch.device(device).type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return size < headroom * free


@dataclass
class Prepared:
    """A loaded model with its tokenised calibration and evaluation windows, shared by every config."""

    run: RunConfig  # seqlen resolved for the model
    model: torch.nn.Module
    tokenizer: object
    calibration: torch.Tensor | None  # [nsamples, seqlen]
    evaluation: dict[str, torch.Tensor]  # corpus -> [windows, seqlen]
    timings: dict[str, float]
    warm_up: DeviceWarmUp | None = None  # the GPU stack starting while the model loaded

    def device_ready(self) -> None:
        """Wait for the warm-up (if any); its seconds and the wait go into ``timings``."""
        if self.warm_up is not None:
            self.timings.update(self.warm_up.join())
            self.warm_up = None


class DeviceWarmUp:
    """``driver.warm_up_device`` in a background thread: the CUDA and Triton start-up overlaps
    model loading instead of landing in the first compression."""

    def __init__(self, config: CompressionConfig, device: str):
        self.seconds: float | None = None
        self.thread = threading.Thread(target=self._run, args=(config, device), name="sparsemix-warm-up", daemon=True)
        self.thread.start()

    def _run(self, config: CompressionConfig, device: str) -> None:
        try:
            self.seconds = warm_up_device(config, device)
        except Exception as error:  # only a head start: the compression itself reports real faults
            log.warning("device warm-up failed (%s); the first compression will start the GPU itself", error)

    def join(self) -> dict[str, float]:
        """-> {device_warmup_seconds: its own time, device_warmup_wait_seconds: how long this waited}."""
        start = time.perf_counter()
        self.thread.join()
        return {"device_warmup_seconds": self.seconds, "device_warmup_wait_seconds": time.perf_counter() - start}


def prepare(run: RunConfig, calibrate: bool = True) -> Prepared:
    """Load the model and tokenise the calibration and evaluation windows once; for a compression
    on a GPU the device warms up meanwhile (``DeviceWarmUp``)."""
    warm_up = None
    if calibrate and run.compression is not None and torch.device(run.resolved_device).type == "cuda":
        warm_up = DeviceWarmUp(run.compression, run.resolved_device)
    try:
        t = time.perf_counter()
        model, tokenizer = load_model(run.model, DTYPES[run.dtype])
        timings = {"load_seconds": time.perf_counter() - t}
        run = with_model_seqlen(run, model)
        t = time.perf_counter()
        calibration = None
        if calibrate:
            calibration = calibration_windows(run.calib, tokenizer, run.nsamples, run.seqlen, run.seed, run.data_dir)
        evaluation = {corpus: eval_windows(corpus, tokenizer, run.seqlen, run.data_dir) for corpus in run.eval}
        timings["data_seconds"] = time.perf_counter() - t
    except BaseException:
        if warm_up is not None:  # a CUDA call cut off at interpreter exit can abort noisily: let it finish
            warm_up.join()
        raise
    return Prepared(run, model, tokenizer, calibration, evaluation, timings, warm_up)


def evaluate(model, prepared: Prepared, progress: bool = False, echo: Echo = None) -> dict[str, dict]:
    """Perplexity on each prepared corpus -> {corpus: {perplexity, tokens, windows, seconds, tokens_per_second}}."""
    run = prepared.run
    device = run.resolved_device
    results = {}
    for corpus, windows in prepared.evaluation.items():
        ppl = perplexity(model, windows, run.batch_size, device, layerwise=not fits_on_device(model, device),
                         progress=progress, desc=corpus)
        results[corpus] = {"perplexity": ppl.value, "tokens": ppl.tokens, "windows": ppl.windows,
                           "seconds": ppl.seconds, "tokens_per_second": ppl.tokens_per_second}
        if echo:
            echo(f"Perplexity on {corpus}: {ppl.value:.3f}")
    return results


def compress_and_evaluate(
    model, prepared: Prepared, compression: CompressionConfig | None, progress: bool = False, echo: Echo = None,
    lang: str = "en",
) -> tuple[dict, CompressionResult | None]:
    """Compress ``model`` in place with ``compression`` (None: leave it dense), evaluate -> (record, result)."""
    run = dataclasses.replace(prepared.run, compression=compression) if compression else prepared.run
    if compression is not None:
        prepared.device_ready()
    timings = dict(prepared.timings)
    result = None
    if compression is not None:
        bar = tqdm(total=None, desc="compress", unit="layer", disable=not progress, leave=False)

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = compress_model(model, prepared.calibration, compression, run.resolved_device, run.batch_size,
                                progress=advance, checkpoint_dir=run.checkpoint_dir,
                                keep_on_device=fits_on_device(model, run.resolved_device))
        bar.close()
        timings["compress_seconds"] = result.seconds
        timings["compress_phases"] = result.phases
        if torch.device(run.resolved_device).type == "cuda":
            timings["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        if echo:
            echo(result.stats.format_summary(lang))
    t = time.perf_counter()
    evaluation = evaluate(model, prepared, progress, echo)
    timings["eval_seconds"] = time.perf_counter() - t
    return make_record(run, result, evaluation, timings, dense=compression is None), result


def compress(run: RunConfig, progress: bool = False, echo: Echo = None, lang: str = "en"):
    """Load ``run.model``, compress it, evaluate it -> (model, tokenizer, record dict, CompressionResult).

    ``progress`` shows bars (layer i/n with ETA); ``echo`` receives the summary and perplexity lines.
    """
    prepared = prepare(run)
    record, result = compress_and_evaluate(prepared.model, prepared, run.compression, progress, echo, lang)
    return prepared.model, prepared.tokenizer, record, result


def evaluate_saved(run: RunConfig, progress: bool = False, echo: Echo = None) -> dict:
    """Evaluate ``run.model`` (any model, or a --save directory, whose sidecar statistics are kept)."""
    prepared = prepare(run, calibrate=False)
    record, _ = compress_and_evaluate(prepared.model, prepared, None, progress, echo)
    sidecar = Path(run.model) / SIDECAR
    if sidecar.is_file():
        saved = json.loads(sidecar.read_text())
        record["compressed"] = {key: saved[key] for key in ("config", "summary", "layers", "perplexity") if key in saved}
    return record


def make_record(
    run: RunConfig, result: CompressionResult | None, evaluation: dict, timings: dict, dense: bool = False,
) -> dict:
    """The JSON a script reads: config, statistics, perplexities, timings, versions, device.

    ``config.compression`` is null for a dense (uncompressed) evaluation.
    """
    config = dataclasses.asdict(run)
    if dense:
        config["compression"] = None
    record = {
        "model": run.model,
        "config": config,
        "environment": environment(run.resolved_device),
        "perplexity": {corpus: item["perplexity"] for corpus, item in evaluation.items()},
        "evaluation": evaluation,
        "timings": timings,
    }
    if result is not None:
        record.update(result.stats.to_dict())
    return record


def save_compressed(model, tokenizer, directory: str | os.PathLike, record: dict, bits: dict,
                    grids: dict | None = None) -> None:
    """A checkpoint ``AutoModelForCausalLM.from_pretrained(directory)`` loads, plus the sidecars:
    ``sparsemix.json`` (the run record), ``sparsemix_bits.safetensors`` (bit width per row) and
    ``sparsemix_grids.safetensors`` (fp16 grids and kept-masks: what ``export`` packs from).

    Written into a temporary folder beside ``directory`` and renamed into place, so an interrupted
    save leaves the previous folder (or none), never half of one.
    """
    from safetensors.torch import save_file

    def fill(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        save_file({name: b.contiguous() for name, b in bits.items()}, str(staging / BITS_FILE))
        if grids:
            save_file({name: g.contiguous() for name, g in grids.items()}, str(staging / GRIDS_FILE))
        write_json(staging / SIDECAR, record)

    write_directory(directory, fill)
