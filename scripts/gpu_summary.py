"""Summarise a GPU check: each kernel's speedup over its best reference and its fraction of the
card's measured ceiling, and each training step's clips/s and MFU.

    python scripts/gpu_summary.py OUT_DIR                                 # print the tables
    python scripts/gpu_summary.py OUT_DIR --page benchmarks/RESULTS.md    # also write the results page

Reads ``OUT_DIR/ceilings.json`` (written by ``scripts/gpu_check.sh``: a large copy's GB/s and a
large bf16 product's TFLOP/s) and every ``OUT_DIR/*.jsonl`` (one JSON line per finished
benchmark case, see ``benchmarks/bench_utils.py``). Cases are grouped by benchmark file and
``shape``: within a group, ``impl`` values containing ``reference`` are the references and the
others (``triton``, ``fast``...) are compared against the fastest of them. A kernel's fraction of
the ceiling uses TFLOP/s against the bf16 product when the case records TFLOP/s, else GB/s
against the copy. Works on any machine (the CPU benchmarks have no ceilings: the column is empty).

``--page`` writes the results page (``benchmarks/RESULTS.md``): one section per run, i.e. per
(card, date, command) that ``benchmarks/bench_utils.py`` stamps on every JSON line, with its
torch/Triton versions, the kernel, block, training-step, attention and loader tables; and a line
saying that the GPU figures are unmeasured when no row came from a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional


def _load(out: Path) -> List[dict]:
    rows = []
    for path in sorted(out.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _fmt(value: Optional[float], spec: str = ".3g") -> str:
    return "" if value is None else format(value, spec)


def kernel_table(rows: List[dict], ceilings: Dict[str, float]) -> List[str]:
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rows:
        if "impl" not in r or r.get("median_ms") is None or "clips_per_s" in r:
            continue
        bench_file = r["test"].split("::")[0].rsplit("/", 1)[-1].removesuffix(".py").removeprefix("test_bench_")
        groups[(bench_file, str(r.get("shape", "")))].append(r)
    lines = [
        "| op | shape | impl | median ms | best reference ms | speedup | TFLOP/s | GB/s | of ceiling |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (op, shape), cases in sorted(groups.items()):
        refs = [c for c in cases if "reference" in str(c["impl"])]
        best = min((c["median_ms"] for c in refs), default=None)
        for c in sorted(cases, key=lambda c: str(c["impl"])):
            fraction = None
            if c.get("tflops") is not None and ceilings.get("bf16_tflops"):
                fraction = c["tflops"] / ceilings["bf16_tflops"]
            elif c.get("gbps") is not None and ceilings.get("copy_gbps"):
                fraction = c["gbps"] / ceilings["copy_gbps"]
            speedup = None if best is None or "reference" in str(c["impl"]) else best / c["median_ms"]
            lines.append(
                f"| {op} | {shape} | {c['impl']} | {_fmt(c['median_ms'], '.4g')} | {_fmt(best, '.4g')} | "
                f"{_fmt(speedup, '.2f')} | {_fmt(c.get('tflops'))} | {_fmt(c.get('gbps'))} | {_fmt(fraction, '.1%')} |"
            )
    return lines


def step_table(rows: List[dict]) -> List[str]:
    lines = ["| training step | clips/s | MFU | peak memory GB | median ms | batch |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "clips_per_s" not in r or "mfu" not in r:
            continue
        name = r["test"].split("::")[-1]
        lines.append(
            f"| {name} | {_fmt(r.get('clips_per_s'), '.4g')} | {_fmt(r.get('mfu'), '.1%')} | "
            f"{_fmt(r.get('peak_mem_gb'))} | {_fmt(r.get('median_ms'), '.4g')} | {r.get('batch_size', '')} |"
        )
    return lines


def attention_table(rows: List[dict]) -> List[str]:
    lines = ["| backend | shape | bias | dropout | median ms | TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if "backend" in r and r.get("median_ms") is not None),
                    key=lambda r: (str(r.get("shape")), bool(r.get("bias")), r.get("dropout_p") or 0, r["backend"])):
        lines.append(
            f"| {r['backend']} | {r.get('shape', '')} | {'yes' if r.get('bias') else 'no'} | {r.get('dropout_p', '')} | "
            f"{_fmt(r['median_ms'], '.4g')} | {_fmt(r.get('tflops'))} |"
        )
    return lines


def loader_table(rows: List[dict]) -> List[str]:
    lines = ["| loader case | clip | batch | clips/s | frames/s |", "|---|---|---|---|---|"]
    for r in rows:
        if "frames_per_s" not in r:
            continue
        lines.append(
            f"| {r['test'].split('::')[-1]} | {r.get('clip', '')} | {r.get('batch_size', '')} | "
            f"{_fmt(r.get('clips_per_s'), '.4g')} | {_fmt(r.get('frames_per_s'), '.4g')} |"
        )
    return lines


def _is_gpu(card: str) -> bool:
    return not card.endswith("no GPU")


def results_page(rows: List[dict], ceilings: Dict[str, float], source: str) -> str:
    """The markdown results page: one section per (card, date, command)."""
    runs: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rows:
        runs[(r.get("card", "unknown machine"), r.get("date", "unknown date"), r.get("command", "unknown command"))].append(r)
    out = [
        "# Benchmark results",
        "",
        "Generated from the benchmarks' JSON lines by `python scripts/gpu_summary.py "
        f"{source} --page benchmarks/RESULTS.md`; do not edit by hand. Each section is one run: the "
        "card (machine), date and command head its tables, and every figure below it was measured "
        "there. Speedups compare each fast case with the fastest reference case of the same shape; "
        "\"of ceiling\" is against the card's measured copy bandwidth or bf16 product rate "
        "(`scripts/gpu_check.sh` measures them; the CPU has none).",
        "",
    ]
    if not any(_is_gpu(card) for card, _, _ in runs):
        out += [
            "**GPU figures: unmeasured.** No run on a GPU has been recorded here yet, so the fused "
            "kernels' speedups, the training step's MFU on an H100/H200 and the attention backends "
            "on CUDA are not known. On a GPU machine: `bash scripts/gpu_check.sh`, then this "
            "script on its output folder.",
            "",
        ]
    for (card, date, command), group in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0]), reverse=True):
        versions = sorted({(r.get("torch"), r.get("triton")) for r in group}, key=str)
        out += [f"## {card}, {date}", "", f"Command: `{command}`", "",
                "Versions: " + "; ".join(f"torch {t}, Triton {tr or 'not installed'}" for t, tr in versions), ""]
        run_ceilings = ceilings if ceilings.get("device") and ceilings.get("device") in card else {}
        if run_ceilings:
            out += [f"Ceilings: copy {run_ceilings.get('copy_gbps', 0):.0f} GB/s, bf16 product "
                    f"{run_ceilings.get('bf16_tflops', 0):.0f} TFLOP/s.", ""]
        for title, table in (
            ("Kernels and blocks", kernel_table(group, run_ceilings)),
            ("Training step", step_table(group)),
            ("Attention backends (forward + backward)", attention_table(group)),
            ("Loaders", loader_table(group)),
        ):
            if len(table) > 2:
                out += [f"### {title}", "", *table, ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_summary.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("out", type=Path, help="folder with the benchmarks' *.jsonl (and ceilings.json)")
    parser.add_argument("--page", type=Path, default=None, help="write the markdown results page here")
    args = parser.parse_args(argv[1:])
    out = args.out
    if not out.is_dir():
        print(f"gpu_summary.py: {out} is not a folder (give the folder that holds the *.jsonl files)", file=sys.stderr)
        return 2
    ceilings_path = out / "ceilings.json"
    ceilings = json.loads(ceilings_path.read_text()) if ceilings_path.exists() else {}
    rows = _load(out)
    if ceilings:
        print(f"ceilings: copy {ceilings.get('copy_gbps', 0):.0f} GB/s, bf16 product {ceilings.get('bf16_tflops', 0):.0f} TFLOP/s "
              f"({ceilings.get('device', '?')})")
    print("\n".join(kernel_table(rows, ceilings)))
    print()
    print("\n".join(step_table(rows)))
    if args.page is not None:
        if not rows:
            print(f"gpu_summary.py: no benchmark rows in {out}/*.jsonl; not writing {args.page}", file=sys.stderr)
            return 1
        args.page.write_text(results_page(rows, ceilings, str(out)))
        print(f"\nwrote {args.page} ({len(rows)} figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
