"""Robustness: resumable runs, determinism, atomic output, numerical failures named, bad input refused."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

from sparsemix.allocation import allocate_bits
from sparsemix.config import AllocationConfig, CompressionConfig, PruneConfig
from sparsemix.data import calibration_windows
from sparsemix.driver import compress_model
from sparsemix.models import load_model
from sparsemix.quantizer import grid_params, maxq_for_bits, quantize

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sparsemix.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=300, **kw)


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory, tiny_tokenizer):
    """A 12-layer model: slow enough to be killed between two layers."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=128, intermediate_size=512,
                         num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    path = tmp_path_factory.mktemp("deep")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def test_sigkill_then_rerun_resumes_to_the_identical_result(deep_model_dir, tiny_data_dir, tmp_path):
    args = ["compress", deep_model_dir, "--data-dir", str(tiny_data_dir), "--nsamples", "32", "--seqlen", "64",
            "--bit-method", "budget", "--target-avg-bits", "3.5", "--eval", "none", "--quiet"]
    reference = cli(*args, "--save", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr

    checkpoints, progress = tmp_path / "ckpt", tmp_path / "ckpt" / "progress.json"
    command = [sys.executable, "-m", "sparsemix.cli", *args, "--checkpoint-dir", str(checkpoints),
               "--save", str(tmp_path / "resumed")]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file():
            done = json.loads(progress.read_text())["layers_done"]
            if done >= 2:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and 2 <= done < 12, (proc.returncode, done)
    assert not (tmp_path / "resumed").exists()

    resumed = cli(*args, "--checkpoint-dir", str(checkpoints), "--save", str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "reference" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bits_a = load_file(str(tmp_path / "reference" / "sparsemix_bits.safetensors"))
    bits_b = load_file(str(tmp_path / "resumed" / "sparsemix_bits.safetensors"))
    assert all(torch.equal(bits_a[k], bits_b[k]) for k in bits_a)
    summary = json.loads((tmp_path / "resumed" / "sparsemix.json").read_text())["summary"]
    expected = json.loads((tmp_path / "reference" / "sparsemix.json").read_text())["summary"]
    for key in expected.keys() - {"seconds"}:  # seconds differ, figures do not
        assert summary[key] == expected[key], key


def test_checkpoint_of_another_run_is_refused(deep_model_dir, tiny_data_dir, tmp_path):
    base = ["compress", deep_model_dir, "--data-dir", str(tiny_data_dir), "--nsamples", "4", "--seqlen", "32",
            "--eval", "none", "--quiet", "--checkpoint-dir", str(tmp_path)]
    assert cli(*base, "--wbits", "4", "--bit-method", "uniform").returncode == 0
    other = cli(*base, "--wbits", "3", "--bit-method", "uniform")
    assert other.returncode == 2 and "holds another run" in other.stderr


def test_same_seed_same_result(tiny_model_dirs, tiny_data_dir):
    weights = []
    for _ in range(2):
        model, tokenizer = load_model(tiny_model_dirs["llama"])
        windows = calibration_windows("c4", tokenizer, 8, 32, 0, tiny_data_dir)
        config = CompressionConfig(PruneConfig(0.5), allocation=AllocationConfig(method="quantile", target_avg_bits=3.5))
        result = compress_model(model, windows, config, batch_size=4)
        weights.append(({k: v.clone() for k, v in model.state_dict().items()}, result.bits))
    (w1, b1), (w2, b2) = weights
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert all(torch.equal(b1[k], b2[k]) for k in b1)


def test_non_finite_activations_stop_the_run_naming_the_layer(tiny_model_dirs, tiny_data_dir, tmp_path):
    model, tokenizer = load_model(tiny_model_dirs["llama"])
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[0] = float("nan")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    proc = cli("compress", str(tmp_path), "--data-dir", str(tiny_data_dir), "--nsamples", "4", "--seqlen", "32",
               "--eval", "none", "--quiet")
    assert proc.returncode == 1
    assert "layers.1.self_attn.q_proj: non-finite calibration input" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_save_is_atomic(tiny_model_dirs, tiny_data_dir, tmp_path, monkeypatch):
    from sparsemix import pipeline

    model, tokenizer = load_model(tiny_model_dirs["opt"])
    target = tmp_path / "saved"
    target.mkdir()
    (target / "old.txt").write_text("previous run")

    def broken(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing

    monkeypatch.setattr(type(tokenizer), "save_pretrained", broken)
    with pytest.raises(KeyboardInterrupt):
        pipeline.save_compressed(model, tokenizer, target, {"x": 1}, {})
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no staging folder left behind
    monkeypatch.undo()
    pipeline.save_compressed(model, tokenizer, target, {"x": 1}, {})
    assert not (target / "old.txt").exists() and (target / "sparsemix.json").is_file()


def test_json_output_is_atomic(tmp_path, monkeypatch):
    from sparsemix.files import write_json

    path = tmp_path / "r.json"
    write_json(path, {"a": 1})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "-0.1"], "sparsity -0.1 is outside [0, 1)"),
    (["--prunen", "4", "--prunem", "4"], "N:M needs 0 < N < M"),
    (["--prunen", "2"], "needs both --prunen and --prunem"),
    (["--bit-options", ""], "bit options are empty"),
    (["--bit-options", "4,2"], "not sorted"),
    (["--bit-options", "2,2,4"], "duplicates"),
    (["--bit-options", "2,12"], "1..8 or 16"),
    (["--importance-weights", "activation=-1,weight=1"], "negative"),
    (["--importance-weights", "activation=0"], "all zero"),
    (["--bit-method", "budget"], "needs a target"),
    (["--output", "/proc/forbidden/out.json"], "cannot write in /proc"),
])
def test_each_bad_input_is_one_line(args, message, tiny_model_dirs, tiny_data_dir):
    proc = cli("compress", tiny_model_dirs["opt"], "--data-dir", str(tiny_data_dir), "--eval", "none",
               "--seqlen", "32", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("sparsemix: error:") and message in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr


def test_missing_model_says_where_it_looked(tmp_path):
    proc = cli("compress", "no-such-org/no-such-model", "--eval", "none")
    assert proc.returncode == 2
    assert "Hugging Face hub (offline: HF_HUB_OFFLINE is set)" in proc.stderr
    proc = cli("compress", str(tmp_path / "missing.gguf"), "--eval", "none")
    assert proc.returncode == 2 and "GGUF file" in proc.stderr


def test_debug_shows_the_traceback(tiny_model_dirs):
    proc = cli("compress", tiny_model_dirs["opt"], "--sparsity", "2", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def degenerate_rows():
    finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
    return st.one_of(
        st.lists(finite, min_size=1, max_size=32),                       # random
        st.integers(1, 32).map(lambda n: [0.0] * n),                     # all zeros
        st.tuples(finite, st.integers(1, 32)).map(lambda t: [t[0]] * t[1]),  # constant
        st.tuples(st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=31), st.floats(1e3, 1e4, width=32))
          .map(lambda t: t[0] + [t[1]]),                                 # one huge outlier
        st.lists(st.sampled_from([1.0, 1.0000001, 1.0000002]), min_size=1, max_size=32),  # tiny range
    )


@settings(max_examples=300, deadline=None)
@given(degenerate_rows(), st.sampled_from([2, 3, 4, 6, 8]), st.booleans(), st.booleans())
def test_quantizer_on_degenerate_rows(values, bits, sym, mse):
    w = torch.tensor([values], dtype=torch.float32)
    maxq = maxq_for_bits(torch.tensor([bits]))
    scale, zero = grid_params(w, maxq, sym=sym, mse=mse)
    q = quantize(w, scale, zero, maxq[:, None])
    assert torch.isfinite(q).all() and float(scale) > 0
    assert q.unique().numel() <= 2**bits
    assert float((q - w).abs().max()) <= float(w.abs().max()) + 1e-6  # never further than the row's size


@settings(max_examples=150, deadline=None)
@given(st.one_of(
    st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=300),
    st.integers(1, 300).map(lambda n: [0.0] * n),
    st.integers(1, 300).map(lambda n: [1.0] * (n - 1) + [1e9]),
), st.sampled_from(["quantile", "budget"]), st.sampled_from([2.0, 3.0, 3.5, 4.0, 6.0, 8.0]))
def test_allocation_on_degenerate_importance(values, method, target):
    importance = torch.tensor(values, dtype=torch.float64)
    bits = allocate_bits(importance, AllocationConfig(method=method, target_avg_bits=target))
    assert bits.shape == importance.shape and set(bits.tolist()) <= {2, 3, 4, 6, 8}
    assert abs(float(bits.double().mean()) - target) <= 2 / len(values) + 1e-9
