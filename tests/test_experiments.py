"""compare / sweep / ablate / report end to end on the tiny model and corpora, as a user runs them."""
import json
import os
import signal
import subprocess
import sys

import pytest

from sparsemix.config import ConfigError
from sparsemix.experiments import cache_key, config_from_mapping, guide_preset, load_configs
from sparsemix.pipeline import RunConfig

PNG = b"\x89PNG\r\n\x1a\n"


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sparsemix.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600, **kw)


@pytest.fixture
def common(tiny_model_dirs, tiny_data_dir):
    return [tiny_model_dirs["llama"], "--data-dir", str(tiny_data_dir), "--nsamples", "8", "--seqlen", "32",
            "--batch-size", "4", "--quiet"]


CONFIGS = [
    {"name": "dense", "dense": True},
    {"name": "uniform-4bit", "bit_method": "uniform", "wbits": 4},
    {"name": "threshold3", "bit_method": "threshold3"},
    {"name": "quantile-4.0", "bit_method": "quantile", "target_avg_bits": 4.0},
]


def test_compare_writes_tables_that_match_each_config_and_caches(common, tmp_path):
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps(CONFIGS))
    out = tmp_path / "cmp"
    proc = cli("compare", *common, "--configs", str(configs), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for suffix in ("md", "csv", "json"):
        assert (out / f"comparison.{suffix}").stat().st_size > 0
    table = json.loads((out / "comparison.json").read_text())
    assert [row["name"] for row in table["rows"]] == [c["name"] for c in CONFIGS]
    for row in table["rows"]:
        record = json.loads((out / "runs" / f"{row['name']}.json").read_text())
        for corpus, value in record["perplexity"].items():
            assert row[f"ppl_{corpus}"] == value
        if row["name"] != "dense":
            assert row["channel_average_bits"] == record["summary"]["channel_average_bits"]
            assert row["effective_bits_per_weight"] == record["summary"]["effective_bits_per_weight"]
    assert table["verdict"] and "threshold3" in " ".join(table["verdict"])
    assert "|" in (out / "comparison.md").read_text()
    plots = list((out / "plots").glob("*.png"))
    assert plots and all(p.read_bytes()[:8] == PNG for p in plots)

    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    again = cli("compare", *common, "--configs", str(configs), "--out", str(out))
    assert again.returncode == 0 and again.stdout.count("[cached]") == 4, again.stdout
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}

    (out / "runs" / "threshold3.json").unlink()  # as if interrupted before it finished
    resumed = cli("compare", *common, "--configs", str(configs), "--out", str(out))
    assert resumed.returncode == 0 and resumed.stdout.count("[cached]") == 3
    assert "[done] threshold3" in resumed.stdout
    forced = cli("compare", *common, "--configs", str(configs), "--out", str(out), "--force")
    assert forced.returncode == 0 and "[cached]" not in forced.stdout


def test_guide_preset_in_chinese(common, tmp_path):
    out = tmp_path / "guide"
    proc = cli("compare", *common, "--preset", "guide", "--out", str(out), "--lang", "zh", "--eval", "wikitext2")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [row["name"] for row in rows] == [c.name for c in guide_preset()]
    text = (out / "comparison.md").read_text()
    assert "比特" in text and "quantile-3.5" in text


def test_sweep_and_report_redraw(common, tmp_path):
    out = tmp_path / "sweep"
    proc = cli("sweep", *common, "--targets", "3,4", "--methods", "quantile,uniform", "--eval", "wikitext2,ptb",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    names = [row["name"] for row in json.loads((out / "sweep.json").read_text())["rows"]]
    assert names == ["quantile-3", "quantile-4", "uniform-3bit", "uniform-4bit"]
    assert all(p.read_bytes()[:8] == PNG for p in (out / "plots").glob("*.png"))
    assert list((out / "plots").glob("*.svg"))
    redrawn = tmp_path / "redrawn"
    proc = cli("report", str(out / "runs"), "--kind", "sweep", "--out", str(redrawn))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((redrawn / "sweep.json").read_text()) == json.loads((out / "sweep.json").read_text())


def test_ablate_with_a_user_mix(common, tmp_path):
    out = tmp_path / "ablate"
    proc = cli("ablate", *common, "--eval", "wikitext2", "--mix", "mine:activation=2,weight=1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    names = [row["name"] for row in json.loads((out / "ablation.json").read_text())["rows"]]
    assert names[:5] == [f"only-{d}" for d in ("activation", "hessian", "weight", "output", "stability")]
    assert names[5:] == ["activation+hessian", "default", "mine"]
    mine = json.loads((out / "runs" / "mine.json").read_text())
    assert mine["config"]["compression"]["allocation"]["weights"]["activation"] == 2.0
    assert list((out / "plots").glob("*.png"))


def test_ctrl_c_keeps_finished_configs(common, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "sparsemix.cli", "compare", *common, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("[done]"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the experiment finished before the interrupt arrived")
    assert proc.returncode == 130 and "rerun the same command to resume" in err
    done = list((out / "runs").glob("*.json"))
    assert done and all(json.loads(p.read_text())["perplexity"] for p in done)
    assert not list((out / "runs").glob(".*.tmp"))


def test_cache_key_follows_what_changes_results(tiny_data_dir):
    run = RunConfig(model="m", data_dir=str(tiny_data_dir))
    a, b = guide_preset()[2], guide_preset()[3]
    assert cache_key(run, a) == cache_key(run, a)
    assert cache_key(run, a) != cache_key(run, b)
    assert cache_key(run, a) != cache_key(RunConfig(model="m", data_dir=str(tiny_data_dir), nsamples=7), a)
    assert cache_key(run, a) == cache_key(RunConfig(model="m", data_dir=str(tiny_data_dir), batch_size=3), a)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'bits'"):
        config_from_mapping({"name": "x", "bits": 4})
    with pytest.raises(ConfigError, match="has no 'name'"):
        config_from_mapping({"bit_method": "uniform"})
    path = tmp_path / "c.yaml"
    path.write_text("- name: a\n  bit_method: budget\n  target_avg_bits: 3.5\n- name: a\n  dense: true\n")
    with pytest.raises(ConfigError, match="'a' is used twice"):
        load_configs(path)
    path.write_text("- name: a\n  bit_method: budget\n  target_avg_bits: 3.5\n  importance_weights: hessian=1\n")
    (named,) = load_configs(path)
    assert named.compression.allocation.weights.hessian == 1.0 and named.compression.allocation.weights.activation == 0
