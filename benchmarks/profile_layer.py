"""Where one decoder layer's calibration time goes: one JSON line per measurement.

    python benchmarks/profile_layer.py MODEL --data-dir DIR [--device cuda] [--nsamples 128] [--batch-size 8]

Times (GPU-synchronised wall seconds) on layer 0 over the calibration windows: the bare
forward; the forward with statistics hooks on all linears; each true-sequential group's
statistics pass stopped after its linears; the column sweeps of the layer's linears; and the
profiler's top CUDA kernels of one hooked forward.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from sparsemix.calibration import collect_statistics
from sparsemix.config import AllocationConfig, CompressionConfig, PruneConfig
from sparsemix.data import calibration_windows
from sparsemix.engine import compress_linears
from sparsemix.layerwise import capture_layer_inputs, run_layer, run_layer_until
from sparsemix.models import adapter_for, load_model


def timed(fn, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    windows = calibration_windows("c4", tokenizer, args.nsamples, args.seqlen, 0, args.data_dir)
    adapter = adapter_for(model)
    inputs = capture_layer_inputs(model, windows, args.batch_size, args.device)
    layer = adapter.layers(model)[0].to(args.device)
    linears = adapter.linears(layer)
    hidden, kwargs = inputs.hidden, inputs.kwargs[0]
    emit = lambda **record: print(json.dumps({"device": torch.cuda.get_device_name() if args.device == "cuda"
                                              else "cpu", "batch_size": args.batch_size, **record}), flush=True)
    emit(what="attention", implementation=str(getattr(model.config, "_attn_implementation", None)))
    with torch.no_grad():
        run_layer(layer, hidden, kwargs)  # warm-up
        emit(what="bare forward", seconds=timed(lambda: run_layer(layer, hidden, kwargs), args.device))
        with collect_statistics(linears, adapter.sequential):
            emit(what="forward + statistics of all linears",
                 seconds=timed(lambda: run_layer(layer, hidden, kwargs), args.device))
        stats = {}
        for group in adapter.sequential:
            members = {name: linears[name] for name in group}
            with collect_statistics(members, adapter.sequential) as (ins, outs):
                seconds = timed(lambda: run_layer_until(layer, hidden, kwargs, list(members.values())), args.device)
            stats[tuple(group)] = (ins, outs)
            emit(what="statistics pass, stopped after", group=list(group), seconds=seconds)
        config = CompressionConfig(PruneConfig(0.5), allocation=AllocationConfig(method="budget", target_avg_bits=4.0))
        for fused in (True, True, False):  # the first fused round includes compiling the kernels
            for group, (ins, outs) in stats.items():
                cfg = CompressionConfig(config.prune, allocation=config.allocation, fused=fused)
                weights = [linears[name].weight.detach().clone() for name in group]
                seconds = timed(lambda: compress_linears(list(group), weights, ins[group[0]],
                                                         [outs[n] for n in group], cfg, [None] * len(group),
                                                         [None] * len(group)), args.device)
                emit(what="solve", fused=fused, group=list(group), seconds=seconds)
        if args.device == "cuda":
            with collect_statistics(linears, adapter.sequential), \
                    torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                run_layer(layer, hidden, kwargs)
            top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]
            emit(what="top kernels", kernels=[{"name": e.key[:80], "ms": e.device_time_total / 1e3, "calls": e.count}
                                              for e in top])


if __name__ == "__main__":
    main()
