import logging
import random

import pytest
import torch

from sparsemix.data import (CORPORA, CorpusNotFoundError, calibration_windows, eval_text,
                            eval_windows, resolve_data_dir)

SEQLEN = 32


def ids_of(tok, text):
    return torch.tensor(tok(text, verbose=False)["input_ids"])


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("SPARSEMIX_DATA", raising=False)


# ----------------------------------------------------------------------------- eval text

def test_eval_text_protocol(tiny_data_dir, tiny_corpus):
    t = tiny_corpus
    wiki = eval_text("wikitext2", tiny_data_dir)
    assert "\r" not in wiki
    assert wiki == "\n\n".join(t["wiki"])  # CRLF lines, line ends dropped, joined "\n\n"
    assert eval_text("ptb", tiny_data_dir) == " ".join(t["ptb"])
    assert eval_text("c4", tiny_data_dir) == " ".join(t["c4"][:1100])


# ----------------------------------------------------------------------------- eval windows

@pytest.mark.parametrize("name", CORPORA)
def test_eval_windows_are_consecutive_slices(name, tiny_data_dir, tiny_tokenizer):
    w = eval_windows(name, tiny_tokenizer, SEQLEN, tiny_data_dir)
    ids = ids_of(tiny_tokenizer, eval_text(name, tiny_data_dir))
    n = min(len(ids) // SEQLEN, 256 if name == "c4" else 10**9)
    assert w.dtype == torch.long and w.shape == (n, SEQLEN) and n >= 4
    assert torch.equal(w.flatten(), ids[: n * SEQLEN])  # non-overlapping, in order, tail dropped


def test_eval_windows_tail_dropped(tiny_data_dir, tiny_tokenizer):
    n_ids = len(ids_of(tiny_tokenizer, eval_text("ptb", tiny_data_dir)))
    seqlen = next(s for s in range(40, 80) if n_ids % s)  # a seqlen that leaves a tail
    assert eval_windows("ptb", tiny_tokenizer, seqlen, tiny_data_dir).shape == (n_ids // seqlen, seqlen)


def test_c4_eval_capped_at_256_windows(tiny_data_dir, tiny_tokenizer):
    n_ids = len(ids_of(tiny_tokenizer, eval_text("c4", tiny_data_dir)))
    assert n_ids // 16 > 256  # the cap matters at this seqlen
    w = eval_windows("c4", tiny_tokenizer, 16, tiny_data_dir)
    assert w.shape == (256, 16)
    assert len(eval_windows("wikitext2", tiny_tokenizer, 4, tiny_data_dir)) > 256  # no cap for others


def test_eval_windows_too_short_text(tiny_data_dir, tiny_tokenizer):
    with pytest.raises(ValueError, match="seqlen"):
        eval_windows("wikitext2", tiny_tokenizer, 10**6, tiny_data_dir)


def test_no_max_length_warning(tiny_data_dir, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)  # fresh: HF warns once per tokenizer
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.tokenization_utils_base")
    logger.addHandler(handler)
    try:
        eval_windows("wikitext2", tok, SEQLEN, tiny_data_dir)
        calibration_windows("c4", tok, 4, SEQLEN, data_dir=tiny_data_dir)
        assert not [r for r in records if "maximum sequence length" in r.getMessage()]
        tok(eval_text("ptb", tiny_data_dir))  # the check above can see the warning
        assert [r for r in records if "maximum sequence length" in r.getMessage()]
    finally:
        logger.removeHandler(handler)


# ----------------------------------------------------------------------------- calibration

def test_c4_calibration_protocol(tiny_data_dir, tiny_tokenizer, tiny_corpus):
    """Docs 1100.. joined "\\n\\n", tokenized once, offsets as random.seed(seed); randint(0, n-seqlen-1)."""
    c = calibration_windows("c4", tiny_tokenizer, 8, SEQLEN, seed=3, data_dir=tiny_data_dir)
    assert c.dtype == torch.long and c.shape == (8, SEQLEN)
    ids = ids_of(tiny_tokenizer, "\n\n".join(tiny_corpus["c4"][1100:]))
    random.seed(3)
    starts = [random.randint(0, len(ids) - SEQLEN - 1) for _ in range(8)]
    assert torch.equal(c, torch.stack([ids[i : i + SEQLEN] for i in starts]))


def test_calibration_deterministic_per_seed(tiny_data_dir, tiny_tokenizer):
    a = calibration_windows("c4", tiny_tokenizer, 8, SEQLEN, seed=0, data_dir=tiny_data_dir)
    random.seed(123)  # the global RNG state does not matter ...
    b = calibration_windows("c4", tiny_tokenizer, 8, SEQLEN, seed=0, data_dir=tiny_data_dir)
    assert torch.equal(a, b)
    c = calibration_windows("c4", tiny_tokenizer, 8, SEQLEN, seed=1, data_dir=tiny_data_dir)
    assert not torch.equal(a, c)
    assert calibration_windows("c4", tiny_tokenizer, 8, SEQLEN, data_dir=tiny_data_dir).equal(a)  # seed 0


def test_calibration_never_reads_eval_docs(tmp_path, tiny_tokenizer, tiny_corpus, make_data_dir):
    t = dict(tiny_corpus)
    t["c4"] = [f"{doc} Zanzibar" for doc in t["c4"][:1100]] + t["c4"][1100:]  # marker in every eval doc
    d = make_data_dir(tmp_path, t)
    assert "Zanzibar" in tiny_tokenizer.decode(eval_windows("c4", tiny_tokenizer, SEQLEN, d)[0])
    c = calibration_windows("c4", tiny_tokenizer, 200, SEQLEN, data_dir=d)
    assert not any("Zanzibar" in tiny_tokenizer.decode(w) for w in c)
    # and doc 1099 (last eval doc) is not in the calibration text: it starts with doc 1100
    c_ids = ids_of(tiny_tokenizer, "\n\n".join(t["c4"][1100:]))
    c = calibration_windows("c4", tiny_tokenizer, 64, SEQLEN, data_dir=d)
    random.seed(0)
    assert torch.equal(c[0], c_ids[(i := random.randint(0, len(c_ids) - SEQLEN - 1)) : i + SEQLEN])


@pytest.mark.parametrize("name,train_file,sep", [("wikitext2", "wiki.train.raw", "\n\n"),
                                                   ("ptb", "ptb.train.txt", " ")])
def test_offline_train_file_calibration(tmp_path, tiny_tokenizer, tiny_corpus, name, train_file, sep):
    lines = tiny_corpus["c4"][:300]  # any lines; only the train file is needed
    (tmp_path / train_file).write_bytes("".join(l + "\r\n" for l in lines).encode())
    c = calibration_windows(name, tiny_tokenizer, 8, SEQLEN, seed=5, data_dir=tmp_path)
    ids = ids_of(tiny_tokenizer, sep.join(lines))
    random.seed(5)
    starts = [random.randint(0, len(ids) - SEQLEN - 1) for _ in range(8)]
    assert torch.equal(c, torch.stack([ids[i : i + SEQLEN] for i in starts]))


@pytest.mark.parametrize("name,train_file", [("wikitext2", "wiki.train.raw"), ("ptb", "ptb.train.txt")])
def test_missing_train_file(tiny_data_dir, tiny_tokenizer, name, train_file):
    with pytest.raises(CorpusNotFoundError) as e:
        calibration_windows(name, tiny_tokenizer, 4, SEQLEN, data_dir=tiny_data_dir)
    msg = str(e.value)
    assert "\n" not in msg and str(tiny_data_dir / train_file) in msg and "--calib c4" in msg


def test_missing_c4_calibration_file_does_not_suggest_c4(tiny_data_dir, tiny_tokenizer, tmp_path):
    only_eval = tmp_path / "data"
    only_eval.mkdir()
    (only_eval / "wiki.test.raw").write_text((tiny_data_dir / "wiki.test.raw").read_text())
    with pytest.raises(CorpusNotFoundError) as e:
        calibration_windows("c4", tiny_tokenizer, 4, SEQLEN, data_dir=only_eval)
    assert "c4_validation_2k.parquet" in str(e.value) and "--calib c4" not in str(e.value)


def test_missing_data_dir_is_named(tiny_tokenizer, tmp_path):
    with pytest.raises(CorpusNotFoundError) as e:
        calibration_windows("c4", tiny_tokenizer, 4, SEQLEN, data_dir=tmp_path / "nowhere")
    assert f"data dir {tmp_path / 'nowhere'} does not exist" in str(e.value) and "--data-dir" in str(e.value)


# ----------------------------------------------------------------------------- data dir, errors

def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("SPARSEMIX_DATA", raising=False)
    assert resolve_data_dir(None) is None
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("SPARSEMIX_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path) == tmp_path  # the explicit argument wins
    monkeypatch.setenv("SPARSEMIX_DATA", "")
    assert resolve_data_dir(None) is None


def test_env_data_dir_honoured(monkeypatch, tiny_data_dir, tiny_tokenizer, tiny_corpus):
    monkeypatch.setenv("SPARSEMIX_DATA", str(tiny_data_dir))
    assert eval_text("ptb") == " ".join(tiny_corpus["ptb"])
    assert torch.equal(calibration_windows("c4", tiny_tokenizer, 4, SEQLEN),
                       calibration_windows("c4", tiny_tokenizer, 4, SEQLEN, data_dir=tiny_data_dir))


@pytest.mark.parametrize("name,file", [("wikitext2", "wiki.test.raw"), ("ptb", "ptb.test.txt"),
                                       ("c4", "c4_validation_2k.parquet")])
def test_missing_corpus_message(tmp_path, tiny_tokenizer, name, file):
    with pytest.raises(CorpusNotFoundError) as e:
        eval_windows(name, tiny_tokenizer, SEQLEN, tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "\n" not in msg and name in msg and str(tmp_path / file) in msg
    assert "--data-dir" in msg and "SPARSEMIX_DATA" in msg and "online" in msg


def test_unknown_corpus(tiny_data_dir, tiny_tokenizer):
    for call in (lambda: eval_text("wiki2", tiny_data_dir),
                 lambda: eval_windows("c5", tiny_tokenizer, SEQLEN, tiny_data_dir),
                 lambda: calibration_windows("pile", tiny_tokenizer, 4, SEQLEN, data_dir=tiny_data_dir)):
        with pytest.raises(ValueError) as e:
            call()
        assert "\n" not in str(e.value) and all(c in str(e.value) for c in CORPORA)


# ----------------------------------------------------------------------------- online (faked hub)

def test_online_load_failure_is_corpus_not_found(monkeypatch, no_env, tiny_tokenizer):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub\nsecond line")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in CORPORA:
        with pytest.raises(CorpusNotFoundError) as e:
            eval_text(name)
        assert "\n" not in str(e.value) and "online" in str(e.value) and "--data-dir" in str(e.value)
    with pytest.raises(CorpusNotFoundError):
        calibration_windows("c4", tiny_tokenizer, 4, SEQLEN)


def test_online_paths(monkeypatch, no_env, tiny_tokenizer, tiny_corpus):
    """The online branch asks for the right datasets/splits/fields (hub replaced by in-memory data)."""
    import datasets

    t = tiny_corpus
    calls = []

    def fake(path, name=None, *, split, data_files=None):
        calls.append((path, name, split, data_files))
        if path == "wikitext":
            return datasets.Dataset.from_dict({"text": t["wiki"]})
        if path == "ptb_text_only":
            return datasets.Dataset.from_dict({"sentence": t["ptb"]})
        assert path == "allenai/c4" and list(data_files) == [split]
        return datasets.Dataset.from_dict({"text": t["c4"]})
    monkeypatch.setattr(datasets, "load_dataset", fake)

    assert eval_text("wikitext2") == "\n\n".join(t["wiki"])
    assert eval_text("ptb") == " ".join(t["ptb"])
    assert eval_text("c4") == " ".join(t["c4"][:1100])
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test", None), ("ptb_text_only", "penn_treebank", "test", None),
                     ("allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"})]
    calls.clear()
    w = calibration_windows("wikitext2", tiny_tokenizer, 4, SEQLEN)
    assert w.shape == (4, SEQLEN) and calls[-1][:3] == ("wikitext", "wikitext-2-raw-v1", "train")
    # GPTQ get_c4: a random doc with more than seqlen tokens, a random window of it
    short = sum(len(ids_of(tiny_tokenizer, doc)) <= 16 for doc in t["c4"])
    assert 500 < short < 1500  # both kinds of doc are drawn
    c = calibration_windows("c4", tiny_tokenizer, 16, 16, seed=2)
    assert c.shape == (16, 16) and calls[-1][3] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    assert torch.equal(c, calibration_windows("c4", tiny_tokenizer, 16, 16, seed=2))
    assert all(any(tiny_tokenizer.decode(w) in doc for doc in t["c4"]) for w in c)


class CharTokenizer:
    """One token per character, enough of the tokenizer interface for data.py."""

    def __call__(self, text, return_tensors=None, **kwargs):
        return type("Encoding", (), {"input_ids": torch.tensor([[ord(ch) for ch in text]])})()


def test_calibration_offsets_exactly_gptq(tmp_path):
    """i = randint(0, n - seqlen - 1), GPTQ's range (one short of the last possible start);
    n - seqlen = 64 makes that range 6 bits, so a range of 65 would draw other numbers."""
    (tmp_path / "ptb.train.txt").write_text("".join(chr(0x4E00 + k) for k in range(SEQLEN + 64)))
    c = calibration_windows("ptb", CharTokenizer(), 50, SEQLEN, seed=4, data_dir=tmp_path)
    random.seed(4)
    starts = [random.randint(0, 63) for _ in range(50)]
    assert c[:, 0].tolist() == [0x4E00 + i for i in starts]
    assert torch.equal(c - c[:, :1], torch.arange(SEQLEN).expand(50, -1))
