"""Comparison tables, a plain-language verdict and plots from run records (see ``pipeline.make_record``).

Units: bits are bits per weight (see ``stats``: channel-average and parameter-weighted bits count
codes only; effective bits per weight count everything stored); MB is 10^6 bytes; perplexity
(PPL) has no unit. The verdict follows the users' evaluation guide: compare with the original
3-tier scheme (``threshold3``) at equal or lower bits, watch for a distribution that collapsed to
two tiers, and for layers that all got the same average bits.

Plots use matplotlib's ``Figure`` with the Agg canvas directly (no pyplot, so no global figure
state). Plot texts are always English: these machines have no CJK font, so Chinese would render
as empty boxes; ``lang`` only changes the tables and the verdict.
"""
from __future__ import annotations

import csv
import io
import math
import re
import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator, ScalarFormatter

from .files import write_atomic, write_json

COLLAPSE_MIN_PERCENT = 1.0  # a tier counts if it holds at least this % of channels
NO_DIFFERENTIATION_STD = 0.01  # bits; below this, layers are "all the same"
BASELINE_METHOD = "threshold3"  # the original 3-tier scheme
ADAPTIVE_METHODS = ("quantile", "budget")
REFERENCE_METHODS = ("dense", "uniform", "sparsegpt")  # drawn as lines in the ablation chart
CORPUS_LABELS = {"wikitext2": "WikiText2", "ptb": "PTB", "c4": "C4"}

STRINGS = {
    "en": {
        "title": "Compression comparison", "title_sweep": "Bit-budget sweep",
        "title_ablation": "Importance-weight ablation", "model": "Model: {model}",
        "columns": {
            "name": "Config", "method": "Method", "sparsity": "Sparsity",
            "channel_average_bits": "Avg bits (channel)", "parameter_weighted_bits": "Param-weighted bits",
            "effective_bits_per_weight": "Effective bits/weight", "compressed_mb": "Size (MB)",
            "ppl": "PPL {corpus}", "bit_distribution": "Bit distribution",
            "compress_seconds": "Compress (s)", "device": "Device",
        },
        "units": "Bits are bits per weight. Avg bits (channel): mean code width over output channels. "
                 "Effective bits/weight: everything stored (codes, fp16 scale and zero per row, sparsity "
                 "metadata) divided by the dense weight count. Size: the compressed linears in MB (10^6 bytes); "
                 "dense: the same linears in fp16. Bit distribution: % of channels per bit width.",
        "verdict": "Verdict",
        "vs": "{name} vs {base} ({bits:.3f} vs {base_bits:.3f} effective bits/weight): {deltas} -> {result}",
        "delta": "{corpus} {delta:+.3f} ({pct:+.2f}%)", "sep": ", ",
        "better": "better", "worse": "worse", "mixed": "mixed", "none": "none",
        "beat": "Beat {base} on every corpus at equal or lower bits: {names}",
        "not_beat": "Did not beat {base} on any corpus: {names}",
        "mixed_list": "Better than {base} on some corpora only: {names}",
        "signal": "PPL at least 0.5 lower than {base} on every corpus (the guide's signal): {names}",
        "not_compared": "Not compared (more effective bits/weight than {base}'s {bits:.3f}): {names}",
        "no_base": "No threshold3 (original 3-tier) config in this set: no comparison with the original scheme.",
        "collapsed": "Bit distribution collapsed to two tiers or fewer (tiers holding >= 1% of channels): {names}",
        "not_collapsed": "No quantile/budget distribution collapsed to two tiers: {names}",
        "no_adaptive": "No quantile/budget config: tier collapse not checked.",
        "no_diff": "No layer-level differentiation (std of per-linear average bits < 0.01): {names}",
        "diff": "Layers differ in average bits: {names}",
        "diff_item": "{name} (std {std:.3f}, {lo:.2f}-{hi:.2f} bits)",
        "best": "Best {corpus} PPL: {name} {ppl:.3f}",
        "dense_ref": " (dense {ppl:.3f})",
    },
    "zh": {
        "title": "压缩方法对比", "title_sweep": "比特预算扫描", "title_ablation": "重要性权重消融实验", "model": "模型：{model}",
        "columns": {
            "name": "配置", "method": "方法", "sparsity": "稀疏度",
            "channel_average_bits": "平均比特（通道）", "parameter_weighted_bits": "参数加权比特",
            "effective_bits_per_weight": "有效比特/权重", "compressed_mb": "大小 (MB)",
            "ppl": "{corpus} PPL", "bit_distribution": "比特分布",
            "compress_seconds": "压缩耗时 (秒)", "device": "设备",
        },
        "units": "比特均为每个权重的比特数。平均比特（通道）：各输出通道码宽的平均值。有效比特/权重：全部存储"
                 "（码字、每行 fp16 scale 与 zero、稀疏元数据）除以稠密权重数。大小：压缩后线性层的 MB（10^6 字节），"
                 "稠密模型为相同线性层的 fp16 大小。比特分布：各比特档位的通道百分比。",
        "verdict": "结论",
        "vs": "{name} 对比 {base}（有效比特 {bits:.3f} vs {base_bits:.3f}）：{deltas} → {result}",
        "delta": "{corpus} {delta:+.3f} ({pct:+.2f}%)", "sep": "，",
        "better": "更好", "worse": "更差", "mixed": "互有胜负", "none": "无",
        "beat": "相同或更低比特下所有语料 PPL 均优于 {base}：{names}",
        "not_beat": "所有语料 PPL 均未优于 {base}：{names}",
        "mixed_list": "仅部分语料优于 {base}：{names}",
        "signal": "所有语料 PPL 比 {base} 下降 0.5 以上（改进有效的信号）：{names}",
        "not_compared": "未比较（有效比特高于 {base} 的 {bits:.3f}）：{names}",
        "no_base": "本组没有 threshold3（原版简单3档）配置，无法与原版对比。",
        "collapsed": "比特分布退化为两档或更少（占通道 ≥1% 的档位）：{names}",
        "not_collapsed": "quantile/budget 配置的比特分布均未退化为两档：{names}",
        "no_adaptive": "没有 quantile/budget 配置，未检查比特分布是否退化。",
        "no_diff": "没有层级差异（各线性层平均比特的标准差 < 0.01）：{names}",
        "diff": "各层平均比特存在差异：{names}",
        "diff_item": "{name}（标准差 {std:.3f}，{lo:.2f}-{hi:.2f} 比特）",
        "best": "{corpus} 最佳困惑度 (PPL)：{name} {ppl:.3f}",
        "dense_ref": "（稠密模型 {ppl:.3f}）",
    },
}
KIND_STEMS = {"compare": ("comparison", "title"), "sweep": ("sweep", "title_sweep"),
              "ablate": ("ablation", "title_ablation")}


