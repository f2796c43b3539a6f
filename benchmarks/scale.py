"""Compression time and peak GPU memory at the shapes of large models, one JSON line per run.

    python benchmarks/scale.py --shapes opt-1.3b,opt-6.7b [--nsamples 128] [--seqlen 2048]

Weights are random (time and memory do not depend on their values) and fp16; the model stays in
CPU memory and the driver moves one decoder layer at a time to the GPU. Calibration windows are
random token ids. 50% sparsity + budget 4.0, fused solver, fp16 activations.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, OPTConfig

from sparsemix.config import AllocationConfig, CompressionConfig, PruneConfig
from sparsemix.driver import compress_model
from sparsemix.models import adapter_for

SHAPES = {  # the published OPT configurations
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32),
}


def random_model(shape: str) -> torch.nn.Module:
    config = OPTConfig(vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=SHAPES[shape]["hidden_size"],
                       **SHAPES[shape])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    largest = max(p.numel() for p in model.parameters())
    pool = torch.randn(largest + 4096, generator=gen).mul_(0.02).to(torch.float16)  # one draw, many slices: fast
    with torch.no_grad():
        for p in model.parameters():
            start = int(torch.randint(0, 4096, (1,), generator=gen))
            p.copy_(pool[start:start + p.numel()].view(p.shape))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="opt-1.3b,opt-6.7b")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jsonl", default=None)
    args = parser.parse_args()
    config = CompressionConfig(PruneConfig(0.5), allocation=AllocationConfig(method="budget", target_avg_bits=4.0))
    for shape in args.shapes.split(","):
        start = time.perf_counter()
        model = random_model(shape)
        build = time.perf_counter() - start
        windows = torch.randint(0, 50272, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = compress_model(model, windows, config, device=args.device, batch_size=args.batch_size)
        record = {
            "shape": shape, "parameters": sum(p.numel() for p in model.parameters()),
            "layers": SHAPES[shape]["num_hidden_layers"], "hidden": SHAPES[shape]["hidden_size"],
            "calibration_tokens": args.nsamples * args.seqlen, "compress_seconds": result.seconds,
            "phases": result.phases, "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "layers_device": str(next(adapter_for(model).layers(model).parameters()).device), "build_seconds": build,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
        }
        line = json.dumps(record)
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(line + "\n")
        del model, result
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
