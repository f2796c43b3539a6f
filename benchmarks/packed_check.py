"""The packed export against the fake-quantised checkpoint it came from, one JSON line.

    python benchmarks/packed_check.py SAVE_DIR --data-dir DIR [--device cuda] [--corpus wikitext2]

SAVE_DIR is a ``sparsemix compress --save`` folder with ``packed/`` in it (``--save-packed``).
Reports both perplexities (they must be identical: the packed linears dequantise bit for bit),
the largest weight difference after dequantising, and file sizes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparsemix.data import eval_windows
from sparsemix.evaluation import perplexity
from sparsemix.models import load_model
from sparsemix.packed import PackedLinear, load_packed
from sparsemix.packing import dequantise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("save_dir")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--corpus", default="wikitext2")
    args = parser.parse_args()
    saved, tokenizer = load_model(args.save_dir)
    packed, _ = load_packed(args.save_dir, args.device)
    worst = 0.0
    reference = dict(saved.named_modules())
    for name, module in packed.named_modules():
        if isinstance(module, PackedLinear):
            weight = dequantise(module.packed()).to(reference[name].weight.dtype).cpu()
            worst = max(worst, float((weight - reference[name].weight.detach()).abs().max()))
    windows = eval_windows(args.corpus, tokenizer, 2048, args.data_dir)
    figures = {}
    for label, model in (("fake_quantised", saved.to(args.device)), ("packed", packed)):
        figures[label] = perplexity(model, windows, device=args.device).value
    files = {"checkpoint_bytes": sum(f.stat().st_size for f in Path(args.save_dir).glob("*.safetensors")),
             "packed_bytes": sum(f.stat().st_size for f in (Path(args.save_dir) / "packed").glob("*.safetensors"))}
    print(json.dumps({"corpus": args.corpus, "perplexity": figures, "identical": figures["packed"] ==
                      figures["fake_quantised"], "max_weight_difference": worst, **files,
                      "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}))


if __name__ == "__main__":
    main()