# ---------------------------------------------------------------- figures from records

def method_of(record: dict) -> str:
    """'dense', 'sparsegpt' (uniform at 16 bits: pruning only), or the allocation method."""
    compression = record["config"].get("compression")
    if compression is None:
        return "dense"
    allocation = compression["allocation"]
    if allocation["method"] == "uniform" and allocation["wbits"] == 16:
        return "sparsegpt"
    return allocation["method"]


def corpora_of(records: list[dict]) -> list[str]:
    """Every evaluated corpus, in the order first seen."""
    return list(dict.fromkeys(c for r in records for c in r.get("perplexity", {})))


def _compressed(records: list[dict]) -> list[dict]:
    return [r for r in records if method_of(r) != "dense" and r.get("summary")]


def _effective_bits(record: dict) -> float:
    return 16.0 if method_of(record) == "dense" else record["summary"]["effective_bits_per_weight"]


def _bit_percent(record: dict) -> dict[int, float]:
    percent = record["summary"]["channel_percent_per_bit"]
    return {int(b): p for b, p in sorted(percent.items(), key=lambda item: int(item[0]))}


def _layer_std(record: dict) -> tuple[float, float, float]:
    """(std, min, max) of channel-average bits over the compressed linears."""
    bits = [layer["channel_average_bits"] for layer in record["layers"]]
    return statistics.pstdev(bits), min(bits), max(bits)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "config"


def _model_label(records: list[dict]) -> str:
    return ", ".join(dict.fromkeys(str(r.get("model", "?")) for r in records))


