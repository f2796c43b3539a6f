"""The packed-format Triton kernel against fp16 torch.matmul, one JSON line per case.

    PYTHONPATH=src python benchmarks/packed_matvec.py --device cuda [--shapes 4096x4096] [--bits 4] [--batch 1]

Cases: shapes (out x in) 4096x4096, 4096x11008, 11008x4096; average code bits 3, 4, 5 (random
per-row mixes of 2/3/4/6/8 around the mean); sparsity 0.5 (bitmask), 2:4 and 0 (dense); batch 1, 4, 16.
Each line: fp16 and kernel µs (CUDA graphs, so launch overhead does not count), speedup, bytes the
kernel reads, achieved GB/s, the device's peak (table) and measured copy bandwidth, the max |error|
against dequantise-then-matmul, and the kernel's launch shape. Times are given twice: ``*_us`` repeat
one layer, whose weights may then stay in the L2 cache (50 MB on an H100); ``cold_*`` cycle through
enough copies of the layer (at least 4x the L2 in all) that each call reads its weights from DRAM, as
decoding a whole model does; each is the median of COLD_REPEATS timings (``cold_kernel_us_runs`` lists the
kernel's). On Hopper the fixed-position kernel is launched with programmatic
dependent launch where ``fixed_config`` says so (``pdl``: a call starts loading its weights while the
previous one ends); ``serial_*`` then time the same calls without it. For reference, ``cold_read_us`` is a plain streaming read of the kernel's
bytes from DRAM and ``launch_us`` one launch of that read on one block. Issue 8's target (H100, batch
1, 4 bits): >= 2.5x fp16 and >= 60% of peak bandwidth.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
import triton
import triton.language as tl

from sparsemix.packing import dequantise, random_packed

OPTIONS = (2, 3, 4, 6, 8)
PEAK_GBPS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H200": 4800,
             "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100-PCIE": 1555, "L40S": 864, "RTX 4090": 1008}


def peak_gbps(name: str) -> float | None:
    """The datasheet memory bandwidth of a GPU by (part of) its name; None when not in the table."""
    return next((peak for key, peak in PEAK_GBPS.items() if key.lower() in name.lower()), None)


def copy_gbps(device: str, megabytes: int = 1024) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second)."""
    from triton.testing import do_bench

    a = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e6


def width_mix(rows: int, mean: float, gen: torch.Generator) -> torch.Tensor:
    """[rows] widths from OPTIONS with the given mean: 70% at the nearest option and the rest on its
    neighbours (4 -> mostly 4, some 3 and 6), else the two options around the mean; shuffled."""
    nearest = min(range(len(OPTIONS)), key=lambda i: abs(OPTIONS[i] - mean))
    mix = {}
    if 0 < nearest < len(OPTIONS) - 1:
        lo, mid, hi = OPTIONS[nearest - 1], OPTIONS[nearest], OPTIONS[nearest + 1]
        hi_share = (mean - 0.7 * mid - 0.3 * lo) / (hi - lo)  # from lo*a + hi*b = mean - 0.7*mid, a + b = 0.3
        if 0 <= hi_share <= 0.3:
            mix = {lo: 0.3 - hi_share, mid: 0.7, hi: hi_share}
    if not mix:
        upper = next(i for i, b in enumerate(OPTIONS) if b >= mean)
        lo, hi = OPTIONS[max(upper - 1, 0)], OPTIONS[upper]
        share = 0.0 if hi == lo else (mean - lo) / (hi - lo)
        mix = {lo: 1 - share, hi: share}
    counts = {b: round(share * rows) for b, share in mix.items()}
    counts[max(mix, key=mix.get)] += rows - sum(counts.values())
    bits = torch.cat([torch.full((n,), b) for b, n in counts.items()])
    return bits[torch.randperm(rows, generator=gen)]


def layer(rows: int, cols: int, mean_bits: float, sparsity: str, device: str):
    """-> (PackedLinear on ``device``, its PackedWeight, dequantised weight fp16, widths [rows]).
    ``sparsity``: a fraction (unstructured, bitmask; 0 dense) or "2:4"."""
    from sparsemix.kernels import kernel_meta, fixed_meta
    from sparsemix.packed import PackedLinear

    gen = torch.Generator().manual_seed(rows * 7 + cols)
    bits = width_mix(rows, mean_bits, gen)
    two_four = sparsity == "2:4"
    packed = random_packed(bits, cols, 0.5 if two_four else float(sparsity), cols, gen, device, two_four=two_four)
    module = PackedLinear(packed.header(), packed.tensors, bias=False)
    module.kernel_meta = kernel_meta(module)
    module.fixed_meta = fixed_meta(module) or {}
    return module, packed, dequantise(packed), bits


L2_BYTES = 50 * 2**20  # H100's L2; cold timings cycle through at least 4x this


