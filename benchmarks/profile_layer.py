"""Where compression time goes: the fast path on the first few decoder layers under torch.profiler.

    python benchmarks/profile_layer.py MODEL --data-dir DIR [--layers 4] [--nsamples 128] [--batch-size 8]
    python benchmarks/profile_layer.py random-smollm2 [--layers 4]    # SmolLM2-135M's shape, random weights

Prints JSON lines, one group per run (``--runs``, after a warm-up run): ``cold`` (instead of the
warm-up) the first run in this process and then a second, with nothing attached, after warming
only the ``--prewarm`` parts (cublas, cusolver, alloc: what a first run pays for that a second
does not); ``timed`` the phase seconds with nothing attached; ``kernels`` the GPU's busy time against the wall time (idle gaps
mean the host is the bottleneck) and the top CUDA kernels; ``host`` Python functions by own time;
``steps`` the solve's steps (Hessian inverse, importance, allocation, sweep, ...) each timed
with the GPU synchronised around it.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import json
import pstats
import time

import torch

from sparsemix.config import AllocationConfig, CompressionConfig, PruneConfig
from sparsemix.data import calibration_windows
from sparsemix.driver import compress_model
from sparsemix.models import adapter_for
from sparsemix.models import load_model as load_real_model

RANDOM = "random-smollm2"


def load_model(name: str):
    """The named model, or (for ``random-smollm2``) SmolLM2-135M's Llama shape with random weights."""
    if name != RANDOM:
        return load_real_model(name)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, use_cache=False)
    return LlamaForCausalLM(config).eval(), None


SOLVE_STEPS = [  # (module, function): the solve's steps, timed one by one in the "steps" run
    ("sparsemix.engine", "inverse_hessian"), ("sparsemix.engine", "importance_dimensions"),
    ("sparsemix.engine", "allocate_bits"), ("sparsemix.engine", "sparsegpt_quantize"), ("sparsemix.engine", "_result"),
    ("sparsemix.engine", "_without_dead"), ("sparsemix.driver", "row_grids"), ("sparsemix.driver", "compress_linears"),
]


