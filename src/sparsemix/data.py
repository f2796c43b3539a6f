"""Text corpora for calibration and evaluation, following the GPTQ / SparseGPT protocol.

Evaluation (seqlen tokens per window, non-overlapping, the tail dropped):
  wikitext2  test lines joined with "\\n\\n"
  ptb        test lines joined with " "
  c4         the first 1,100 validation documents joined with " ", first 256 windows only
Calibration: nsamples windows at random offsets (seeded) of the train text. Offline, c4 uses
documents 1,100..1,999 of the local validation parquet, never the evaluation documents.

Offline (a data dir from --data-dir or env SPARSEMIX_DATA) the files are read from that dir:
  wiki.test.raw, ptb.test.txt, c4_validation_2k.parquet  (+ wiki.train.raw, ptb.train.txt
  for wikitext2/ptb calibration). Online (no data dir) the same corpora come from HF datasets.
"""

import functools
import os
import pathlib
import random

import torch

CORPORA = ("wikitext2", "ptb", "c4")
C4_EVAL_DOCS = 1100  # documents 0..1099 of c4 validation are for evaluation only
C4_EVAL_WINDOWS = 256

FILES = {  # corpus -> split -> file name in the data dir
    "wikitext2": {"test": "wiki.test.raw", "train": "wiki.train.raw"},
    "ptb": {"test": "ptb.test.txt", "train": "ptb.train.txt"},
    "c4": {"test": "c4_validation_2k.parquet", "train": "c4_validation_2k.parquet"},
}
SEP = {"wikitext2": "\n\n", "ptb": " "}  # how lines are joined
HF = {  # corpus -> (load_dataset args, text field)
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "text"),
    "ptb": (("ptb_text_only", "penn_treebank"), "sentence"),
}
C4_HF_FILES = {"validation": "en/c4-validation.00000-of-00008.json.gz",
               "train": "en/c4-train.00000-of-01024.json.gz"}
HOW = "pass --data-dir DIR or set SPARSEMIX_DATA=DIR"


class CorpusNotFoundError(FileNotFoundError):
    """A corpus is neither in the data dir nor loadable online. The message is one line."""


def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path | None:
    """The data dir: the explicit argument, else env SPARSEMIX_DATA, else None (= online)."""
    data_dir = data_dir or os.environ.get("SPARSEMIX_DATA") or None
    return None if data_dir is None else pathlib.Path(data_dir).expanduser()


def _check(name):
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")


# ----------------------------------------------------------------------------- reading files

@functools.lru_cache(maxsize=8)
def _read_lines(path: str, mtime_ns: int) -> tuple[str, ...]:
    """The file's lines, without line ends (CRLF folded to LF); mtime_ns only keys the cache."""
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read().replace("\r\n", "\n")
    return tuple(text.removesuffix("\n").split("\n"))


@functools.lru_cache(maxsize=4)
def _read_docs(path: str, mtime_ns: int) -> tuple[str, ...]:
    """The `text` column of a parquet file."""
    import pyarrow.parquet as pq
    return tuple(pq.read_table(path, columns=["text"]).column("text").to_pylist())


def _local(d, name, split):
    if not d.is_dir():
        raise CorpusNotFoundError(f"data dir {d} does not exist; {HOW} to the folder holding the corpora")
    path = d / FILES[name][split]
    if not path.is_file():
        if split == "train":
            instead = "" if name == "c4" else ", use --calib c4"  # c4's calibration split is the one kept
            raise CorpusNotFoundError(
                f"{name} calibration needs {path}, which is missing (only test splits are kept "
                f"offline); add {path.name} there{instead}, or give no data dir "
                f"(neither --data-dir nor SPARSEMIX_DATA) to load the train split online")
        raise CorpusNotFoundError(
            f"{name}: {path} not found; {HOW} to a folder holding {path.name}, "
            f"or give neither to load {name} online via Hugging Face datasets")
    reader = _read_docs if path.suffix == ".parquet" else _read_lines
    return reader(str(path), path.stat().st_mtime_ns)


