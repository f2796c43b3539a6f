"""`sparsemix` command line: compress and eval. Parses, validates at the edge, calls the pipeline."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import (
    BIT_METHODS, AllocationConfig, CompressionConfig, ConfigError, ImportanceWeights, PruneConfig,
    QuantConfig, parse_bit_options,
)
from .data import CORPORA, CorpusNotFoundError
from .models import DEFAULT_MODEL, ModelNotFoundError, UnsupportedModelError

USER_ERRORS = (ConfigError, CorpusNotFoundError, ModelNotFoundError, UnsupportedModelError)


def _option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """--multi-word options also answer to their underscore spelling (--target_avg_bits)."""
    spellings = [name] + ([name.replace("-", "_").replace("__", "--", 1)] if "-" in name[2:] else [])
    parser.add_argument(*spellings, **kwargs)


def _corpora(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip() and c.strip() != "none")


def _common(parser: argparse.ArgumentParser) -> None:
    _option(parser, "--eval", type=_corpora, default=CORPORA, help="corpora to evaluate, e.g. wikitext2,ptb,c4 or none")
    _option(parser, "--seqlen", type=int, default=None,
            help="tokens per window (default 2048, or the model's maximum if smaller)")
    _option(parser, "--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    _option(parser, "--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    _option(parser, "--dtype", default="float32", help="float32 (default), float16 or bfloat16 on GPU")
    _option(parser, "--data-dir", default=None,
            help="local corpora (layout of shared/data); default env SPARSEMIX_DATA, else Hugging Face datasets")
    _option(parser, "--output", default=None, help="write the run record as JSON here")
    _option(parser, "--overwrite", action="store_true", help="replace an existing --output file or --save directory")
    _option(parser, "--debug", action="store_true", help="show tracebacks")
    _option(parser, "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsemix", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="prune + mixed-precision quantize a model, then evaluate it")
    c.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"hub id, local directory, .gguf file or {DEFAULT_MODEL} (default)")
    _option(c, "--calib", default="c4", choices=CORPORA, help="calibration corpus (default c4)")
    _option(c, "--nsamples", type=int, default=128, help="calibration windows (default 128)")
    _option(c, "--seed", type=int, default=0)
    _option(c, "--sparsity", type=float, default=None, help="unstructured sparsity in [0, 1) (default 0.5)")
    _option(c, "--prunen", type=int, default=0, help="N of N:M (zeros per block), e.g. 2")
    _option(c, "--prunem", type=int, default=0, help="M of N:M, e.g. 4")
    _option(c, "--blocksize", type=int, default=128)
    _option(c, "--percdamp", type=float, default=0.01)
    _option(c, "--bit-method", default="quantile", help=f"one of {', '.join(BIT_METHODS)} (default quantile)")
    _option(c, "--target-avg-bits", type=float, default=None, help="channel-average bits, e.g. 4.0")
    _option(c, "--wbits", type=int, default=4, help="bits of --bit-method uniform (default 4)")
    _option(c, "--bit-options", default="2,3,4,6,8", help="allowed widths, sorted (default 2,3,4,6,8)")
    _option(c, "--importance-weights", default=None,
            help="e.g. activation=0.3,hessian=0.2 (unnamed dimensions get 0; default 0.25/0.25/0.15/0.25/0.10)")
    _option(c, "--group-size", type=int, default=0, help="columns per scale/zero group (default 0: per row)")
    _option(c, "--sym", action="store_true", help="symmetric grids")
    _option(c, "--mse", action="store_true", help="search a clipping range per row")
    _option(c, "--save", default=None, help="write a checkpoint from_pretrained loads, plus sidecars")
    _common(c)

    e = sub.add_parser("eval", help="perplexity of a model or of a --save directory")
    e.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    _common(e)
    return parser


def compression_config(args: argparse.Namespace) -> CompressionConfig:
    if args.prunen and args.sparsity is not None:
        raise ConfigError("--sparsity and --prunen/--prunem exclude each other; give one of them")
    sparsity = 0.0 if args.prunen else (0.5 if args.sparsity is None else args.sparsity)
    weights = ImportanceWeights.parse(args.importance_weights) if args.importance_weights else ImportanceWeights()
    return CompressionConfig(
        prune=PruneConfig(sparsity=sparsity, prunen=args.prunen, prunem=args.prunem,
                          blocksize=args.blocksize, percdamp=args.percdamp),
        quant=QuantConfig(sym=args.sym, mse=args.mse, group_size=args.group_size),
        allocation=AllocationConfig(method=args.bit_method, target_avg_bits=args.target_avg_bits,
                                    wbits=args.wbits, bit_options=parse_bit_options(args.bit_options),
                                    weights=weights),
    )


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse before hours of work, not after: existing outputs need --overwrite; paths must be writable."""
    for flag, value in (("--output", args.output), ("--save", getattr(args, "save", None))):
        if value is None:
            continue
        path = Path(value)
        if path.exists() and not args.overwrite and (path.is_file() or any(path.iterdir())):
            raise ConfigError(f"{flag} {value} already exists; pass --overwrite or choose another path")
        parent = path if flag == "--save" else path.parent
        probe = parent
        while not probe.exists():
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            raise ConfigError(f"{flag} {value}: cannot write in {probe}; choose a writable path")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from . import pipeline

    _check_outputs(args)
    show = {"progress": not args.quiet, "echo": tqdm.write}
    if args.command == "compress":
        run_config = pipeline.RunConfig(
            model=args.model, compression=compression_config(args), calib=args.calib, nsamples=args.nsamples,
            seqlen=args.seqlen, seed=args.seed, eval=args.eval, device=args.device, dtype=args.dtype,
            batch_size=args.batch_size, data_dir=args.data_dir,
        )
        model, tokenizer, record, result = pipeline.compress(run_config, **show)
        if args.save:
            pipeline.save_compressed(model, tokenizer, args.save, record, result.bits)
    else:
        record = pipeline.evaluate_saved(pipeline.RunConfig(
            model=args.model, eval=args.eval, seqlen=args.seqlen, device=args.device, dtype=args.dtype,
            batch_size=args.batch_size, data_dir=args.data_dir), **show)
    if args.output:
        pipeline.write_json(args.output, record)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING, format="%(message)s")
    try:
        return run(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"sparsemix: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsemix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
