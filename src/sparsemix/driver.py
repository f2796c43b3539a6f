"""SparseGPT's sequential scheme over a whole model, one decoder layer at a time.

The calibration windows go through the embeddings once; every decoder layer then sees the
outputs of the already-compressed layers before it. Only the layer being worked on needs to
be on the device, so models larger than the GPU stay on the CPU.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import InputStatistics, OutputStatistics, collect_statistics
from .checkpoint import LayerCheckpoint, Resumed, run_key
from .config import CompressionConfig
from .engine import compress_linears
from .layerwise import SettledOutputs, capture_layer_inputs, run_layer, run_layer_until
from .models import adapter_for, calibration_attention
from .packing import row_grids
from .sensitivity import output_fisher, plan_model_bits
from .stats import CompressionStats


@dataclass
class CompressionResult:
    stats: CompressionStats
    bits: dict[str, torch.Tensor] = field(default_factory=dict)  # linear name -> [rows] widths
    grids: dict[str, torch.Tensor] = field(default_factory=dict)  # packing.row_grids of every linear
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds: sensitivity, forward, solve, other


def warm_up_device(config: CompressionConfig, device: torch.device | str) -> float:
    """Start what a compression on ``device`` will use (CUDA context, cuBLAS and cuSOLVER handles,
    Triton's JIT and this config's kernels) by compressing two small random linears -> seconds.

    A process's first compression otherwise pays for it (about 1–1.5 s on an H100 or H200, most of it Triton
    hashing its own library and loading its launcher); ``pipeline.prepare`` runs this in a thread
    while the model loads. A private generator: the caller's random stream is left alone.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=generator).to(device)  # 256 columns: two blocks, two grid groups
    weights = [torch.randn(32, 256, generator=generator).to(device) for _ in range(2)]
    inputs, outputs = InputStatistics(256, device), [OutputStatistics(32, device) for _ in weights]
    inputs.update(x)
    for weight, stats in zip(weights, outputs):
        stats.update(x @ weight.T)
    compress_linears(["warm-up.a", "warm-up.b"], weights, inputs, outputs, config, [None, None], [None, None])
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def sensitivity_plan(model, windows, config: CompressionConfig, device, batch_size: int):
    """For ``optimal``: (output Fisher per linear or {}, model-wide bit plan or {})."""
    allocation = config.allocation
    if allocation.method != "optimal":
        return {}, {}
    fisher = output_fisher(model, windows, batch_size, device) if allocation.fisher else {}
    if allocation.scope != "model":
        return fisher, {}
    return fisher, plan_model_bits(model, windows, config, device, batch_size, fisher or None)


