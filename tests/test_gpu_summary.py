"""scripts/gpu_summary.py: the GPU check's last table, from benchmark JSON lines and the ceilings."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_summary.py"


def test_speedup_over_best_reference_and_fraction_of_ceiling(tmp_path):
    (tmp_path / "ceilings.json").write_text(json.dumps({"device": "GPU X", "copy_gbps": 4000.0, "bf16_tflops": 700.0}))
    rows = [
        {"test": "benchmarks/test_bench_patch_embed.py::f[cuda-video-reference_eager]", "impl": "reference_eager",
         "shape": "s1", "median_ms": 3.0, "tflops": 100.0},
        {"test": "benchmarks/test_bench_patch_embed.py::f[cuda-video-reference_compiled]", "impl": "reference_compiled",
         "shape": "s1", "median_ms": 2.0, "tflops": 150.0},
        {"test": "benchmarks/test_bench_patch_embed.py::f[cuda-video-triton]", "impl": "triton",
         "shape": "s1", "median_ms": 0.5, "tflops": 350.0},
        {"test": "benchmarks/test_bench_drop_token_gather.py::g[cuda]", "impl": "triton", "shape": "s2",
         "median_ms": 1.0, "gbps": 3000.0},
        {"test": "benchmarks/test_bench_train_step.py::h[cuda-medium-64-fast]", "impl": "fast", "clips_per_s": 385.0,
         "mfu": 0.45, "peak_mem_gb": 40.0, "median_ms": 166.0},
    ]
    (tmp_path / "bench.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    triton = next(line for line in lines if "| patch_embed | s1 | triton |" in line)
    cells = [c.strip() for c in triton.split("|")[1:-1]]
    assert cells[4] == "2" and cells[5] == "4.00" and cells[8] == "50.0%", cells  # best ref 2 ms; 350/700
    gather = next(line for line in lines if "| drop_token_gather | s2 | triton |" in line)
    assert gather.rstrip().endswith("| 75.0% |") and "| 1 |  |" in gather  # 3000/4000 of copy; no reference
    assert any("h[cuda-medium-64-fast] | 385 | 45.0% | 40 |" in line for line in lines), run.stdout
    assert "GPU X" in lines[0]
