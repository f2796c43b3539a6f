"""Reports from synthetic run records: exact figures in the tables, the verdict's direction, plots on disk."""
import csv
import json
import re

import pytest

from sparsemix import reports
from sparsemix.stats import CompressionStats, LayerStats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")
ROWS, COLS = 20, 32


def allocation(method, wbits=16, target=None):
    return {"method": method, "target_avg_bits": target, "wbits": wbits, "bit_options": [2, 3, 4, 6, 8],
            "weights": {"activation": 0.25, "hessian": 0.25, "weight": 0.15, "output": 0.25, "stability": 0.1}}


def make_record(name, method, ppl, layer_bits=None, wbits=16, target=None, gpu=None):
    """A record like ``run_experiment`` writes. ``layer_bits``: one {bits: rows} per decoder layer
    (every linear of a decoder layer gets it); None: the dense model."""
    record = {
        "name": name, "model": "tiny/model",
        "environment": {"device": "cuda" if gpu else "cpu", **({"gpu": gpu} if gpu else {})},
        "perplexity": dict(ppl),
        "evaluation": {c: {"perplexity": p, "tokens": 100} for c, p in ppl.items()},
        "timings": {"load_seconds": 0.5, "eval_seconds": 1.0},
        "cache_key": "0" * 16,
    }
    if layer_bits is None:
        record["config"] = {"model": "tiny/model", "compression": None}
        return record
    layers = []
    for index, counts in enumerate(layer_bits):
        for k, linear in enumerate(LINEARS):
            avg = sum(b * c for b, c in counts.items()) / ROWS
            grids = sum(c for b, c in counts.items() if b < 16) * 32
            eff = (avg * ROWS * COLS / 2 + grids + ROWS * COLS) / (ROWS * COLS)
            layers.append(LayerStats(f"layers.{index}.{linear}", ROWS, COLS, dict(counts), avg, eff,
                                     0.2 + 0.1 * k, 1.5 + index + k, 0.5, 0.01 * (k + 1), 0.001))
    record["config"] = {"model": "tiny/model", "compression": {
        "prune": {"sparsity": 0.5}, "quant": {"sym": False}, "allocation": allocation(method, wbits, target)}}
    record["timings"]["compress_seconds"] = 2.5
    record.update(CompressionStats(layers).to_dict())
    return record


@pytest.fixture
def records():
    return [
        make_record("dense", None, {"wikitext2": 10.0, "ptb": 15.0, "c4": 12.0}),
        make_record("sparsegpt-50%", "uniform", {"wikitext2": 10.8, "ptb": 16.0, "c4": 12.9}, [{16: 20}] * 2),
        make_record("uniform-4bit", "uniform", {"wikitext2": 12.5, "ptb": 18.5, "c4": 14.5}, [{4: 20}] * 2, wbits=4),
        make_record("threshold3", "threshold3", {"wikitext2": 12.0, "ptb": 18.0, "c4": 14.0},
                    [{2: 2, 4: 14, 8: 4}, {4: 12, 8: 8}]),
        make_record("quantile-3.5", "quantile", {"wikitext2": 11.0, "ptb": 17.0, "c4": 13.0},
                    [{2: 6, 3: 4, 4: 4, 6: 4, 8: 2}, {2: 4, 3: 4, 4: 4, 6: 4, 8: 4}], target=3.5),
        make_record("budget-3.0", "budget", {"wikitext2": 13.0, "ptb": 19.0, "c4": 15.0}, [{2: 10, 4: 10}] * 2,
                    target=3.0, gpu="NVIDIA H100"),
    ]


def by_name(rows):
    return {row["name"]: row for row in rows}


def test_rows_copy_the_records_figures_exactly(records):
    rows = by_name(reports.table_rows(records))
    assert [r["method"] for r in rows.values()] == ["dense", "sparsegpt", "uniform", "threshold3", "quantile", "budget"]
    for record in records[1:]:
        row, s = rows[record["name"]], record["summary"]
        assert row["sparsity"] == s["sparsity"]
        assert row["channel_average_bits"] == s["channel_average_bits"]
        assert row["parameter_weighted_bits"] == s["parameter_weighted_bits"]
        assert row["effective_bits_per_weight"] == s["effective_bits_per_weight"]
        assert row["compressed_mb"] == s["compressed_megabytes"]
        assert row["compress_seconds"] == record["timings"]["compress_seconds"]
        for corpus, ppl in record["perplexity"].items():
            assert row[f"ppl_{corpus}"] == ppl
    assert rows["threshold3"]["bit_distribution"] == "2:5.0% 4:65.0% 8:30.0%"
    assert rows["budget-3.0"]["device"] == "NVIDIA H100" and rows["quantile-3.5"]["device"] == "cpu"
    dense = rows["dense"]
    assert dense["effective_bits_per_weight"] == dense["channel_average_bits"] == 16
    assert dense["compressed_mb"] == 16 * 6 * ROWS * COLS / 8e6  # 2 decoder layers x 3 linears in fp16
    assert dense["compress_seconds"] is None and dense["ppl_c4"] == 12.0


def test_dense_size_is_none_without_a_compressed_record(records):
    assert reports.table_rows(records[:1])[0]["compressed_mb"] is None