def table_rows(records: list[dict]) -> list[dict]:
    """One row per record; figures copied unrounded. Bits are bits per weight, sizes MB (10^6 bytes).

    The dense row has 16 bits and, as its size, the fp16 size of the linears that the compressed
    records compress (None without a compressed record).
    """
    compressed = _compressed(records)
    dense_mb = (16 * sum(l["rows"] * l["cols"] for l in compressed[0]["layers"]) / 8e6) if compressed else None
    corpora = corpora_of(records)
    rows = []
    for record in records:
        method = method_of(record)
        env = record.get("environment", {})
        row = {"name": record.get("name", method), "method": method}
        if method == "dense" or not record.get("summary"):
            row.update(sparsity=0.0, channel_average_bits=16.0, parameter_weighted_bits=16.0,
                       effective_bits_per_weight=16.0, compressed_mb=dense_mb)
            distribution = "16:100.0%"
        else:
            s = record["summary"]
            row.update(sparsity=s["sparsity"], channel_average_bits=s["channel_average_bits"],
                       parameter_weighted_bits=s["parameter_weighted_bits"],
                       effective_bits_per_weight=s["effective_bits_per_weight"],
                       compressed_mb=s["compressed_megabytes"])
            distribution = " ".join(f"{b}:{p:.1f}%" for b, p in _bit_percent(record).items())
        row.update({f"ppl_{c}": record.get("perplexity", {}).get(c) for c in corpora})
        row.update(bit_distribution=distribution, compress_seconds=record.get("timings", {}).get("compress_seconds"),
                   device=env.get("gpu") or env.get("device"))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- verdict

def _names(items: list[str], t: dict) -> str:
    return t["sep"].join(items) if items else t["none"]


def _versus_baseline(records: list[dict], t: dict) -> list[str]:
    base = next((r for r in records if method_of(r) == BASELINE_METHOD), None)
    if base is None:
        return [t["no_base"]]
    base_name, base_bits = base["name"], _effective_bits(base)
    lines, groups, signal, skipped = [], {"better": [], "worse": [], "mixed": []}, [], []
    for record in _compressed(records):
        if record is base:
            continue
        bits = _effective_bits(record)
        if bits > base_bits:
            skipped.append(f"{record['name']} ({bits:.3f})")
            continue
        deltas = {c: record["perplexity"][c] - p for c, p in base["perplexity"].items() if c in record["perplexity"]}
        if not deltas:
            continue
        result = "better" if all(d < 0 for d in deltas.values()) else (
            "worse" if all(d >= 0 for d in deltas.values()) else "mixed")
        groups[result].append(record["name"])
        if all(d <= -0.5 for d in deltas.values()):
            signal.append(record["name"])
        text = t["sep"].join(t["delta"].format(corpus=CORPUS_LABELS.get(c, c), delta=d, pct=100 * d / base["perplexity"][c])
                         for c, d in deltas.items())
        lines.append(t["vs"].format(name=record["name"], base=base_name, bits=bits, base_bits=base_bits,
                                    deltas=text, result=t[result]))
    lines.append(t["beat"].format(base=base_name, names=_names(groups["better"], t)))
    lines.append(t["not_beat"].format(base=base_name, names=_names(groups["worse"], t)))
    if groups["mixed"]:
        lines.append(t["mixed_list"].format(base=base_name, names=_names(groups["mixed"], t)))
    lines.append(t["signal"].format(base=base_name, names=_names(signal, t)))
    if skipped:
        lines.append(t["not_compared"].format(base=base_name, bits=base_bits, names=t["sep"].join(skipped)))
    return lines


def _collapse(records: list[dict], t: dict) -> list[str]:
    adaptive = [r for r in _compressed(records) if method_of(r) in ADAPTIVE_METHODS]
    if not adaptive:
        return [t["no_adaptive"]]
    collapsed, kept = [], []
    for record in adaptive:
        tiers = {b: p for b, p in _bit_percent(record).items() if p >= COLLAPSE_MIN_PERCENT}
        if len(tiers) <= 2:
            collapsed.append(f"{record['name']} ({' '.join(f'{b}:{p:.1f}%' for b, p in tiers.items())})")
        else:
            kept.append(record["name"])
    if collapsed:
        return [t["collapsed"].format(names=_names(collapsed, t))]
    return [t["not_collapsed"].format(names=_names(kept, t))]


def _differentiation(records: list[dict], t: dict) -> list[str]:
    """Mixed-precision configs only: a uniform width gives every layer the same bits by design."""
    same, differ = [], []
    for record in _compressed(records):
        if method_of(record) in ("uniform", "sparsegpt") or not record.get("layers"):
            continue
        std, lo, hi = _layer_std(record)
        if std < NO_DIFFERENTIATION_STD:
            same.append(record["name"])
        else:
            differ.append(t["diff_item"].format(name=record["name"], std=std, lo=lo, hi=hi))
    lines = [t["no_diff"].format(names=_names(same, t))] if same else []
    if differ:
        lines.append(t["diff"].format(names=_names(differ, t)))
    return lines


