"""The real code path on tiny random OPT and Llama models and tiny corpora."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sparsemix.config import AllocationConfig, CompressionConfig, PruneConfig
from sparsemix.data import calibration_windows, eval_windows
from sparsemix.driver import compress_model
from sparsemix.evaluation import perplexity
from sparsemix.models import UnsupportedModelError, adapter_for, load_model

FAMILIES = ["opt", "llama"]


def plain_perplexity(model, windows):
    """exp(mean token NLL) from one plain forward per window: the reference."""
    nll = []
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0, :-1]
            nll.append(torch.nn.functional.cross_entropy(logits.float(), window[1:], reduction="none"))
    return float(torch.cat(nll).mean().exp())


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_equals_plain_forward(family, tiny_model_dirs, tiny_data_dir):
    model, tokenizer = load_model(tiny_model_dirs[family])
    windows = eval_windows("wikitext2", tokenizer, 32, tiny_data_dir)[:6]
    reference = plain_perplexity(model, windows)
    assert perplexity(model, windows, batch_size=4).value == pytest.approx(reference, rel=1e-5)
    assert perplexity(model, windows, batch_size=4, layerwise=True).value == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("allocation, prune", [
    (AllocationConfig(method="uniform", wbits=4), PruneConfig(0.5)),
    (AllocationConfig(method="threshold3"), PruneConfig(0.5)),
    (AllocationConfig(method="quantile"), PruneConfig(0.5)),
    (AllocationConfig(method="quantile", target_avg_bits=3.5), PruneConfig(0.5)),
    (AllocationConfig(method="budget", target_avg_bits=4.0), PruneConfig(0.0, prunen=2, prunem=4)),
])
def test_driver_compresses_every_linear(family, allocation, prune, tiny_model_dirs, tiny_data_dir):
    model, tokenizer = load_model(tiny_model_dirs[family])
    adapter = adapter_for(model)
    dense = {f"layers.{i}.{n}": m.weight.clone() for i, layer in enumerate(adapter.layers(model))
             for n, m in adapter.linears(layer).items()}
    calib = calibration_windows("c4", tokenizer, 8, 32, 0, tiny_data_dir)
    result = compress_model(model, calib, CompressionConfig(prune=prune, allocation=allocation), batch_size=3)
    assert [layer.name for layer in result.stats.layers] == list(dense)
    for i, layer in enumerate(adapter.layers(model)):
        for name, linear in adapter.linears(layer).items():
            W = linear.weight
            assert not torch.equal(W, dense[f"layers.{i}.{name}"])
            if prune.prunen:
                assert torch.all((W == 0).reshape(W.shape[0], -1, 4).sum(-1) >= 2)
            else:
                assert float((W == 0).float().mean()) >= 0.5  # pruned, plus survivors rounded to 0
            bits = result.bits[f"layers.{i}.{name}"]
            assert bits.shape == (W.shape[0],)
    summary = result.stats.summary()
    assert summary["sparsity"] == 0.5
    if allocation.target_avg_bits is not None:
        assert abs(summary["channel_average_bits"] - allocation.target_avg_bits) < 0.02
    if allocation.method == "uniform":
        assert summary["channels_per_bit"] == {"4": result.stats.total_channels}
    windows = eval_windows("wikitext2", tokenizer, 32, tiny_data_dir)[:4]
    assert torch.isfinite(torch.tensor(perplexity(model, windows).value))


def test_unsupported_architecture_is_named(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs["opt"])
    model.config.model_type = "gpt_neox"
    with pytest.raises(UnsupportedModelError, match="'gpt_neox' is not supported; supported: .*llama.*opt"):
        adapter_for(model)


def sparsemix(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sparsemix.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_cli_compress_save_reload_same_perplexity(tiny_model_dirs, tiny_data_dir, tmp_path):
    out, save = tmp_path / "run.json", tmp_path / "saved"
    proc = sparsemix("compress", tiny_model_dirs["llama"], "--data-dir", tiny_data_dir, "--nsamples", "8",
                     "--seqlen", "32", "--target_avg_bits", "3.5", "--bit_method", "budget", "--eval", "wikitext2,ptb",
                     "--batch-size", "4", "--output", str(out), "--save", str(save), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "Quantization statistics summary" in proc.stdout or "Quantization statistics summary" in proc.stderr
    assert "Perplexity on wikitext2:" in proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert record["summary"]["channel_average_bits"] == pytest.approx(3.5)
    assert record["config"]["compression"]["allocation"]["method"] == "budget"
    assert set(record["perplexity"]) == {"wikitext2", "ptb"}
    assert record["environment"]["torch"] == torch.__version__
    assert len(record["layers"]) == 2 * 7

    reloaded = AutoModelForCausalLM.from_pretrained(save)  # plain transformers, no sparsemix involved
    W = reloaded.model.layers[0].mlp.down_proj.weight
    assert float((W == 0).float().mean()) >= 0.5
    bits = load_file(save / "sparsemix_bits.safetensors")["layers.0.mlp.down_proj"]
    assert all(row.unique().numel() <= 2 ** int(b) for row, b in zip(W, bits))  # still on each row's grid
    again = tmp_path / "again.json"
    proc = sparsemix("eval", str(save), "--data-dir", tiny_data_dir, "--seqlen", "32", "--eval", "wikitext2,ptb",
                     "--batch-size", "4", "--output", str(again), "--quiet")
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads(again.read_text())
    for corpus in ("wikitext2", "ptb"):
        assert evaluated["perplexity"][corpus] == pytest.approx(record["perplexity"][corpus], rel=1e-6)
    assert evaluated["compressed"]["summary"] == record["summary"]


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "sparsity 1.5 is outside [0, 1)"),
    (["--bit-method", "best"], "unknown bit method 'best'"),
    (["--target-avg-bits", "9"], "outside the bit options' range [2, 8]"),
    (["--importance-weights", "speed=1"], "unknown importance dimension 'speed'"),
    (["--sparsity", "0.5", "--prunen", "2", "--prunem", "4"], "exclude each other"),
    (["--nsamples", "0"], "--nsamples 0 must be at least 1"),
    (["--seqlen", "4096"], "exceeds the model's maximum of 128"),
])
def test_cli_errors_are_one_line_exit_2(args, message, tiny_model_dirs, tiny_data_dir):
    proc = sparsemix("compress", tiny_model_dirs["opt"], "--data-dir", tiny_data_dir, "--eval", "none",
                     "--seqlen", "32", *args)
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("sparsemix: error:") and message in error
    assert "Traceback" not in proc.stderr


def test_cli_missing_model_and_corpus(tmp_path, tiny_model_dirs):
    proc = sparsemix("compress", str(tmp_path / "nope"), "--eval", "none")
    assert proc.returncode == 2 and "could not be loaded" in proc.stderr
    proc = sparsemix("compress", tiny_model_dirs["opt"], "--data-dir", str(tmp_path), "--eval", "none",
                     "--seqlen", "32")
    assert proc.returncode == 2 and str(tmp_path) in proc.stderr and "--data-dir" in proc.stderr


def test_cli_refuses_to_overwrite(tmp_path, tiny_model_dirs, tiny_data_dir):
    out = tmp_path / "exists.json"
    out.write_text("{}")
    proc = sparsemix("compress", tiny_model_dirs["opt"], "--output", str(out))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert out.read_text() == "{}"


def test_default_seqlen_is_capped_by_the_model(tiny_model_dirs):
    from sparsemix.config import ConfigError
    from sparsemix.pipeline import RunConfig, with_model_seqlen

    model, _ = load_model(tiny_model_dirs["opt"])  # max_position_embeddings 128
    assert with_model_seqlen(RunConfig(), model).seqlen == 128
    assert with_model_seqlen(RunConfig(seqlen=64), model).seqlen == 64
    with pytest.raises(ConfigError, match="exceeds the model's maximum of 128"):
        with_model_seqlen(RunConfig(seqlen=256), model)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_forward_per_layer_is_close_to_true_sequential(family, tiny_model_dirs, tiny_data_dir):
    results = {}
    for sequential in (True, False):
        model, tokenizer = load_model(tiny_model_dirs[family])
        calib = calibration_windows("c4", tokenizer, 8, 32, 0, tiny_data_dir)
        config = CompressionConfig(PruneConfig(0.5), allocation=AllocationConfig(method="uniform", wbits=4),
                                   true_sequential=sequential)
        stats = compress_model(model, calib, config, batch_size=4).stats
        windows = eval_windows("wikitext2", tokenizer, 32, tiny_data_dir)[:6]
        results[sequential] = (perplexity(model, windows).value, [layer.name for layer in stats.layers])
    assert results[True][1] == results[False][1]  # same linears, same order
    assert results[True][0] == pytest.approx(results[False][0], rel=0.02)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_gives_the_straightforward_result(family, tiny_model_dirs, tiny_data_dir):
    """Stacked sweeps, stopped statistics passes and replayed submodules change the speed, not the weights."""
    weights, records = {}, {}
    for fused in (True, False):
        model, tokenizer = load_model(tiny_model_dirs[family])
        calib = calibration_windows("c4", tokenizer, 8, 32, 0, tiny_data_dir)
        config = CompressionConfig(PruneConfig(0.5), allocation=AllocationConfig(method="budget", target_avg_bits=4.0),
                                   fused=fused)
        result = compress_model(model, calib, config, batch_size=4)
        weights[fused] = {name: p.detach().clone() for name, p in model.named_parameters()}
        records[fused] = result.bits
    assert weights[True].keys() == weights[False].keys()
    for name in weights[True]:
        assert torch.equal(weights[True][name], weights[False][name]), name
    assert all(torch.equal(records[True][n], records[False][n]) for n in records[False])


def test_settled_submodules_replay_exactly(tiny_model_dirs, tiny_data_dir):
    from sparsemix.layerwise import SettledOutputs, capture_layer_inputs, run_layer

    model, tokenizer = load_model(tiny_model_dirs["llama"])
    calib = calibration_windows("c4", tokenizer, 4, 32, 0, tiny_data_dir)
    inputs = capture_layer_inputs(model, calib, 2, "cpu")
    layer = adapter_for(model).layers(model)[0]
    linears = list(adapter_for(model).linears(layer))
    settled = SettledOutputs(layer, linears)
    attention = {n for n in linears if n.startswith("self_attn.")}
    with torch.no_grad():
        expected = run_layer(layer, inputs.hidden, inputs.kwargs[0])
        with settled.replayed({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}):
            run_layer(layer, inputs.hidden, inputs.kwargs[0])  # records q/k/v
        assert sorted(settled.recorded) == ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]
        with settled.replayed(attention):  # records self_attn, replaying q/k/v inside it
            run_layer(layer, inputs.hidden, inputs.kwargs[0])
        assert list(settled.recorded) == ["self_attn"] and len(settled.recorded["self_attn"]) == 2
        calls = []
        hook = layer.self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
        with settled.replayed(attention):
            replayed = run_layer(layer, inputs.hidden, inputs.kwargs[0])
        hook.remove()
    assert calls == []  # attention was not recomputed
    assert all(torch.equal(a, b) for a, b in zip(expected, replayed))
    assert "forward" not in vars(layer.self_attn)  # the class's forward is back


def test_attention_core_is_replayed_once_its_inputs_are_final(tiny_model_dirs, tiny_data_dir, monkeypatch):
    """After q/k/v are compressed, the pass for o_proj records softmax(q k^T) v; the pass after
    o_proj replays it instead of computing it again, and the layer's output is unchanged."""
    from sparsemix.layerwise import SettledOutputs, capture_layer_inputs, run_layer
    from sparsemix.models import calibration_attention

    model, tokenizer = load_model(tiny_model_dirs["llama"])
    adapter = adapter_for(model)
    calib = calibration_windows("c4", tokenizer, 4, 32, 0, tiny_data_dir)
    inputs = capture_layer_inputs(model, calib, 2, "cpu")
    layer = adapter.layers(model)[0]
    linears = list(adapter.linears(layer))
    settled = SettledOutputs(layer, linears, (adapter.attention, adapter.sequential[0]))
    sdpa, cores = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: cores.append(1) or sdpa(*args, **kwargs))
    qkv, with_o = set(adapter.sequential[0]), set(adapter.sequential[0]) | set(adapter.sequential[1])
    with torch.no_grad(), calibration_attention(model):
        expected = run_layer(layer, inputs.hidden, inputs.kwargs[0])
        assert len(cores) == 2  # one per batch: the counter sees the calibration attention
        with settled.replayed(qkv):  # records q/k/v and the attention core
            run_layer(layer, inputs.hidden, inputs.kwargs[0])
        assert len(cores) == 4 and len(settled.recorded["self_attn.<attention core>"]) == 2
        layer.self_attn.o_proj.weight.mul_(0.5)  # o_proj "compressed": self_attn's output changes, its core not
        expected = run_layer(layer, inputs.hidden, inputs.kwargs[0])
        with settled.replayed(with_o):  # records self_attn, replaying q/k/v and the core inside it
            replayed = run_layer(layer, inputs.hidden, inputs.kwargs[0])
    assert len(cores) == 6  # only the reference run computed attention
    assert all(torch.equal(a, b) for a, b in zip(expected, replayed))
    assert "self_attn.<attention core>" not in settled.recorded  # inside a recorded module: dropped
    assert not hasattr(layer.self_attn, "_sparsemix_attention_core")


