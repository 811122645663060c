"""Summarise a GPU check: each kernel's speedup over its best reference and its fraction of the
card's measured ceiling, and each training step's clips/s and MFU.

    python scripts/gpu_summary.py OUT_DIR

Reads ``OUT_DIR/ceilings.json`` (written by ``scripts/gpu_check.sh``: a large copy's GB/s and a
large bf16 product's TFLOP/s) and every ``OUT_DIR/*.jsonl`` (one JSON line per finished
benchmark case, see ``benchmarks/bench_utils.py``). Cases are grouped by benchmark file and
``shape``: within a group, ``impl`` values containing ``reference`` are the references and the
others (``triton``, ``fast``...) are compared against the fastest of them. A kernel's fraction of
the ceiling uses TFLOP/s against the bf16 product when the case records TFLOP/s, else GB/s
against the copy. Works on any machine (the CPU benchmarks have no ceilings: the column is empty).
"""

from __future__ import annotations

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
    lines = ["| training step | clips/s | MFU | peak memory GB | median ms |", "|---|---|---|---|---|"]
    for r in rows:
        if "clips_per_s" not in r or "mfu" not in r:
            continue
        name = r["test"].split("::")[-1]
        lines.append(
            f"| {name} | {_fmt(r.get('clips_per_s'), '.4g')} | {_fmt(r.get('mfu'), '.1%')} | "
            f"{_fmt(r.get('peak_mem_gb'))} | {_fmt(r.get('median_ms'), '.4g')} |"
        )
    return lines


def main(argv: List[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(argv[1])
    ceilings_path = out / "ceilings.json"
    ceilings = json.loads(ceilings_path.read_text()) if ceilings_path.exists() else {}
    rows = _load(out)
    if ceilings:
        print(f"ceilings: copy {ceilings.get('copy_gbps', 0):.0f} GB/s, bf16 product {ceilings.get('bf16_tflops', 0):.0f} TFLOP/s "
              f"({ceilings.get('device', '?')})")
    print("\n".join(kernel_table(rows, ceilings)))
    print()
    print("\n".join(step_table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
