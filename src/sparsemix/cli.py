"""sparsemix: SparseGPT pruning + per-channel mixed-precision quantization, evaluated by perplexity.

Commands: compress, eval, compare, sweep, ablate, report, export, generate. The CLI parses and validates at the
edge, then calls the library (pipeline, experiments, reports).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from .config import (
    BIT_METHODS,
    AllocationConfig,
    CompressionConfig,
    ConfigError,
    ImportanceWeights,
    PruneConfig,
    QuantConfig,
    parse_bit_options,
)
from .data import CORPORA, CorpusNotFoundError
from .files import write_json
from .models import DEFAULT_MODEL, ModelNotFoundError, UnsupportedModelError

USER_ERRORS = (ConfigError, CorpusNotFoundError, ModelNotFoundError, UnsupportedModelError)
EXPERIMENTS = ("compare", "sweep", "ablate")


def _option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """--multi-word options also answer to their underscore spelling (--target_avg_bits)."""
    spellings = [name] + ([name.replace("-", "_").replace("__", "--", 1)] if "-" in name[2:] else [])
    parser.add_argument(*spellings, **kwargs)


def _corpora(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip() and c.strip() != "none")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 3,3.5,4") from None


def _model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"hub id, local directory, .gguf file or {DEFAULT_MODEL} (default)")


def _run_options(parser: argparse.ArgumentParser, calibrate: bool = True) -> None:
    if calibrate:
        _option(parser, "--calib", default="c4", choices=CORPORA, help="calibration corpus (default c4)")
        _option(parser, "--nsamples", type=int, default=128, help="calibration windows (default 128)")
        _option(parser, "--seed", type=int, default=0)
    _option(parser, "--eval", type=_corpora, default=CORPORA, help="corpora to evaluate, e.g. wikitext2,ptb,c4 or none")
    _option(parser, "--seqlen", type=int, default=None,
            help="tokens per window (default 2048, or the model's maximum if smaller)")
    _option(parser, "--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    _option(parser, "--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    _option(parser, "--dtype", default="float32", help="float32 (default), float16 or bfloat16 on GPU")
    _option(parser, "--data-dir", default=None,
            help="local corpora (layout of shared/data); default env SPARSEMIX_DATA, else Hugging Face datasets")


def _prune_options(parser: argparse.ArgumentParser) -> None:
    _option(parser, "--sparsity", type=float, default=None, help="unstructured sparsity in [0, 1) (default 0.5)")
    _option(parser, "--prunen", type=int, default=0, help="N of N:M (zeros per block), e.g. 2")
    _option(parser, "--prunem", type=int, default=0, help="M of N:M, e.g. 4")


def _optimal_options(parser: argparse.ArgumentParser) -> None:
    _option(parser, "--allocation-scope", default="layer", choices=("layer", "model"),
            help="optimal: one budget per linear (default) or one for the whole model")
    _option(parser, "--budget-unit", default=None, choices=("channel", "parameter", "effective"),
            help="optimal: what --target-avg-bits counts (default: channel; parameter with --allocation-scope model)")
    _option(parser, "--no-fisher", action="store_true", help="optimal: do not weight row losses by output Fisher")


def _optimal_fields(args: argparse.Namespace) -> dict:
    unit = args.budget_unit or ("parameter" if args.allocation_scope == "model" else "channel")
    return {"scope": args.allocation_scope, "budget_unit": unit, "fisher": not args.no_fisher}


def _misc_options(parser: argparse.ArgumentParser) -> None:
    _option(parser, "--debug", action="store_true", help="show tracebacks")
    _option(parser, "--quiet", action="store_true", help="no progress bars")


def _experiment_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    _option(parser, "--out", default=default_out, help=f"output folder (default {default_out})")
    _option(parser, "--force", action="store_true", help="recompute configs already cached in OUT/runs")
    _option(parser, "--lang", default="en", choices=("en", "zh"), help="language of tables and summaries")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsemix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="prune + mixed-precision quantize a model, then evaluate it")
    _model_argument(c)
    _run_options(c)
    _prune_options(c)
    _option(c, "--blocksize", type=int, default=128)
    _option(c, "--percdamp", type=float, default=0.01)
    _option(c, "--bit-method", default="quantile", help=f"one of {', '.join(BIT_METHODS)} (default quantile)")
    _option(c, "--target-avg-bits", type=float, default=None, help="channel-average bits, e.g. 4.0")
    _option(c, "--wbits", type=int, default=4, help="bits of --bit-method uniform (default 4)")
    _option(c, "--bit-options", default="2,3,4,6,8", help="allowed widths, sorted (default 2,3,4,6,8)")
    _option(c, "--importance-weights", default=None,
            help="e.g. activation=0.3,hessian=0.2 (unnamed dimensions get 0; default 0.25/0.25/0.15/0.25/0.10)")
    _optimal_options(c)
    _option(c, "--group-size", type=int, default=0, help="columns per scale/zero group (default 0: per row)")
    _option(c, "--sym", action="store_true", help="symmetric grids")
    _option(c, "--mse", action="store_true", help="search a clipping range per row")
    _option(c, "--no-fused", action="store_true", help="take the straightforward path (no stacked sweeps, fused kernels or replayed "
            "outputs): slower, same result; for checks")
    _option(c, "--forward-precision", default="fp32", choices=("fp32", "tf32", "bf16"),
            help="GPU: precision of the calibration forward passes (default fp32; the solver is always fp32)")
    _option(c, "--no-true-sequential", action="store_true",
            help="gather every linear's statistics in one forward per layer (faster, SparseGPT's default)")
    _option(c, "--checkpoint-dir", default=None,
            help="save the state after every decoder layer here; rerunning the same command resumes")
    _option(c, "--save", default=None, help="write a checkpoint from_pretrained loads, plus sidecars")
    _option(c, "--save-packed", default=None, help="with --save: also export the packed model here")
    _option(c, "--output", default=None, help="write the run record as JSON here")
    _option(c, "--overwrite", action="store_true", help="replace an existing --output file or --save directory")
    _option(c, "--lang", default="en", choices=("en", "zh"), help="language of the printed summary")
    _misc_options(c)

    e = sub.add_parser("eval", help="perplexity of a model or of a --save directory")
    _model_argument(e)
    _run_options(e, calibrate=False)
    _option(e, "--output", default=None, help="write the run record as JSON here")
    _option(e, "--overwrite", action="store_true", help="replace an existing --output file")
    _misc_options(e)

    cmp_ = sub.add_parser("compare", help="the evaluation guide's method comparison (or --configs FILE)")
    _model_argument(cmp_)
    _run_options(cmp_)
    source = cmp_.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=("guide",), default="guide", help="the built-in set (default guide)")
    source.add_argument("--configs", default=None, help="YAML or JSON list of named configs")
    _experiment_options(cmp_, "sparsemix-compare")
    _misc_options(cmp_)

    sw = sub.add_parser("sweep", help="perplexity against bits for several methods (a Pareto plot)")
    _model_argument(sw)
    _run_options(sw)
    _prune_options(sw)
    _option(sw, "--targets", type=_floats, default=(2.5, 3, 3.5, 4, 4.5, 5), help="average bits (default 2.5,3,3.5,4,4.5,5)")
    _option(sw, "--methods", default="quantile,budget,uniform", help="bit methods (default quantile,budget,uniform)")
    _optimal_options(sw)
    _experiment_options(sw, "sparsemix-sweep")
    _misc_options(sw)

    ab = sub.add_parser("ablate", help="importance weights: each dimension alone, pairs, the default mix")
    _model_argument(ab)
    _run_options(ab)
    _prune_options(ab)
    _option(ab, "--bit-method", default="quantile", help="quantile (default) or budget")
    _option(ab, "--target-avg-bits", type=float, default=4.0, help="the one budget (default 4.0)")
    _option(ab, "--mix", action="append", default=[],
            help="an extra mix NAME:activation=0.5,hessian=0.5 (repeatable)")
    _experiment_options(ab, "sparsemix-ablate")
    _misc_options(ab)

    rp = sub.add_parser("report", help="redraw tables and plots from saved run records")
    rp.add_argument("results", nargs="+", help="run record JSON files, or folders of them (e.g. OUT/runs)")
    _option(rp, "--kind", default="compare", choices=EXPERIMENTS, help="which tables and plots (default compare)")
    _option(rp, "--out", default="sparsemix-report", help="output folder (default sparsemix-report)")
    _option(rp, "--lang", default="en", choices=("en", "zh"))
    _misc_options(rp)

    ex = sub.add_parser("export", help="pack a --save folder: bit-packed codes, fp16 grids, sparsity bitmask")
    ex.add_argument("result_dir", help="a folder written by compress --save")
    _option(ex, "--format", default="packed", choices=("packed",), help="output format (default packed)")
    _option(ex, "--out", default=None, help="output folder (default RESULT_DIR/packed)")
    _option(ex, "--overwrite", action="store_true", help="replace an existing --out folder")
    _misc_options(ex)

    gen = sub.add_parser("generate", help="greedy text from a packed model, with tokens/s")
    gen.add_argument("result_dir", help="an export folder, or a --save folder holding packed/")
    _option(gen, "--prompt", required=True)
    _option(gen, "--max-new-tokens", type=int, default=32)
    _option(gen, "--device", default="auto", help="cpu or cuda (default: cuda if available)")
    _misc_options(gen)
    return parser


def prune_config(args: argparse.Namespace, **extra) -> PruneConfig:
    if args.prunen and args.sparsity is not None:
        raise ConfigError("--sparsity and --prunen/--prunem exclude each other; give one of them")
    sparsity = 0.0 if args.prunen else (0.5 if args.sparsity is None else args.sparsity)
    return PruneConfig(sparsity=sparsity, prunen=args.prunen, prunem=args.prunem, **extra)


def compression_config(args: argparse.Namespace) -> CompressionConfig:
    weights = ImportanceWeights.parse(args.importance_weights) if args.importance_weights else ImportanceWeights()
    return CompressionConfig(
        prune=prune_config(args, blocksize=args.blocksize, percdamp=args.percdamp),
        quant=QuantConfig(sym=args.sym, mse=args.mse, group_size=args.group_size),
        allocation=AllocationConfig(method=args.bit_method, target_avg_bits=args.target_avg_bits,
                                    wbits=args.wbits, bit_options=parse_bit_options(args.bit_options),
                                    weights=weights, **_optimal_fields(args)),
        fused=not args.no_fused, forward_precision=args.forward_precision,
        true_sequential=not args.no_true_sequential,
    )


def run_config(args: argparse.Namespace, compression: CompressionConfig | None = None):
    from .pipeline import RunConfig

    calibration = {"calib": args.calib, "nsamples": args.nsamples, "seed": args.seed} if hasattr(args, "calib") else {}
    return RunConfig(model=args.model, compression=compression or CompressionConfig(), eval=args.eval,
                     seqlen=args.seqlen, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                     data_dir=args.data_dir, checkpoint_dir=getattr(args, "checkpoint_dir", None), **calibration)


def _check_writable(flag: str, value: str | None, overwrite: bool) -> None:
    """Refuse before hours of work, not after: existing outputs need --overwrite, and the place
    must really take a file (probed by writing one: permission bits alone do not tell root)."""
    if value is None:
        return
    path = Path(value)
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise ConfigError(f"{flag} {value} already exists; pass --overwrite or choose another path")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".sparsemix-probe-"):
            pass
    except OSError as error:
        raise ConfigError(f"{flag} {value}: cannot write in {parent} ({error.strerror}); choose a writable path") from None


def _experiment_configs(args: argparse.Namespace):
    from . import experiments

    if args.command == "compare":
        return experiments.load_configs(args.configs) if args.configs else experiments.guide_preset()
    if args.command == "sweep":
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        for method in methods:
            AllocationConfig(method=method, target_avg_bits=None if method != "budget" else 4.0)  # validates the name
        for target in args.targets:
            AllocationConfig(method="quantile", target_avg_bits=target)  # validates the range
        return experiments.sweep_configs(args.targets, methods, prune_config(args), **_optimal_fields(args))
    extra = {}
    for item in args.mix:
        name, sep, weights = item.partition(":")
        if not sep or not name:
            raise ConfigError(f"--mix {item!r}: write it as NAME:activation=0.5,hessian=0.5")
        extra[name] = ImportanceWeights.parse(weights)
    return experiments.ablation_configs(args.bit_method, args.target_avg_bits, prune_config(args), extra)


def _load_records(paths: list[str]) -> list[dict]:
    files = []
    for value in paths:
        path = Path(value)
        if path.is_dir():
            files += sorted(path.glob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{value}: no such file or folder; give run record JSON files or folders of them")
    records = [json.loads(f.read_text()) for f in files]
    records = [r for r in records if "perplexity" in r and "config" in r]
    if not records:
        raise ConfigError(f"no run records found in {', '.join(paths)}; point at OUT/runs or its JSON files")
    for record, f in zip(records, files):
        record.setdefault("name", f.stem)
    return records


def _packed_command(args: argparse.Namespace) -> int:
    import torch

    from . import packed

    if args.command == "export":
        _check_writable("--out", args.out or str(Path(args.result_dir) / "packed"), args.overwrite)
        print(json.dumps(packed.export_packed(args.result_dir, args.out)))
        return 0
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    result = packed.generate(args.result_dir, args.prompt, args.max_new_tokens, device)
    print(result["text"])
    print(json.dumps({key: result[key] for key in ("new_tokens", "seconds", "tokens_per_second", "warmup_seconds", "decoder")}))
    return 0


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from . import pipeline

    show = {"progress": not args.quiet, "echo": tqdm.write}
    if args.command in ("export", "generate"):
        return _packed_command(args)
    if args.command == "compress":
        _check_writable("--output", args.output, args.overwrite)
        _check_writable("--save", args.save, args.overwrite)
        if args.save_packed and not args.save:
            raise ConfigError("--save-packed packs what --save writes; give --save DIR too")
        _check_writable("--save-packed", args.save_packed, args.overwrite)
        model, tokenizer, record, result = pipeline.compress(run_config(args, compression_config(args)), **show,
                                                             lang=args.lang)
        if args.save:
            pipeline.save_compressed(model, tokenizer, args.save, record, result.bits, result.grids)
        if args.save_packed:
            from .packed import export_packed

            tqdm.write(json.dumps(export_packed(args.save, args.save_packed)))
    elif args.command == "eval":
        _check_writable("--output", args.output, args.overwrite)
        record = pipeline.evaluate_saved(run_config(args), **show)
    else:
        from . import experiments, reports

        if args.command == "report":
            records = _load_records(args.results)
            kind = args.kind
        else:
            configs = _experiment_configs(args)
            _check_writable("--out", args.out, overwrite=True)
            try:
                records = experiments.run_experiment(run_config(args), configs, args.out, args.force, **show)
            except KeyboardInterrupt:
                print(f"sparsemix: interrupted; finished configs are kept in {Path(args.out) / 'runs'};"
                      " rerun the same command to resume", file=sys.stderr)
                return 130
            kind = args.command
        for path in reports.write_report(records, args.out, kind=kind, lang=args.lang):
            print(f"wrote {path}")
        return 0
    if args.output:
        write_json(args.output, record)
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
    except FloatingPointError as error:
        if args.debug:
            raise
        print(f"sparsemix: numerical error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sparsemix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