def test_norms_of_the_layer_input_run_once_per_layer(tiny_model_dirs, tiny_data_dir, monkeypatch):
    """A linear-free module (the input norm) seeing the same input tensor again returns its earlier
    output: the true-sequential passes of a layer compute it once per batch, with the same result."""
    from sparsemix.layerwise import SettledOutputs, capture_layer_inputs, run_layer

    model, tokenizer = load_model(tiny_model_dirs["llama"])
    adapter = adapter_for(model)
    calib = calibration_windows("c4", tokenizer, 4, 32, 0, tiny_data_dir)
    inputs = capture_layer_inputs(model, calib, 2, "cpu")
    layer = adapter.layers(model)[0]
    settled = SettledOutputs(layer, list(adapter.linears(layer)), inputs=inputs.hidden)
    norm_forward, calls = type(layer.input_layernorm).forward, []
    monkeypatch.setattr(type(layer.input_layernorm), "forward",
                        lambda self, x: calls.append(self) or norm_forward(self, x))
    with torch.no_grad():
        expected = run_layer(layer, inputs.hidden, inputs.kwargs[0])
        first = sum(c is layer.input_layernorm for c in calls)
        for _ in range(3):
            with settled.replayed(set()):
                got = run_layer(layer, inputs.hidden, inputs.kwargs[0])
            assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert first == 2 and sum(c is layer.input_layernorm for c in calls) == 2 + 2  # once per batch, then replayed
    assert "forward" not in vars(layer.input_layernorm)
    assert set(settled.memo) == {"input_layernorm", "post_attention_layernorm", "mlp.act_fn"}
    assert settled.memo["post_attention_layernorm"] == {} and settled.memo["mlp.act_fn"] == {}  # fresh inputs: not kept


def test_device_warm_up_leaves_the_random_stream_alone():
    from sparsemix.pipeline import DeviceWarmUp

    config = CompressionConfig(PruneConfig(0.5), allocation=AllocationConfig(method="budget", target_avg_bits=4.0))
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    timings = DeviceWarmUp(config, "cpu").join()  # the same code a GPU run starts while the model loads
    assert torch.equal(torch.rand(4), expected)  # calibration windows drawn after it are the same
    assert timings["device_warmup_seconds"] > 0 and timings["device_warmup_wait_seconds"] >= 0


def test_failed_device_warm_up_only_warns(caplog):
    from sparsemix.pipeline import DeviceWarmUp

    timings = DeviceWarmUp(CompressionConfig(), "meta").join()  # no data on meta tensors: the solve fails
    assert timings["device_warmup_seconds"] is None
    assert "device warm-up failed" in caplog.text
