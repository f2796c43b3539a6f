"""Export, load and generate with the packed format on tiny models, through the CLI as a user would."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_end_to_end import sparsemix
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from sparsemix.config import ConfigError
from sparsemix.packed import (PACKED_FILE, ExportError, PackedLinear, cache_argument, export_packed, generate,
                              greedy_static, load_packed)

RUNS = {  # family -> compress options: mixed widths with a bitmask; 2:4 with groups and biases (OPT)
    "llama": ["--sparsity", "0.5", "--bit-method", "budget", "--target-avg-bits", "3.5"],
    "opt": ["--prunen", "2", "--prunem", "4", "--bit-method", "quantile", "--group-size", "16"],
}


@pytest.fixture(scope="module")
def saved(tiny_model_dirs, tiny_data_dir, tmp_path_factory):
    """family -> (--save folder, packed folder, export JSON): llama packed by --save-packed, opt by export."""
    root = tmp_path_factory.mktemp("packed")
    runs = {}
    for family, options in RUNS.items():
        save, packed = root / f"save-{family}", root / f"packed-{family}"
        extra = ["--save-packed", str(packed)] if family == "llama" else []
        proc = sparsemix("compress", tiny_model_dirs[family], "--data-dir", tiny_data_dir, "--nsamples", "8",
                         "--seqlen", "32", "--eval", "none", "--batch-size", "4", "--save", str(save), "--quiet",
                         *options, *extra)
        assert proc.returncode == 0, proc.stderr
        if family == "opt":
            proc = sparsemix("export", str(save), "--format", "packed")
            assert proc.returncode == 0, proc.stderr
            packed = save / "packed"
        report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
        runs[family] = (save, packed, report)
    return runs


@pytest.mark.parametrize("family", list(RUNS))
def test_packed_model_is_the_fake_quantised_model_at_the_reported_size(family, saved):
    save, packed, report = saved[family]
    assert report["bit_exact"] and abs(report["ratio"] - 1) < 0.01
    assert report["file_bytes"] == (packed / PACKED_FILE).stat().st_size > report["packed_linear_bytes"]
    with safe_open(str(packed / PACKED_FILE), "pt") as f:
        header = json.loads(f.metadata()["sparsemix"])
    linears = 14 if family == "llama" else 12  # 7 or 6 per layer, 2 layers
    assert (header["format"], header["version"], len(header["linears"])) == ("sparsemix-packed", 1, linears)
    model, _ = load_packed(packed)
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == len(header["linears"])
    reference = AutoModelForCausalLM.from_pretrained(save).eval()
    ids = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)  # hence the same perplexity


def test_generate_speaks_like_the_fake_quantised_model(saved):
    save, _, _ = saved["opt"]
    out = generate(save, "The city of", max_new_tokens=6)  # finds save/packed
    reference = AutoModelForCausalLM.from_pretrained(save).eval()
    tokenizer = AutoTokenizer.from_pretrained(save)
    ids = tokenizer("The city of", return_tensors="pt").input_ids
    expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    assert out["tokens"] == expected and out["tokens_per_second"] > 0
    proc = sparsemix("generate", str(save), "--prompt", "The city of", "--max-new-tokens", "4", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    text, figures = proc.stdout.strip().splitlines()[-2:]
    assert text.startswith("The city of") and json.loads(figures)["tokens_per_second"] > 0


@pytest.mark.parametrize("family", list(RUNS))
def test_static_cache_decoding_matches_generate(family, saved):
    """The decode loop a CUDA graph captures on the GPU, run eagerly: the tokens of model.generate, and
    in its cache the keys and values a plain forward over the same tokens computes, slot by slot."""
    from transformers import StaticCache

    _, packed, _ = saved[family]
    model, tokenizer = load_packed(packed)
    ids = tokenizer("The city of the river and the", return_tensors="pt").input_ids
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 8)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
        new, how = greedy_static(model, ids, 8, graph=False, cache=cache)
        assert new == expected and how == "static cache, eager steps"
        fed = torch.cat([ids, torch.tensor([new[:-1]])], 1)  # the last token is never fed back
        reference = DynamicCache(config=model.config)
        model(fed, **cache_argument(model, reference))
    n = fed.shape[1]
    for layer, expected_layer in zip(cache.layers, reference.layers, strict=True):
        torch.testing.assert_close(layer.keys[:, :, :n], expected_layer.keys)
        torch.testing.assert_close(layer.values[:, :, :n], expected_layer.values)
        assert not layer.keys[:, :, n:].any()  # nothing written past the last token fed


def test_export_refuses_what_it_cannot_pack_exactly(saved, tmp_path):
    save, _, _ = saved["llama"]
    old = tmp_path / "old"
    shutil.copytree(save, old)
    (old / "sparsemix_grids.safetensors").unlink()
    proc = sparsemix("export", str(old))
    assert proc.returncode == 2 and "recompress" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = sparsemix("export", str(save), "--format", "gguf")
    assert proc.returncode == 2 and "invalid choice: 'gguf'" in proc.stderr
    tampered = tmp_path / "tampered"
    shutil.copytree(save, tampered, ignore=shutil.ignore_patterns("packed"))
    state = load_file(str(tampered / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][3, 5] += 1e-3
    save_file(state, str(tampered / "model.safetensors"), {"format": "pt"})
    with pytest.raises(ExportError, match="model.layers.1.mlp.up_proj does not dequantise bit for bit"):
        export_packed(tampered)
    with pytest.raises(ConfigError, match="sparsemix export"):
        load_packed(tampered)
