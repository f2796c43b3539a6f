"""Compile the packed kernels for an H100 (sm_90a) without a GPU and count SASS instructions per weight
in each width's main loop: a proxy for their cost at batch 1 (the general kernel, then the fixed-position
one for 2:4 and dense layers).

    PYTHONPATH=src python benchmarks/kernel_sass.py
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparsemix import kernels

NAMES = ["x_ptr", "y_ptr", "codes_ptr", "mask_ptr", "table_ptr", "chunk_off_ptr", "perm_ptr", "scale_ptr", "zero_ptr",
         "B", "R", "K", "G", "GROUP_SIZE", "MASK_WORDS", "N_CHUNKS"]
TYPES = ["*fp16", "*fp32"] + ["*i32"] * 5 + ["*fp16", "*fp16"] + ["i32"] * 7
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _sass(fn, signature: dict, const: dict, num_warps: int, aligned: int = 0) -> list[tuple[int, str]]:
    """(address, instruction) of ``fn`` compiled for sm_90 with these constexprs; the first ``aligned``
    arguments marked 16-divisible, as a launch marks pointers and integers that are."""
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(aligned)}
    compiled = triton.compile(ASTSource(fn=fn, signature={**signature, **{name: "constexpr" for name in const}},
                                        constexprs=const, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    return [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]


def _loop(ins: list[tuple[int, str]]) -> int:
    """Instructions in the longest backward-branch loop."""
    back = [(int(m.group(1), 16), a) for a, text in ins if (m := re.search(r"BRA (0x[0-9a-f]+)", text))
            and int(m.group(1), 16) < a]
    start, end = max(back, key=lambda b: b[1] - b[0])
    return sum(start <= a <= end for a, _ in ins)


def _walk(ins: list[tuple[int, str]], steps: int) -> float:
    """Instructions per step of an unrolled column walk: from the PDL wait to the first barrier of the sums."""
    texts = [text for _, text in ins]
    start = next(i for i, text in enumerate(texts) if text.startswith("ACQBULK"))
    end = next(i for i in range(start, len(texts)) if texts[i].startswith("BAR.SYNC"))
    return (end - start) / steps


def fixed_instructions(width: int, dense: bool, tokens: int = 1) -> dict:
    """The fixed-position kernel's instructions per step of a warp's column walk (tensor cores; dense or 2:4)
    at the shape ``fixed_config`` picks for 4096 x 4096 and ``tokens`` tokens: the loop body, or an unrolled
    walk's instructions over its steps; per weight = per column position (kept or pruned)."""
    # an H100's choice for 4096 x 4096 of uniform rows
    narrow = kernels.is_narrow({width: 4096}, dense)
    config = kernels.fixed_config(4096, 4096, dense, sms=132, batch=tokens, narrow=narrow)
    names = ["x_ptr", "y_ptr", "codes_ptr", "index_ptr", "perm_ptr", "scale_ptr", "zz_ptr",
             "ROWS_2", "ROWS_3", "ROWS_4", "ROWS_6", "ROWS_8", "ROWS_16", "P", "K", "GROUP_SIZE", "X_STRIDE", "Y_STRIDE",
             "CODE_BYTES", "INDEX_BYTES"]
    types = ["*i32", "*fp16"] + ["*i32"] * 5 + ["i32"] * 13
    if tokens > 1:
        names, types = names + ["B"], types + ["i32"]
    run = kernels.run_tiles(dense)
    steps = kernels.walk_steps(4096, dense, config.split)
    const = dict(PRESENT=1 << width, DENSE=dense, GROUPED=False, BLOCK_R=config.rows, SPLIT=config.split, EVEN=True,
                 NB=-(-tokens // kernels.MMA_TOKENS), USE_ASM=True, PDL=config.pdl, AHEAD=config.ahead, RUN=run,
                 ONE_TOKEN=tokens == 1, STEPS=steps if config.unrolled else 0, PROGRAMS_PER_SM=config.programs_per_sm,
                 PREFETCHERS=config.prefetchers, **({} if tokens > 1 else {"B": 1}))  # a launch specialises B == 1
    ins = _sass(kernels._fixed_kernel, dict(zip(names, types)), const, config.warps, aligned=16)
    body = _walk(ins, steps) if config.unrolled else _loop(ins)
    positions = 64 if dense else 16 * run  # a lane's share of a step: 8 mma of 16 x 16, or RUN mma.sp of 16 x 32
    return {"kernel": "dense" if dense else "2:4", "width": width, "tokens": tokens, "unrolled": config.unrolled,
            "step_instructions": round(body, 1), "per_weight": round(body / positions, 1)}


def loop_instructions(width: int, sparse: bool, batch_block: int, num_warps: int = 4) -> dict:
    """The general kernel's column loop (one 32-column tile per pass)."""
    const = dict(PRESENT=1 << width, HAS_MASK=sparse, GROUPED=False, GROUP_TILE=True, CHUNK=kernels.CHUNK,
                 EVEN_K=True, BLOCK_R=kernels.BLOCK_R, BLOCK_B=batch_block, USE_DOT=batch_block > 1, USE_ASM=True)
    body = _loop(_sass(kernels._packed_matmul_kernel, dict(zip(NAMES, TYPES)), const, num_warps))
    weights_per_thread = kernels.BLOCK_R * 32 / (32 * num_warps)
    return {"width": width, "sparse": sparse, "batch_block": batch_block, "loop_instructions": body,
            "per_weight": round(body / weights_per_thread, 1)}


if __name__ == "__main__":
    for width in kernels.WIDTHS:
        for sparse in (True, False):
            for batch_block in (1, 16):
                print(json.dumps(loop_instructions(width, sparse, batch_block)))
    for width in kernels.WIDTHS:
        for dense in (False, True):
            for tokens in (1, 4):
                print(json.dumps(fixed_instructions(width, dense, tokens)))
