"""Markdown table of ``packed_matvec.py`` records (JSON lines), for BENCHMARKS.md.

    python benchmarks/matvec_table.py benchmarks/results-h100-matvec20-pdl.jsonl [...] [--batch 1]

One row per case (tuned cases left out), sorted by shape, bits and layer. "Cold" times read the
weights from DRAM; "alone" times repeat one layer. Where a record also timed the case without
programmatic dependent launch (``cold_serial_kernel_us``), both times are shown; the figures after
them ("policy") are those of the launch the record's policy chose (``pdl``). Records of sessions 5 and 6,
before the policy, timed PDL everywhere.
"""
from __future__ import annotations

import argparse
import json

LAYER = {"2:4": "2:4", "0": "dense"}  # other sparsities: unstructured, as a percentage


def _layer(sparsity: str) -> str:
    return LAYER[sparsity] if sparsity in LAYER else f"{float(sparsity):.0%}"


def _cold_times(record: dict) -> tuple[float | None, float]:
    """(µs with programmatic dependent launch or None, µs without), both from DRAM."""
    if record.get("pdl"):
        return record["cold_kernel_us"], record["cold_serial_kernel_us"]
    return None, record["cold_kernel_us"]


def _policy_times(record: dict) -> tuple[bool, float, float]:
    """(PDL used, cold µs, alone µs) as the record's launch policy ran it (``pdl``: its policy's choice)."""
    return bool(record.get("pdl")), record["cold_kernel_us"], record["kernel_us"]


def _percent(nbytes: int, us: float, peak_gbps: float | None) -> str:
    return f"{nbytes / us / 1e3 / peak_gbps:.0%}" if peak_gbps else "–"


def table(records: list[dict]) -> str:
    """The markdown table of ``records`` (dicts as packed_matvec.py prints them)."""
    order = {"2:4": 0, "0": 1}
    records = sorted(records, key=lambda r: (r["shape"], r["batch"], r["mean_bits"], order.get(r["sparsity"], 2)))
    lines = ["| shape (out × in) | batch | avg bits | layer | cold fp16 µs | cold µs, PDL | cold µs, serial | policy"
             " | cold speedup | cold % of peak | alone µs | alone speedup | alone % of peak | plain read, cold µs (% of peak) |",
             "| --- " * 14 + "|"]
    for r in records:
        pdl, cold, alone = _policy_times(r)
        with_pdl, serial = _cold_times(r)
        read, peak = r["bytes_read"], r["peak_gbps"]
        lines.append(f"| {r['shape'][0]} × {r['shape'][1]} | {r['batch']} | {r['mean_bits']:g} | {_layer(r['sparsity'])} "
                     f"| {r['cold_fp16_us']:.1f} | {'–' if with_pdl is None else f'{with_pdl:.2f}'} | {serial:.2f} "
                     f"| {'PDL' if pdl else 'serial'} | {r['cold_fp16_us'] / cold:.2f}× | {_percent(read, cold, peak)} | {alone:.2f} "
                     f"| {r['fp16_us'] / alone:.2f}× | {_percent(read, alone, peak)} "
                     f"| {r['cold_read_us']:.2f} ({_percent(read, r['cold_read_us'], peak)}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", nargs="+", help="JSON-lines files written by packed_matvec.py")
    parser.add_argument("--batch", type=int, help="only this batch size")
    args = parser.parse_args()
    records = []
    for path in args.records:
        with open(path) as f:
            for line in f:
                if line.startswith("{"):
                    record = json.loads(line)
                    if "tuned" not in record and (args.batch is None or record["batch"] == args.batch):
                        records.append(record)
    if not records:
        raise SystemExit(f"no packed_matvec.py records in {', '.join(args.records)}: pass the files its runs wrote")
    print(table(records))


if __name__ == "__main__":
    main()