def _best(records: list[dict], t: dict) -> list[str]:
    candidates = _compressed(records) or records
    dense = next((r for r in records if method_of(r) == "dense"), None)
    lines = []
    for corpus in corpora_of(records):
        scored = [r for r in candidates if corpus in r.get("perplexity", {})]
        if not scored:
            continue
        best = min(scored, key=lambda r: r["perplexity"][corpus])
        line = t["best"].format(corpus=CORPUS_LABELS.get(corpus, corpus), name=best["name"],
                                ppl=best["perplexity"][corpus])
        if dense is not None and best is not dense and corpus in dense["perplexity"]:
            line += t["dense_ref"].format(ppl=dense["perplexity"][corpus])
        lines.append(line)
    return lines


def verdict(records: list[dict], lang: str = "en") -> list[str]:
    """Short lines read at a glance: PPL vs threshold3 at equal or lower effective bits per weight,
    collapsed (<= 2 tier) distributions, per-layer differentiation, best PPL per corpus."""
    t = STRINGS[lang]
    return (_versus_baseline(records, t) + _collapse(records, t) + _differentiation(records, t)
            + _best(records, t))


# ---------------------------------------------------------------- tables

def _cell(key: str, value) -> str:
    """A figure rounded for reading in the Markdown table."""
    if value is None:
        return "—"
    if key == "sparsity":
        return f"{100 * value:.1f}%"
    if key == "compress_seconds":
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _header(key: str, t: dict) -> str:
    if key.startswith("ppl_"):
        corpus = key[4:]
        return t["columns"]["ppl"].format(corpus=CORPUS_LABELS.get(corpus, corpus))
    return t["columns"][key]


def write_tables(records: list[dict], out_dir, stem: str = "comparison", lang: str = "en",
                 title: str | None = None) -> list[Path]:
    """``{stem}.md`` (rounded table + verdict), ``{stem}.csv`` and ``{stem}.json`` ({rows, verdict}).

    CSV and JSON carry the unrounded figures under the English keys of ``table_rows``.
    """
    t = STRINGS[lang]
    out_dir = Path(out_dir)
    rows, lines = table_rows(records), verdict(records, lang)
    keys = list(rows[0]) if rows else []
    md = [f"# {title or t['title']}", "", t["model"].format(model=_model_label(records)), "",
          "| " + " | ".join(_header(k, t) for k in keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(_cell(k, row[k]) for k in keys) + " |" for row in rows]
    md += ["", t["units"], "", f"## {t['verdict']}", ""] + [f"- {line}" for line in lines]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in row.items()}
                     for row in rows)
    paths = [out_dir / f"{stem}.md", out_dir / f"{stem}.csv", out_dir / f"{stem}.json"]
    write_atomic(paths[0], ("\n".join(md) + "\n").encode())
    write_atomic(paths[1], buffer.getvalue().encode())
    write_json(paths[2], {"rows": rows, "verdict": lines})
    return paths


# ---------------------------------------------------------------- plots (English texts only)

def _axes(width: float, height: float):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, out_stem) -> list[Path]:
    """Write ``out_stem.png`` and ``out_stem.svg`` atomically. A pyplot-free Figure holds no global
    state, so there is nothing to close: dropping the reference frees it."""
    out_stem = Path(out_stem)
    paths = []
    for fmt in ("png", "svg"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=150)
        path = out_stem.with_name(f"{out_stem.name}.{fmt}")  # not with_suffix: stems may contain dots
        write_atomic(path, buffer.getvalue())
        paths.append(path)
    fig.clear()
    return paths


def _legend(ax, title: str | None = None) -> None:
    """The legend outside the plot, on the right, so it never hides data."""
    ax.legend(title=title, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)


def _log_y(ax, values: list[float]) -> None:
    """Log y axis; within less than a decade, plain numbers on evenly spaced ticks (log ticks would
    show one or no label)."""
    positive = [v for v in values if v > 0]
    if len(positive) < len(values):
        ax.set_yscale("symlog")
        return
    ax.set_yscale("log")
    if max(positive) / min(positive) < 10:
        ax.yaxis.set_major_locator(MaxNLocator(8))
        ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
        ax.yaxis.set_minor_locator(NullLocator())


