"""Shared fixtures: a tiny offline data dir (same layout as shared/data) and a tiny real tokenizer."""

import os
import random

import torch

if not torch.cuda.is_available():  # Triton kernels run in its CPU interpreter; must be set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

WORDS = """the of and to in a is was for on as with by he it at from his an were are which this
be or has had not but first new one their its after also they two been who her she there
time would into during more other most some all city film year world war state game season
river music album team school church house people country family company station series
album song band king army group line road park island north south early later known made
played became began called found built won took released based including between under
while where when since many several small large great high long old local national public
""".split()
NAMES = "Robert Mary London Paris Ontario Boulter Harris Victoria Ashford Kensington".split()


def sentence(rng: random.Random, lo=6, hi=18) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    if rng.random() < 0.5:
        words.insert(rng.randrange(len(words)), rng.choice(NAMES))
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), str(rng.randint(1800, 2020)))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([" .", " .", " .", " ;"])


def tiny_texts(seed: int = 0) -> dict[str, list]:
    """Deterministic English-like text: wiki lines, ptb sentences and 2,000 short c4 docs."""
    rng = random.Random(seed)
    wiki = []
    for a in range(8):  # articles: a heading then a few paragraphs, lines start with a space
        wiki.append(f" = {rng.choice(NAMES)} {rng.choice(WORDS)} = ")
        wiki += [" " + " ".join(sentence(rng) for _ in range(rng.randint(2, 4))) + " " for _ in range(3)]
    ptb = [" " + " ".join(rng.choice(WORDS + ["<unk>", "N", "$"]) for _ in range(rng.randint(5, 20))) + " "
           for _ in range(150)]
    c4 = [" ".join(sentence(rng, 3, 8)[:-2] + "." for _ in range(rng.randint(1, 2))) for _ in range(2000)]
    return {"wiki": wiki, "ptb": ptb, "c4": c4}


def write_data_dir(path, texts):
    """Write texts (as from tiny_texts) into path in the layout of shared/data; returns path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    (path / "wiki.test.raw").write_bytes("".join(l + "\r\n" for l in texts["wiki"]).encode())
    (path / "ptb.test.txt").write_text("\n".join(texts["ptb"]), encoding="utf-8")
    n = len(texts["c4"])
    table = pa.table({"text": texts["c4"],
                      "url": [f"https://example.com/doc/{i}" for i in range(n)],
                      "timestamp": [f"2019-04-{1 + i % 28:02d}T12:00:00Z" for i in range(n)]})
    pq.write_table(table, path / "c4_validation_2k.parquet")
    return path


@pytest.fixture(scope="session")
def tiny_corpus():
    """The texts of tiny_data_dir: {"wiki": lines, "ptb": lines, "c4": 2,000 docs}; copy before changing."""
    return tiny_texts()


@pytest.fixture(scope="session")
def make_data_dir():
    """write_data_dir(path, texts): a data dir with your own texts (e.g. a changed copy of tiny_corpus)."""
    return write_data_dir


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A data dir like shared/data (wiki.test.raw with CRLF, ptb.test.txt, c4_validation_2k.parquet
    with 2,000 docs), small: with tiny_tokenizer at seqlen 32 every eval corpus has >= 4 windows."""
    return write_data_dir(tmp_path_factory.mktemp("data"), tiny_texts())


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A folder with a byte-level BPE tokenizer (vocab 512, <unk> <s> </s> <pad>, no BOS added,
    model_max_length 128) trained on the tiny corpus, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = tiny_texts()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts["wiki"] + texts["ptb"] + texts["c4"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", model_max_length=128)
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer, loaded the real way: AutoTokenizer.from_pretrained(dir)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def build_tiny_model(family: str, vocab_size: int, seed: int = 0):
    """A random two-layer OPT or Llama small enough to compress in a second on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    torch.manual_seed(seed)
    if family == "opt":
        config = OPTConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                           num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)
    else:
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer):
    """{'opt': dir, 'llama': dir}: checkpoints with tokenizer, loadable by from_pretrained."""
    dirs = {}
    for family in ("opt", "llama"):
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        build_tiny_model(family, len(tiny_tokenizer)).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        dirs[family] = str(path)
    return dirs
