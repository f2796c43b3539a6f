"""Packed models on disk and in memory: ``export_packed`` writes one, ``load_packed`` runs one.

An export folder holds ``model.packed.safetensors`` (every compressed linear in the format of
``packing.py``, everything else as saved), the config, tokenizer files and ``sparsemix.json``.
The file's metadata key ``sparsemix`` is JSON: {"format", "version", "linears": {module: header}}.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .files import write_directory
from .models import ADAPTERS, adapter_for
from .packing import FORMAT, VERSION, PackedWeight, dequantise, pack_linear, unpack_mask
from .pipeline import GRIDS_FILE, SIDECAR

PACKED_FILE = "model.packed.safetensors"
KERNEL_MAX_TOKENS = 16  # decode batches; longer inputs (prefill) dequantise and use F.linear


class ExportError(ConfigError):
    """A result folder that cannot be packed exactly; one line (the CLI exits 2): what and why."""


def _checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(directory.glob("model*.safetensors")):
        if path.name != PACKED_FILE:
            state.update(load_file(str(path)))
    return state


def export_packed(result_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> dict:
    """Pack the ``--save`` folder ``result_dir`` into ``out`` (default RESULT_DIR/packed) -> JSON-able
    sizes: file bytes, packed-linear bytes, the bytes the reported effective bits imply, their ratio.
    Every linear is checked to dequantise bit for bit to the saved weight before anything is written."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    source = Path(result_dir)
    out = Path(out) if out else source / "packed"
    if not (source / SIDECAR).is_file():
        raise ConfigError(f"{source} is not a sparsemix --save folder (no {SIDECAR}); compress with --save first")
    if not (source / GRIDS_FILE).is_file():
        raise ConfigError(f"{source} has no {GRIDS_FILE} (saved by an older sparsemix); recompress it with"
                          " --save using this version to export it")
    from safetensors.torch import load_file

    record = json.loads((source / SIDECAR).read_text())
    compression = record["config"]["compression"]
    group_size = compression["quant"]["group_size"]
    prune = compression["prune"]
    sparse = prune["sparsity"] > 0 or prune["prunen"] > 0
    grids = load_file(str(source / GRIDS_FILE))
    state = _checkpoint(source)
    prefix = ADAPTERS[AutoConfig.from_pretrained(source).model_type].layers_path.rsplit(".", 1)[0]
    tensors, headers, linear_bytes = {}, {}, 0
    for name in [key.removesuffix(".bits") for key in grids if key.endswith(".bits")]:
        module = f"{prefix}.{name}"
        weight = state.pop(f"{module}.weight")
        cols = weight.shape[1]
        packed = pack_linear(weight, grids[f"{name}.bits"], grids[f"{name}.scale"], grids[f"{name}.zero"],
                             unpack_mask(grids[f"{name}.kept"], cols),
                             group_size if 0 < group_size < cols else cols, sparse)
        if not torch.equal(dequantise(packed), weight):
            raise ExportError(f"{module} does not dequantise bit for bit to the saved weight; the grids in"
                              f" {GRIDS_FILE} do not match the checkpoint (recompress with --save)")
        tensors.update({f"{module}.{key}": t for key, t in packed.tensors.items()})
        headers[module] = packed.header()
        linear_bytes += packed.nbytes()
    tensors.update(state)  # embeddings, norms, biases, lm_head: as saved
    metadata = {"sparsemix": json.dumps({"format": FORMAT, "version": VERSION, "linears": headers})}

    def fill(staging: Path) -> None:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(staging / PACKED_FILE), metadata)
        for path in source.iterdir():  # config, tokenizer, generation config, run record
            if path.is_file() and path.suffix != ".safetensors":
                shutil.copy2(path, staging / path.name)

    write_directory(out, fill)
    reported = record["summary"]["compressed_megabytes"] * 1e6
    return {"out": str(out), "file_bytes": (out / PACKED_FILE).stat().st_size, "packed_linear_bytes": linear_bytes,
            "reported_bytes": reported, "ratio": linear_bytes / reported if reported else None,
            "linears": len(headers), "bit_exact": True}


class PackedLinear(nn.Module):
    """y = x W^T + b with W kept packed (buffers ``codes``, ``mask``, ``perm``, ``scale``, ``zero``).

    CUDA inputs of at most 16 tokens go through the Triton kernel; otherwise W is dequantised
    (``cache_weight`` keeps it, as on the CPU) and ``F.linear`` runs."""

    def __init__(self, header: dict, tensors: dict[str, torch.Tensor], bias: bool):
        super().__init__()
        self.header = header
        for key, tensor in tensors.items():
            self.register_buffer(key, tensor)
        self.bias = nn.Parameter(torch.empty(header["rows"], device="meta")) if bias else None
        self.weight_cache: torch.Tensor | None = None
        self.kernel_meta: dict | None = None  # device-side per-row metadata, built on the first kernel call
        self.fixed_meta: dict | None = None  # the fixed-position kernel's arrangement ({} when it does not apply)

    @property
    def in_features(self) -> int:
        return self.header["cols"]

    @property
    def out_features(self) -> int:
        return self.header["rows"]

    def packed(self) -> PackedWeight:
        keys = ("codes", "mask", "perm", "scale", "zero")
        return PackedWeight.from_header(self.header, {k: getattr(self, k) for k in keys if hasattr(self, k)})

    def cache_weight(self) -> None:
        self.weight_cache = dequantise(self.packed())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x[..., 0].numel() <= KERNEL_MAX_TOKENS:
            from .kernels import packed_matmul

            y = packed_matmul(x, self)
            return y if self.bias is None else y + self.bias
        weight = self.weight_cache if self.weight_cache is not None else dequantise(self.packed())
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def packed_file(directory: str | os.PathLike) -> Path:
    """An export folder, or a --save folder with an export in ``packed/`` -> the packed file."""
    directory = Path(directory)
    for candidate in (directory / PACKED_FILE, directory / "packed" / PACKED_FILE):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no {PACKED_FILE} in {directory} or {directory / 'packed'}; run:"
                      f" sparsemix export {directory} --format packed")