def _label_points(ax, labels: dict[tuple[float, float], str], fontsize: float = 7) -> None:
    """Label each point to its upper right (upper left near the right edge), moving a label up while
    it would cover one already placed."""
    ax.autoscale_view()
    dpi = ax.figure.dpi
    char, line = 0.6 * fontsize * dpi / 72, 1.3 * fontsize * dpi / 72  # approximate text size in pixels
    placed: list[tuple[float, float, float]] = []  # left, bottom, right of each label, in pixels
    for (x, y), text in sorted(labels.items()):
        px, py = ax.transData.transform((x, y))
        width = char * len(text)
        flip = px + 5 + width > ax.bbox.x1
        left = px - 5 - width if flip else px + 5
        right, lift = left + width, 4.0
        while any(left < r and l < right and abs(py + lift - b) < line for l, b, r in placed):
            lift += line
        placed.append((left, py + lift, right))
        moved = lift > line  # a label pushed away from its point gets a leader line back to it
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(-4 if flip else 4, lift * 72 / dpi),
                    ha="right" if flip else "left", fontsize=fontsize,
                    arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6} if moved else None)


def _first_corpus(records: list[dict], corpus: str | None) -> str:
    corpora = corpora_of(records)
    if corpus is None:
        if not corpora:
            raise ValueError("the records have no perplexity to plot")
        return corpora[0]
    if corpus not in corpora:
        raise ValueError(f"corpus {corpus!r} not in the records; choose from {', '.join(corpora)}")
    return corpus


def plot_perplexity_vs_bits(records: list[dict], out_stem, corpus: str | None = None, log_y: bool = True) -> list[Path]:
    """Perplexity (y) against effective bits per weight (x), one line per method through its configs
    sorted by bits (a Pareto view), each point labelled; the dense model is a dashed reference line."""
    corpus = _first_corpus(records, corpus)
    fig, ax = _axes(8, 5.5)
    by_method: dict[str, list[dict]] = {}
    for r in _compressed(records):
        if corpus in r["perplexity"]:
            by_method.setdefault(method_of(r), []).append(r)
    markers = "osD^vP*X"
    labels: dict[tuple[float, float], list[str]] = {}  # configs at the same point share one label
    for i, (method, group) in enumerate(by_method.items()):
        group = sorted(group, key=_effective_bits)
        xs, ys = [_effective_bits(r) for r in group], [r["perplexity"][corpus] for r in group]
        ax.plot(xs, ys, marker=markers[i % len(markers)], label=method)
        for r, x, y in zip(group, xs, ys):
            labels.setdefault((round(x, 6), round(y, 6)), []).append(r["name"])
    plotted = [y for _, y in labels]
    for r in records:
        if method_of(r) == "dense" and corpus in r.get("perplexity", {}):
            ppl = r["perplexity"][corpus]
            plotted.append(ppl)
            ax.axhline(ppl, color="0.3", linestyle="--", linewidth=1, label=f"{r.get('name', 'dense')}, uncompressed: {ppl:.2f}")
    if log_y and plotted:
        _log_y(ax, plotted)
    ax.margins(x=0.08)
    _label_points(ax, {xy: " = ".join(names) for xy, names in labels.items()})
    ax.set_xlabel("effective bits per weight (codes + scales/zeros + sparsity metadata)")
    ax.set_ylabel(f"perplexity on {corpus}" + (" (log scale)" if log_y else "") + ", lower is better")
    ax.set_title(f"Perplexity vs size: {_model_label(records)}, {corpus}")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, "method")
    return _save(fig, out_stem)


def _split_name(name: str) -> tuple:
    """'layers.3.mlp.down_proj' -> (3, 'mlp.down_proj'); a name without a layer index -> (name, name)."""
    match = re.search(r"(?:^|\.)(\d+)\.(.+)$", name)
    return (int(match.group(1)), match.group(2)) if match else (name, name)


def _layer_grid(record: dict) -> tuple[list, list[str], list[list[float]]]:
    """(decoder layer indices, linear names, bits[row][col] with NaN where absent) from layer names
    like 'layers.3.mlp.down_proj'."""
    cells = {_split_name(layer["name"]): layer["channel_average_bits"] for layer in record["layers"]}
    rows = list(dict.fromkeys(r for r, _ in cells))
    cols = list(dict.fromkeys(c for _, c in cells))
    return rows, cols, [[cells.get((r, c), math.nan) for c in cols] for r in rows]