@torch.no_grad()
def compress_model(
    model: nn.Module, windows: torch.Tensor, config: CompressionConfig,
    device: torch.device | str = "cpu", batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None, checkpoint_dir: str | None = None,
    keep_on_device: bool = False,
) -> CompressionResult:
    """Compress every decoder layer's linears in place with calibration ``windows`` [n, seqlen].

    ``progress(i, n)`` is called after layer i of n. Layers move to ``device`` one at a time
    and back to where they were, or (``keep_on_device``, for a model that fits) stay there.
    With ``checkpoint_dir`` the state is saved after every layer and a rerun of the same
    command resumes where the last one stopped, with the same result.
    """
    clock = PhaseClock(device)
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    checkpoint = LayerCheckpoint(checkpoint_dir, run_key(config, windows, len(layers))) if checkpoint_dir else None
    resumed = checkpoint.load() if checkpoint else Resumed()
    with clock("sensitivity"):
        if resumed.sensitivity is not None:  # computed on the dense model: never on a half-compressed one
            fisher, plan = resumed.sensitivity
        else:
            fisher, plan = sensitivity_plan(model, windows, config, device, batch_size)
            if checkpoint and config.allocation.method == "optimal":
                checkpoint.save_sensitivity(fisher, plan)
    with calibration_attention(model):
        precision = forward_precision(config.forward_precision, device)
        with clock("forward"), precision():
            inputs = capture_layer_inputs(model, windows, batch_size, device)
        hidden = inputs.hidden
        result = CompressionResult(resumed.stats, dict(resumed.bits), dict(resumed.grids))
        for i, layer in enumerate(layers):
            home = torch.device(device) if keep_on_device else next(layer.parameters()).device
            with clock("other"):
                layer.to(device)
            if i < resumed.layers_done:  # finished before: restore it and recompute its outputs
                layer.load_state_dict(checkpoint.layer_weights(i))
                with clock("forward"), precision():
                    hidden = run_layer(layer, hidden, inputs.kwargs[i])
                layer.to(home)
                continue
            linears = adapter.linears(layer)
            # true sequential: one forward per group, after the groups before it were compressed
            passes = [list(group) for group in adapter.sequential] if config.true_sequential else [list(linears)]
            # the fast path replays what the passes would redo: settled submodules and the attention core
            settled = SettledOutputs(layer, list(linears), (adapter.attention, adapter.sequential[0]), hidden)
            replayed = settled.replayed if config.fused else (lambda *args, **kwargs: nullcontext())
            done: set[str] = set()  # linears of this layer compressed so far
            for names in passes:
                members = {name: linears[name] for name in names}
                try:
                    with clock("forward"), precision(), replayed(done), \
                            collect_statistics(members, shared_inputs=adapter.sequential) as (in_stats, out_stats):
                        if config.fused:  # stop after the group's linears: the rest of the layer is not needed
                            run_layer_until(layer, hidden, inputs.kwargs[i], list(members.values()))
                        else:
                            run_layer(layer, hidden, inputs.kwargs[i])
                except FloatingPointError as error:  # name the layer where the numbers went bad
                    raise FloatingPointError(f"layers.{i}.{error}; the run stops here") from None
                for group in _by_shared_input(names, in_stats):  # q/k/v and gate/up: one H, one stacked sweep
                    full_names = [f"layers.{i}.{name}" for name in group]
                    with clock("solve"):
                        compressed = compress_linears(
                            full_names, [members[name].weight for name in group], in_stats[group[0]],
                            [out_stats[name] for name in group], config, [plan.get(n) for n in full_names],
                            [fisher.get(n) for n in full_names])
                    for name, full_name, linear_result in zip(group, full_names, compressed):
                        members[name].weight.copy_(linear_result.weight.to(members[name].weight.dtype))
                        result.stats.add(linear_result.stats)
                        result.bits[full_name] = linear_result.bits.to(torch.int8).cpu()
                        result.grids.update(row_grids(full_name, linear_result.bits, linear_result.solve))
                done.update(names)
            with clock("forward"), precision(), replayed(done, record=False):
                hidden = run_layer(layer, hidden, inputs.kwargs[i])
            with clock("other"):
                layer.to(home)
                if checkpoint:
                    checkpoint.save_layer(i, layer, result.stats, result.bits, result.grids)
            if progress:
                progress(i + 1, len(layers))
        result.phases = clock.seconds
        result.seconds = clock.total()
        return result


def _by_shared_input(names: list[str], in_stats: dict) -> list[list[str]]:
    """``names`` grouped by the InputStatistics object they share, in order."""
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(id(in_stats[name]), []).append(name)
    return list(groups.values())


def forward_precision(name: str, device):
    """A context for the calibration forward passes: fp32, TF32 matmuls, or bf16 autocast (GPU only).
    The solver always runs in fp32 with TF32 off."""
    if torch.device(device).type != "cuda" or name == "fp32":
        return nullcontext
    if name == "bf16":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)

    @contextmanager
    def tf32():
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    return tf32


class PhaseClock:
    """Wall seconds per phase (forward/statistics, solve, ...), synchronising the GPU at each edge."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str):
        begin = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - begin

    def total(self) -> float:
        return time.perf_counter() - self.start