def _copies(module, n: int) -> list:
    """``n`` shallow copies of a PackedLinear, each with its own copy of the kernel's arrangement."""
    out = []
    for _ in range(n):
        twin = copy.copy(module)
        for key in ("kernel_meta", "fixed_meta"):
            meta = getattr(module, key)
            if meta:
                setattr(twin, key, {k: v.clone() if torch.is_tensor(v) else v for k, v in meta.items()})
        out.append(twin)
    return out


COLD_REPEATS = 3  # one cold timing of the same 4096 x 4096 kernel ranged 4.42-4.77 µs between processes (H100)


def _cold_runs(fn, operands: list) -> list[float]:
    """µs per call of ``fn(operand)``, cycling through ``operands`` in one CUDA graph, timed COLD_REPEATS times."""
    from triton.testing import do_bench_cudagraph

    return [do_bench_cudagraph(lambda: [fn(op) for op in operands]) * 1e3 / len(operands) for _ in range(COLD_REPEATS)]


def _cold_us(fn, operands: list) -> float:
    """The median of ``_cold_runs``."""
    return statistics.median(_cold_runs(fn, operands))


READ_BLOCK = 4096  # int32 words per program of the reference read


@triton.jit
def _read_kernel(src, out, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Sum BLOCK int32 words per program: a plain streaming read, the reference for the kernel's bytes.
    PDL: launched as the packed kernel is on Hopper, the next read starting while this one ends."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = tl.sum(tl.load(src + offsets, mask=offsets < n, other=0), 0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    tl.store(out + tl.program_id(0), total)


def read_reference(nbytes: int, device: str, pdl: bool) -> dict:
    """µs to read ``nbytes`` with ``_read_kernel`` from DRAM (cycling through copies, like the cold
    timings) and to launch it on one block: what any kernel reading these bytes pays at least, launched
    as the packed kernel is (``pdl``)."""
    from triton.testing import do_bench_cudagraph

    words = -(-nbytes // 4)
    programs = -(-words // READ_BLOCK)
    copies = [torch.ones(words, dtype=torch.int32, device=device) for _ in range(-(-4 * L2_BYTES // nbytes))]
    out = torch.empty(programs, dtype=torch.int32, device=device)

    def read(src, n, grid):
        return _read_kernel[(grid,)](src, out, n, BLOCK=READ_BLOCK, PDL=pdl, launch_pdl=pdl)

    read_us = _cold_us(lambda src: read(src, words, programs), copies)
    launch_us = do_bench_cudagraph(lambda: read(copies[0], READ_BLOCK, 1)) * 1e3
    return {"cold_read_us": read_us, "launch_us": launch_us}


def case(module, packed, weight, bits, mean_bits: float, sparsity: str, batch: int, peak, copy_bw) -> dict:
    from triton.testing import do_bench_cudagraph

    from sparsemix.kernels import kernel_bytes, launch_config, packed_matmul, uses_pdl

    rows, cols = weight.shape
    x = torch.randn(batch, cols, dtype=torch.float16, device=weight.device)
    error = float((packed_matmul(x, module).float() - x.float() @ weight.float().T).abs().max())
    dense_us = do_bench_cudagraph(lambda: torch.matmul(x, weight.T)) * 1e3
    kernel_us = do_bench_cudagraph(lambda: packed_matmul(x, module)) * 1e3
    meta = module.fixed_meta or module.kernel_meta  # the arrangement packed_matmul reads
    read = kernel_bytes(meta, batch, rows, cols)  # its arrangement of the weight, x in, y out
    dense = [weight.clone() for _ in range(-(-4 * L2_BYTES // (weight.numel() * 2)))]
    cold_dense_us = _cold_us(lambda w: torch.matmul(x, w.T), dense)
    del dense
    copies = _copies(module, -(-4 * L2_BYTES // read))
    cold_runs = _cold_runs(lambda m: packed_matmul(x, m), copies)
    cold_kernel_us = statistics.median(cold_runs)
    pdl = bool(module.fixed_meta) and uses_pdl(module.fixed_meta, launch_config(module.fixed_meta, batch))
    serial = {}
    if pdl:  # the same calls launched one after the other, for comparison
        for m in (module, *copies):
            m.fixed_meta["pdl"] = False
        serial = {"serial_kernel_us": do_bench_cudagraph(lambda: packed_matmul(x, module)) * 1e3,
                  "cold_serial_kernel_us": _cold_us(lambda m: packed_matmul(x, m), copies)}
        module.fixed_meta["pdl"] = True
    del copies
    achieved, cold_achieved = read / kernel_us / 1e3, read / cold_kernel_us / 1e3
    reference = read_reference(read, x.device.type, pdl)
    return {"shape": [rows, cols], "mean_bits": mean_bits, "code_bits": float(bits.float().mean()),
            "sparsity": sparsity, "batch": batch, "fp16_us": dense_us, "kernel_us": kernel_us,
            "speedup": dense_us / kernel_us, "cold_fp16_us": cold_dense_us, "cold_kernel_us": cold_kernel_us,
            "cold_speedup": cold_dense_us / cold_kernel_us, "cold_kernel_us_runs": cold_runs, "pdl": pdl, **serial, "bytes_read": read, "file_bytes": packed.nbytes(),
            "fp16_bytes": weight.numel() * 2,
            "achieved_gbps": achieved, "peak_gbps": peak, "fraction_of_peak": achieved / peak if peak else None,
            "cold_achieved_gbps": cold_achieved, "cold_fraction_of_peak": cold_achieved / peak if peak else None,
            **reference, "cold_read_fraction_of_peak": read / reference["cold_read_us"] / 1e3 / peak if peak else None,
            "copy_gbps": copy_bw, "max_abs_error": error, "config": _config(module, batch)}


def _config(module, batch: int) -> str:
    """The fixed-position kernel's launch shape for ``batch`` tokens as ROWSxSPLITxWARPS[u][rN][fN], or "general"."""
    from sparsemix.kernels import launch_config

    if not module.fixed_meta:
        return "general"
    config = launch_config(module.fixed_meta, batch)
    return (f"{config.rows}x{config.split}x{config.warps}{'u' if config.unrolled else ''}"
            f"{f'r{config.programs_per_sm}' if config.programs_per_sm else ''}"
            f"{f'f{config.prefetchers}' if config.prefetchers else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096", help="out x in, comma-separated")
    parser.add_argument("--bits", default="3,4,5", help="average code bits")
    parser.add_argument("--sparsity", default="0.5,2:4,0", help="0.5: unstructured with bitmask; 2:4; 0: dense")
    parser.add_argument("--batch", default="1,4,16")
    parser.add_argument("--tune", default="", help="2:4 and dense at batch 1: also time "
                        "ELEMENTSxSPLITxWARPS[p][aN][u][rN] configs, e.g. 1024x64x16p (2:4) or 128x8x8pa2u (dense; "
                        "rows x split = 16 x warps) (p: programmatic dependent launch, aN: weights loaded N steps of "
                        "the loop ahead, a alone 1, u: the column walk unrolled, rN: at most N programs to a "
                        "multiprocessor)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/packed_matvec.py needs a CUDA GPU (the kernel is tested on the CPU by pytest)")
    name = torch.cuda.get_device_name(torch.device(args.device))
    peak, copy_bw = peak_gbps(name), copy_gbps(args.device)
    for shape in args.shapes.split(","):
        rows, cols = (int(v) for v in shape.lower().split("x"))
        for mean_bits in (float(b) for b in args.bits.split(",")):
            for sparsity in args.sparsity.split(","):
                built = layer(rows, cols, mean_bits, sparsity, args.device)
                for batch in (int(b) for b in args.batch.split(",")):
                    result = case(*built, mean_bits, sparsity, batch, peak, copy_bw)
                    print(json.dumps({"gpu": name, **result}), flush=True)
                if sparsity in ("2:4", "0") and args.tune:
                    tune(built, mean_bits, sparsity, args.tune, peak, copy_bw, name)


def tune(built, mean_bits: float, sparsity: str, configs: str, peak, copy_bw, name: str) -> None:
    """The batch-1 case of a fixed-position (2:4 or dense) layer again under each
    ELEMENTSxSPLITxWARPS[p][aN][u][rN][fN] config (rows per program times column walks side by side, column walks,
    warps; p: launched with programmatic dependent launch, aN: each step of the loop loads the weights of the
    step N on, u: the column walk unrolled, rN: at most N programs to a multiprocessor, fN: the first N programs
    ask the L2 for the call's weights)."""
    import re

    from sparsemix.kernels import PAD_ROWS, FixedConfig

    meta = built[0].fixed_meta
    for config in configs.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)(p?)(a(\d*))?(u?)(r(\d+))?(f(\d+))?", config)
        if match is None:
            raise SystemExit(f"--tune: {config!r} is not ELEMENTSxSPLITxWARPS[p][aN][u][rN][fN], e.g. 16x8x8pa2ur2f32")
        elements, split, warps = (int(match[i]) for i in (1, 2, 3))
        ahead = 0 if match[5] is None else int(match[6] or 1)
        meta["config"] = FixedConfig(max(elements // split, PAD_ROWS), split, warps, pdl=match[4] == "p", ahead=ahead,
                                     unrolled=match[7] == "u", programs_per_sm=int(match[9] or 0),
                                     prefetchers=int(match[11] or 0))
        result = case(*built, mean_bits, sparsity, 1, peak, copy_bw)
        print(json.dumps({"gpu": name, "tuned": config, **result}), flush=True)
    meta["config"] = None


if __name__ == "__main__":
    main()