@contextlib.contextmanager
def timed_steps(totals: dict):
    """Each SOLVE_STEPS function wrapped: synchronised wall seconds and calls, summed into ``totals``."""
    originals = []
    for module_name, name in SOLVE_STEPS:
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            torch.cuda.synchronize()
            begin = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                seconds, calls = totals.get(_name, (0.0, 0))
                totals[_name] = (seconds + time.perf_counter() - begin, calls + 1)
        setattr(module, name, wrapper)
        originals.append((module, name, original))
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def prewarm(parts: list[str]) -> None:
    """Initialise only the named parts of the CUDA stack, outside any timing."""
    torch.cuda.init()
    x = torch.randn(64, 64, device="cuda")
    if "cublas" in parts:
        x @ x
    if "cusolver" in parts:
        torch.cholesky_inverse(torch.linalg.cholesky(2 * torch.eye(64, device="cuda")))
    if "alloc" in parts:
        torch.empty(8 << 30, dtype=torch.uint8, device="cuda")  # freed at once; the caching allocator keeps it
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data-dir")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", default="timed,kernels,host,steps", help="which of cold,timed,kernels,host,steps")
    parser.add_argument("--prewarm", default="", help="for cold: which of cublas,cusolver,alloc to warm first")
    parser.add_argument("--cold-host", action="store_true",
                        help="for cold: Python functions by how much longer they took in the first run than the second")
    args = parser.parse_args()
    runs = args.runs.split(",")
    config = CompressionConfig(PruneConfig(0.5), allocation=AllocationConfig(method="budget", target_avg_bits=4.0))
    device = torch.cuda.get_device_name()

    def fresh():
        model, tokenizer = load_model(args.model)
        del adapter_for(model).layers(model)[args.layers:]
        return model, tokenizer

    model, tokenizer = fresh()
    if args.model == RANDOM:  # same shapes, random tokens: no model file or corpus needed
        windows = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen))
    else:
        windows = calibration_windows("c4", tokenizer, args.nsamples, args.seqlen, 0, args.data_dir)
    if "cold" in runs:
        prewarm(args.prewarm.split(","))
        host = {}
        for attempt in ("first", "second"):
            if attempt == "second":
                model, _ = fresh()
            torch.cuda.synchronize()
            start = time.perf_counter()
            with cProfile.Profile() if args.cold_host else contextlib.nullcontext() as profile:
                result = compress_model(model, windows, config, "cuda", args.batch_size, keep_on_device=True)
            if profile is not None:
                host[attempt] = pstats.Stats(profile).stats
            print(json.dumps({"run": f"cold-{attempt}", "prewarm": args.prewarm, "device": device, "layers": args.layers,
                              "phases": result.phases, "compress_seconds": result.seconds,
                              "wall_seconds": time.perf_counter() - start}), flush=True)
        if host:
            extra = {key: (v[3] - host["second"].get(key, (0, 0, 0, 0))[3], v[2] - host["second"].get(key, (0, 0, 0))[2])
                     for key, v in host["first"].items()}
            for (file, line, name), (cumulative, own) in sorted(extra.items(), key=lambda item: -item[1][0])[:40]:
                print(json.dumps({"first-minus-second": f"{file.split('/')[-1]}:{line}:{name}",
                                  "cumulative_seconds": round(cumulative, 4), "own_seconds": round(own, 4)}), flush=True)
    else:
        compress_model(model, windows, config, "cuda", args.batch_size)  # warm-up: kernels compiled, graphs captured
    if "timed" in runs:
        model, _ = fresh()
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = compress_model(model, windows, config, "cuda", args.batch_size)  # no profiler attached
        print(json.dumps({"run": "timed", "device": device, "layers": args.layers, "phases": result.phases,
                          "compress_seconds": result.seconds, "wall_seconds": time.perf_counter() - start}), flush=True)
    if "kernels" in runs:  # the GPU's side: busy time against wall time, top kernels
        model, _ = fresh()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            result = compress_model(model, windows, config, "cuda", args.batch_size)
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        events = prof.key_averages()
        busy = sum(e.device_time_total for e in events) / 1e6
        print(json.dumps({"run": "kernels", "device": device, "layers": args.layers, "phases": result.phases,
                          "wall_seconds": wall, "gpu_kernel_seconds": busy}), flush=True)
        for e in sorted(events, key=lambda e: -e.device_time_total)[:15]:
            print(json.dumps({"kernel": e.key[:90], "seconds": e.device_time_total / 1e6, "calls": e.count}), flush=True)
    if "host" in runs:  # the host's side: Python functions by own time (a wait for the GPU shows in the op that syncs)
        model, _ = fresh()
        host = cProfile.Profile()
        host.enable()
        compress_model(model, windows, config, "cuda", args.batch_size)
        host.disable()
        stats = pstats.Stats(host)
        top = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:25]  # (file, line, name) -> (.., tottime, ..)
        for (file, line, name), (_, calls, own, cumulative, _) in top:
            print(json.dumps({"function": f"{file.split('/')[-1]}:{line}:{name}", "calls": calls,
                              "own_seconds": own, "cumulative_seconds": cumulative}), flush=True)
    if "steps" in runs:  # the solve step by step, each synchronised (GPU time included)
        model, _ = fresh()
        totals: dict = {}
        with timed_steps(totals):
            result = compress_model(model, windows, config, "cuda", args.batch_size)
        print(json.dumps({"run": "steps", "device": device, "layers": args.layers, "phases": result.phases,
                          "steps": {name: {"seconds": sec, "calls": n} for name, (sec, n) in totals.items()}}), flush=True)


if __name__ == "__main__":
    main()