def test_csv_and_json_match_the_rows(records, tmp_path):
    paths = reports.write_tables(records, tmp_path)
    assert [p.name for p in paths] == ["comparison.md", "comparison.csv", "comparison.json"]
    rows = reports.table_rows(records)
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert data["rows"] == rows
    assert data["verdict"] == reports.verdict(records)
    with open(tmp_path / "comparison.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    for line, row in zip(table, rows):
        assert list(line) == list(row)
        for key, value in row.items():
            if value is None:
                assert line[key] == ""
            elif isinstance(value, float):
                assert float(line[key]) == value
            else:
                assert line[key] == str(value)
    md = (tmp_path / "comparison.md").read_text()
    assert "| quantile-3.5 | quantile |" in md and "## Verdict" in md and "11.000" in md


def test_verdict_directions(records):
    lines = reports.verdict(records)
    text = "\n".join(lines)
    vs = {re.match(r"(\S+) vs threshold3", line).group(1): line for line in lines if " vs threshold3" in line}
    assert vs["quantile-3.5"].endswith("better") and "wikitext2".lower() in vs["quantile-3.5"].lower()
    assert "-1.000 (-8.33%)" in vs["quantile-3.5"]  # 11 vs 12 on WikiText2
    assert vs["budget-3.0"].endswith("worse")
    assert "sparsegpt-50%" not in vs  # more bits than threshold3: not compared
    beat = next(line for line in lines if line.startswith("Beat threshold3"))
    assert "quantile-3.5" in beat and "budget-3.0" not in beat
    assert "budget-3.0" in next(line for line in lines if line.startswith("Did not beat"))
    assert re.search(r"Not compared.*sparsegpt-50%", text)
    collapsed = next(line for line in lines if "collapsed to two tiers" in line)
    assert "budget-3.0" in collapsed and "quantile-3.5" not in collapsed
    same = next(line for line in lines if line.startswith("No layer-level differentiation"))
    assert "budget-3.0" in same and "threshold3" not in same
    assert "threshold3" in next(line for line in lines if line.startswith("Layers differ"))
    assert "Best WikiText2 PPL: sparsegpt-50% 10.800 (dense 10.000)" in lines


def test_verdict_without_threshold3_says_so(records):
    lines = reports.verdict([r for r in records if r["name"] != "threshold3"])
    assert any("No threshold3" in line for line in lines)


def test_chinese_tables(records, tmp_path):
    reports.write_tables(records, tmp_path, stem="cn", lang="zh")
    md = (tmp_path / "cn.md").read_text()
    for word in ("## 结论", "平均比特", "比特分布", "PPL", "配置"):
        assert word in md
    lines = reports.verdict(records, lang="zh")
    assert any("更好" in line and "quantile-3.5" in line for line in lines)
    assert any("退化为两档" in line and "budget-3.0" in line for line in lines)
    assert any("没有层级差异" in line for line in lines)
    assert "No threshold3" not in "".join(lines)


def assert_plots(paths):
    assert [p.suffix for p in paths] == [".png", ".svg"]
    png, svg = paths
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    assert "<svg" in svg.read_text()


def test_every_plot_writes_png_and_svg(records, tmp_path):
    best = records[4]
    assert_plots(reports.plot_perplexity_vs_bits(records, tmp_path / "ppl"))
    assert_plots(reports.plot_perplexity_vs_bits(records, tmp_path / "ppl_c4_linear", corpus="c4", log_y=False))
    assert_plots(reports.plot_layer_bits_heatmap(best, tmp_path / "heat"))
    assert_plots(reports.plot_bit_histogram(records, tmp_path / "hist"))
    assert_plots(reports.plot_importance_range(best, tmp_path / "imp"))
    assert_plots(reports.plot_ablation(records, tmp_path / "abl.v1"))  # a dot in the stem is kept
    with pytest.raises(ValueError, match="corpus"):
        reports.plot_ablation(records, tmp_path / "x", corpus="lambada")


@pytest.mark.parametrize("kind, stem, plots", [
    ("compare", "comparison", {"ppl_vs_bits", "bit_histogram", "layer_bits_best_quantile-3.5",
                               "importance_range_best_quantile-3.5"}),
    ("sweep", "sweep", {"ppl_vs_bits_wikitext2", "ppl_vs_bits_ptb", "ppl_vs_bits_c4"}),
    ("ablate", "ablation", {"ablation"}),
])
def test_write_report(records, tmp_path, kind, stem, plots):
    paths = reports.write_report(records, tmp_path, kind=kind, lang="zh" if kind == "sweep" else "en")
    assert all(p.is_file() for p in paths)
    assert {p.name for p in paths if p.parent == tmp_path} == {f"{stem}.md", f"{stem}.csv", f"{stem}.json"}
    drawn = {p.stem for p in paths if p.parent == tmp_path / "plots"}
    assert drawn == plots
    assert all((tmp_path / "plots" / f"{name}.{ext}").is_file() for name in plots for ext in ("png", "svg"))


def test_unknown_kind(records, tmp_path):
    with pytest.raises(ValueError, match="kind"):
        reports.write_report(records, tmp_path, kind="nope")