def load_packed(directory: str | os.PathLike, device: str = "cpu"):
    """-> (model in eval mode on ``device`` with every compressed linear a PackedLinear, tokenizer)."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = packed_file(directory)
    with safe_open(str(path), "pt") as f:
        header = json.loads((f.metadata() or {}).get("sparsemix", "{}"))
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ConfigError(f"{path} is not a {FORMAT} file of version {VERSION}; export it again")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    config = AutoConfig.from_pretrained(path.parent)
    with init_empty_weights(include_buffers=False):  # no random init: every parameter is loaded below
        model = AutoModelForCausalLM.from_config(config)
    for module, linear_header in header["linears"].items():
        parts = {key: tensors.pop(f"{module}.{key}") for key in ("codes", "mask", "perm", "scale", "zero")
                 if f"{module}.{key}" in tensors}
        model.set_submodule(module, PackedLinear(linear_header, parts, model.get_submodule(module).bias is not None))
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    empty = [name for name, p in model.named_parameters() if p.is_meta]
    if empty:
        raise ConfigError(f"{path} lacks {empty[0]} ({len(empty)} tensors missing); export it again")
    model.to(device).eval()
    for module in model.modules():
        if isinstance(module, PackedLinear) and torch.device(device).type != "cuda":
            module.cache_weight()  # the CPU runs dense: dequantise once
    return model, AutoTokenizer.from_pretrained(path.parent)


def cache_argument(model, cache) -> dict:
    """``cache`` as the keyword ``model.forward`` takes it: transformers 5.24 renamed past_key_values to
    cache (the old name goes in 5.40)."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def greedy_static(model, ids: torch.Tensor, max_new_tokens: int, graph: bool, cache=None) -> tuple[list[int], str]:
    """Greedy decoding of ``ids`` [1, prompt] with a static KV cache -> (the new token ids, stopping after
    an end-of-sequence token as ``model.generate`` does; how the steps ran). The prompt runs once, then
    one step per token at a fixed shape; the cache's own device-side length places each token, so with
    ``graph`` (CUDA) the step is captured once as a CUDA graph after one eager step and replayed: a token
    costs one launch from Python instead of one per kernel (hundreds for a 135M model). Should the
    capture fail all the same, the steps run eagerly (the CUDA random generator may then be left
    unusable in this process; greedy decoding draws nothing from it). ``cache``: an empty transformers StaticCache of at
    least prompt + max_new_tokens positions (made when None); it ends holding every token fed."""
    from transformers import StaticCache

    if cache is None:
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + max_new_tokens)
    cache = cache_argument(model, cache)
    token = model(ids, **cache).logits[:, -1:].argmax(-1)  # [1, 1]
    step_token = token.clone()

    def step() -> torch.Tensor:
        return model(step_token, **cache).logits[:, -1:].argmax(-1)

    tokens, run, how = [token], step, "static cache, eager steps"
    for i in range(1, max_new_tokens):
        step_token.copy_(tokens[-1])
        tokens.append(run().clone())
        if graph and i == 1 and max_new_tokens > 2:  # the eager step above compiled and warmed every kernel
            captured = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(captured):
                    graph_token = step()
            except RuntimeError as error:  # e.g. a model that reads its cache length on the host
                how = f"static cache, eager steps (CUDA graph capture failed: {str(error).splitlines()[0]})"
            else:
                run, how = (lambda: captured.replay() or graph_token), "static cache, CUDA graph steps"
    new = torch.cat(tokens, 1)[0].tolist()  # the loop's only host sync
    eos = model.generation_config.eos_token_id
    ends = {eos} if isinstance(eos, int) else set(eos or ())
    stop = next((i for i, t in enumerate(new) if t in ends), None)
    return (new if stop is None else new[:stop + 1]), how


def generate(directory: str | os.PathLike, prompt: str, max_new_tokens: int = 32, device: str = "cpu") -> dict:
    """Greedy decoding with the packed model -> {text, tokens (new ids), new_tokens, seconds, tokens_per_second,
    warmup_seconds, decoder}; the timed run follows a 3-token warm-up that compiles the GPU kernels. On CUDA
    the decode steps go through a static cache (``greedy_static``), replaying a CUDA graph where the
    model's adapter allows it (Llama-type models; OPT runs them eagerly); on the CPU, ``model.generate``."""
    model, tokenizer = load_packed(directory, device)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run(tokens: int) -> tuple[list[int], str, float]:
        sync()
        start = time.perf_counter()
        if cuda:
            new, how = greedy_static(model, ids, tokens, graph=adapter_for(model).graph_decode)
        else:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 do_sample=False, use_cache=True, pad_token_id=pad)
            new, how = out[0, ids.shape[1]:].tolist(), "model.generate"
        sync()
        return new, how, time.perf_counter() - start

    with torch.no_grad():
        _, _, warmup = run(3)  # compiles the kernels for this model's shapes (prompt, step, capture)
        new, how, seconds = run(max_new_tokens)
    text = tokenizer.decode(ids[0].tolist() + new, skip_special_tokens=True)
    return {"text": text, "tokens": new, "new_tokens": len(new), "seconds": seconds,
            "tokens_per_second": len(new) / seconds, "warmup_seconds": warmup, "decoder": how}