def _online(name, split):
    """A Hugging Face dataset split; split is "test", "validation" or "train"."""
    try:
        import datasets
        if name == "c4":
            return datasets.load_dataset("allenai/c4", data_files={split: C4_HF_FILES[split]}, split=split)
        args, _ = HF[name]
        return datasets.load_dataset(*args, split=split)
    except Exception as e:
        why = (str(e).strip().splitlines() or [""])[0]
        raise CorpusNotFoundError(
            f"{name}: no data dir given and loading the {split} split online via Hugging Face "
            f"datasets failed ({type(e).__name__}: {why}); {HOW} to a folder with local copies "
            f"(e.g. {FILES[name]['test']})") from e


# ----------------------------------------------------------------------------- texts

def eval_text(name: str, data_dir=None) -> str:
    """The joined evaluation text of a corpus (c4: the first 1,100 validation docs joined with " ")."""
    _check(name)
    d = resolve_data_dir(data_dir)
    if name == "c4":
        docs = _local(d, name, "test") if d else _online(name, "validation")[:C4_EVAL_DOCS]["text"]
        return " ".join(docs[:C4_EVAL_DOCS])
    lines = _local(d, name, "test") if d else _online(name, "test")[HF[name][1]]
    return SEP[name].join(lines)


def _train_text(name, d):
    """The joined calibration text, from the data dir d (c4: validation docs 1,100.. joined "\\n\\n")."""
    if name == "c4":
        return "\n\n".join(_local(d, name, "train")[C4_EVAL_DOCS:])
    lines = _local(d, name, "train") if d else _online(name, "train")[HF[name][1]]
    return SEP[name].join(lines)


def _tokenize(tokenizer, text) -> torch.LongTensor:
    """The whole text tokenized in one call, as a 1-D tensor; no "longer than max length" warning."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids[0].long()


# ----------------------------------------------------------------------------- windows

def eval_windows(name: str, tokenizer, seqlen: int, data_dir=None) -> torch.LongTensor:
    """Evaluation tokens as [n_windows, seqlen]: consecutive non-overlapping windows of the
    tokenized eval_text, the tail dropped; c4 keeps only the first 256 windows."""
    ids = _tokenize(tokenizer, eval_text(name, data_dir))
    n = ids.numel() // seqlen
    if name == "c4":
        n = min(n, C4_EVAL_WINDOWS)
    if n == 0:
        raise ValueError(f"{name}: {ids.numel()} tokens, fewer than one window of seqlen {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def _random_windows(ids, nsamples, seqlen, rng):
    """[nsamples, seqlen] windows ids[i:i+seqlen], i = rng.randint(0, len - seqlen - 1), as GPTQ."""
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, needs more than seqlen {seqlen}")
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[i : i + seqlen] for i in starts])


def _c4_online_calibration(tokenizer, nsamples, seqlen, rng):
    """GPTQ's get_c4: per sample a random train doc longer than seqlen tokens, at a random offset."""
    docs = _online("c4", "train")
    out = []
    for _ in range(nsamples):
        while True:
            ids = _tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)]["text"])
            if ids.numel() > seqlen:  # GPTQ's test; randint below needs at least seqlen + 1 tokens
                break
        i = rng.randint(0, ids.numel() - seqlen - 1)
        out.append(ids[i : i + seqlen])
    return torch.stack(out)


def calibration_windows(name: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                        data_dir=None) -> torch.LongTensor:
    """Calibration tokens as [nsamples, seqlen]: windows at random offsets of the train text,
    drawn as GPTQ does after random.seed(seed) (a private random.Random(seed) gives the same
    draws without touching the global RNG). Never uses the c4 evaluation documents."""
    _check(name)
    d = resolve_data_dir(data_dir)
    rng = random.Random(seed)
    if name == "c4" and d is None:
        return _c4_online_calibration(tokenizer, nsamples, seqlen, rng)
    return _random_windows(_tokenize(tokenizer, _train_text(name, d)), nsamples, seqlen, rng)