def _short(cols: list[str]) -> list[str]:
    """'self_attn.q_proj' -> 'q_proj' where the short names stay distinct."""
    distinct = list(dict.fromkeys(cols))
    short = {c: c.rsplit(".", 1)[-1] for c in distinct}
    if len(set(short.values())) < len(distinct):
        short = {c: c for c in distinct}
    return [short[c] for c in cols]


def plot_layer_bits_heatmap(record: dict, out_stem) -> list[Path]:
    """Channel-average bits (colour, annotated) per decoder layer (rows) and linear (columns)."""
    rows, cols, grid = _layer_grid(record)
    fig, ax = _axes(max(5.0, 1.05 * len(cols) + 2.5), max(3.0, 0.32 * len(rows) + 1.8))
    values = [v for line in grid for v in line if not math.isnan(v)]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
    for i, line in enumerate(grid):
        for j, v in enumerate(line):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < (lo + hi) / 2 else "black")
    ax.set_xticks(range(len(cols)), _short(cols), rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel("linear layer")
    ax.set_ylabel("decoder layer index")
    fig.colorbar(image, ax=ax, label="bits per weight")
    ax.set_title(f"Channel-average bits per linear (code bits per weight): {record.get('name', '?')}")
    return _save(fig, out_stem)


def _percent_label(p: float) -> str:
    return "" if p <= 0 else f"{p:.0f}" if p >= 1 else f"{p:.1f}"


def plot_bit_histogram(records: list[dict], out_stem) -> list[Path]:
    """% of output channels at each bit width, one bar per compressed config in each group."""
    compressed = _compressed(records)
    widths = sorted({b for r in compressed for b in _bit_percent(r)})
    fig, ax = _axes(min(16.0, max(7.0, 0.12 * len(widths) * len(compressed) + 4)), 5)
    step = 0.8 / max(len(compressed), 1)
    for i, r in enumerate(compressed):
        percent = _bit_percent(r)
        xs = [k - 0.4 + step * (i + 0.5) for k in range(len(widths))]
        bars = ax.bar(xs, [percent.get(b, 0.0) for b in widths], step, label=r["name"])
        ax.bar_label(bars, [_percent_label(percent.get(b, 0.0)) for b in widths], fontsize=6, padding=1)
    ax.set_xticks(range(len(widths)), [f"{b}-bit" for b in widths])
    ax.set_xlabel("bit width of the output channel (16-bit = left unquantized)")
    ax.set_ylabel("% of output channels")
    ax.set_ylim(0, 108)
    ax.set_title(f"Bit distribution per config: {_model_label(records)}")
    ax.grid(True, axis="y", alpha=0.3)
    _legend(ax, "config")
    return _save(fig, out_stem)


def plot_importance_range(record: dict, out_stem) -> list[Path]:
    """Per linear, in model order: the minimum and maximum channel importance (log y), dotted
    lines at decoder-layer boundaries."""
    layers = record["layers"]
    rows, cols = zip(*(_split_name(layer["name"]) for layer in layers))
    lows = [layer["importance_min"] for layer in layers]
    highs = [layer["importance_max"] for layer in layers]
    xs = list(range(len(layers)))
    fig, ax = _axes(min(16.0, max(7.0, 0.16 * len(layers) + 3)), 5)
    ax.vlines(xs, lows, highs, color="0.6", linewidth=2, label="range (min to max)")
    ax.scatter(xs, highs, marker="^", color="tab:red", zorder=3, label="max importance")
    ax.scatter(xs, lows, marker="v", color="tab:blue", zorder=3, label="min importance")
    _log_y(ax, lows + highs)
    starts = [i for i in xs if i == 0 or rows[i] != rows[i - 1]]
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(xs)
        if start:
            ax.axvline(start - 0.5, color="0.4", linestyle=":", linewidth=1)
        ax.text((start + end - 1) / 2, 1.01, f"L{rows[start]}", transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=7)
    if len(layers) <= 80:
        ax.set_xticks(xs, _short(list(cols)), rotation=90, fontsize=7)
    ax.set_xlabel("linear layer, in model order (L<i> = decoder layer i)")
    ax.set_ylabel("channel importance (relative, log scale)")
    ax.set_title(f"Importance range per linear: {record.get('name', '?')}", pad=16)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    _legend(ax)
    return _save(fig, out_stem)


def _with_method(record: dict) -> str:
    name, method = record.get("name", method_of(record)), method_of(record)
    return name if name == method else f"{name} ({method})"


def plot_ablation(records: list[dict], out_stem, corpus: str | None = None) -> list[Path]:
    """Perplexity per config (bars, lowest highlighted, values on top); dense, uniform and
    SparseGPT-only records are horizontal reference lines. The y axis is zoomed, not from 0."""
    corpus = _first_corpus(records, corpus)
    scored = [r for r in records if corpus in r.get("perplexity", {})]
    bars = [r for r in scored if method_of(r) not in REFERENCE_METHODS] or scored
    references = [r for r in scored if r not in bars]
    values = [r["perplexity"][corpus] for r in bars]
    fig, ax = _axes(min(16.0, max(6.0, 0.8 * len(bars) + 3)), 5)
    best = min(range(len(values)), key=values.__getitem__)
    colors = ["tab:green" if i == best else "tab:blue" for i in range(len(values))]
    drawn = ax.bar(range(len(bars)), values, color=colors)
    ax.bar_label(drawn, [f"{v:.2f}" for v in values], fontsize=7, padding=2)
    for r, style in zip(references, ["--", "-.", ":", (0, (5, 1))] * len(references)):
        ppl = r["perplexity"][corpus]
        ax.axhline(ppl, color="0.3", linestyle=style, linewidth=1, label=f"{_with_method(r)}: {ppl:.2f}")
    every = values + [r["perplexity"][corpus] for r in references]
    pad = 0.15 * (max(every) - min(every)) or 0.05 * max(every)
    ax.set_ylim(min(every) - pad, max(every) + pad)
    ax.set_xticks(range(len(bars)), [r["name"] for r in bars], rotation=30, ha="right")
    ax.set_xlabel("config (green: lowest perplexity)")
    ax.set_ylabel(f"perplexity on {corpus}, lower is better (axis not from 0)")
    ax.set_title(f"Ablation: perplexity per config, {_model_label(records)}, {corpus}")
    ax.grid(True, axis="y", alpha=0.3)
    if references:
        _legend(ax, "reference")
    return _save(fig, out_stem)


# ---------------------------------------------------------------- whole report

def write_report(records: list[dict], out_dir, kind: str = "compare", lang: str = "en") -> list[Path]:
    """Tables and plots (under ``out_dir/plots``) for one experiment kind, returning every path written.

    compare: ``comparison.*``, PPL vs bits, bit histogram, and the bit heatmap and importance range of
    the best quantized config (lowest PPL on the first corpus; its name is in the file names).
    sweep: ``sweep.*`` and PPL vs bits per corpus. ablate: ``ablation.*`` and the ablation bars.
    """
    if kind not in KIND_STEMS:
        raise ValueError(f"unknown report kind {kind!r}; choose from {', '.join(KIND_STEMS)}")
    stem, title_key = KIND_STEMS[kind]
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    paths = write_tables(records, out_dir, stem, lang, title=STRINGS[lang][title_key])
    corpora = corpora_of(records)
    compressed = _compressed(records)
    if kind == "compare":
        if corpora and compressed:
            paths += plot_perplexity_vs_bits(records, plots / "ppl_vs_bits")
        if compressed:
            paths += plot_bit_histogram(records, plots / "bit_histogram")
            # quantized configs only where there are any: a pruned-only (16-bit) map shows nothing
            scored = [r for r in compressed if corpora and corpora[0] in r["perplexity"] and r.get("layers")]
            scored = [r for r in scored if method_of(r) != "sparsegpt"] or scored
            if scored:
                best = min(scored, key=lambda r: r["perplexity"][corpora[0]])
                paths += plot_layer_bits_heatmap(best, plots / f"layer_bits_best_{_slug(best['name'])}")
                paths += plot_importance_range(best, plots / f"importance_range_best_{_slug(best['name'])}")
    elif kind == "sweep":
        for corpus in corpora if compressed else []:
            paths += plot_perplexity_vs_bits(records, plots / f"ppl_vs_bits_{corpus}", corpus=corpus)
    elif corpora:
        paths += plot_ablation(records, plots / "ablation", corpus=corpora[0])
    return paths
