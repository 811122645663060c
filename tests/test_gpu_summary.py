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


def test_results_page_one_section_per_run_with_card_date_command(tmp_path):
    stamp_cpu = {"card": "2-core x86_64 CPU, no GPU", "date": "2026-12-06", "command": "pytest benchmarks/ --benchmark-only",
                 "torch": "2.13.0+cpu", "triton": "3.9.0"}
    rows = [
        {"test": "benchmarks/test_bench_block.py::test_block_forward_backward[cpu-fast]", "impl": "fast",
         "shape": "B=32 N=33", "median_ms": 19.0, "tflops": 0.01, **stamp_cpu},
        {"test": "benchmarks/test_bench_block.py::test_block_forward_backward[cpu-reference eager]",
         "impl": "reference eager", "shape": "B=32 N=33", "median_ms": 17.0, "tflops": 0.011, **stamp_cpu},
        {"test": "benchmarks/test_bench_attention.py::test_bench_attention[cpu-sdpa-tiny-bias-dropout]",
         "backend": "sdpa", "shape": "B=8 N=65 H=2 d=64", "bias": True, "dropout_p": 0.1, "median_ms": 1.5,
         "tflops": 0.02, **stamp_cpu},
        {"test": "benchmarks/test_bench_loader.py::test_pyav[cpu]", "clip": "8x224x224", "batch_size": 8,
         "clips_per_s": 61.1, "frames_per_s": 488.8, "median_ms": 130.0, **stamp_cpu},
    ]
    (tmp_path / "cpu.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    page = tmp_path / "RESULTS.md"
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--page", str(page)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    text = page.read_text()
    assert "**GPU figures: unmeasured.**" in text
    assert "## 2-core x86_64 CPU, no GPU, 2026-12-06" in text
    assert "Command: `pytest benchmarks/ --benchmark-only`" in text and "torch 2.13.0+cpu, Triton 3.9.0" in text
    block = next(line for line in text.splitlines() if "| block | B=32 N=33 | fast |" in line)
    assert "| 19 | 17 | 0.89 |" in block, block  # slower than the reference: speedup < 1 shown as it is
    assert "| sdpa | B=8 N=65 H=2 d=64 | yes | 0.1 | 1.5 | 0.02 |" in text
    assert "| test_pyav[cpu] | 8x224x224 | 8 | 61.1 | 488.8 |" in text

    # A GPU run in the same folder gets its own section, with the ceilings, and the page no longer
    # says unmeasured.
    gpu = dict(stamp_cpu, card="16-core x86_64 CPU, NVIDIA H100 80GB HBM3", date="2026-12-07")
    (tmp_path / "gpu.jsonl").write_text(json.dumps(
        {"test": "benchmarks/test_bench_train_step.py::t[medium-cuda-b64-fast]", "impl": "fast",
         "clips_per_s": 300.0, "mfu": 0.35, "median_ms": 213.0, **gpu}) + "\n")
    (tmp_path / "ceilings.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "copy_gbps": 3000.0,
                                                        "bf16_tflops": 700.0}))
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--page", str(page)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    text = page.read_text()
    assert "unmeasured" not in text
    assert text.index("NVIDIA H100 80GB HBM3, 2026-12-07") < text.index("no GPU, 2026-12-06")  # newest first
    assert "Ceilings: copy 3000 GB/s, bf16 product 700 TFLOP/s." in text
    assert "| t[medium-cuda-b64-fast] | 300 | 35.0% |" in text


def test_results_page_needs_rows(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--page", str(tmp_path / "R.md")],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "no benchmark rows" in run.stderr
    assert not (tmp_path / "R.md").exists()
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "missing")], capture_output=True, text=True)
    assert run.returncode == 2 and "is not a folder" in run.stderr
