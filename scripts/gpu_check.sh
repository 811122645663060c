#!/usr/bin/env bash
# One call on a GPU machine (H100/H200): the bf16 training-step figures, the CUDA kernel
# benchmarks, the largest medium batch that fits, the CUDA-parametrised tests and the whole-model
# Inductor compile, each part under its own timeout (defaults 120 + 100 + 70 + 100 + 60 s = 7.5
# min, each plus at most 15 s to stop it, plus up to 60 s for the ceilings: under 8 minutes
# unless parts run out of time, about 10 at the very worst), each part's result
# printed (and appended to $OUT/results.md) as soon as the part ends, so that a run cut
# off from outside still reports the parts that finished. Benchmarks append one JSON line
# per finished case to $OUT/<part>.jsonl (see benchmarks/bench_utils.py), so even a part
# stopped by its timeout reports the cases it finished. Logs go to $OUT (./gpu_results
# when unset). Exit status: 0 when every part passed.
#
#   bash scripts/gpu_check.sh                    # everything
#   TESTS_TIMEOUT=200 bash scripts/gpu_check.sh  # per-part limits: TRAIN_, BENCH_, LARGEST_, TESTS_, COMPILE_TIMEOUT
#   DRY_RUN=1 bash scripts/gpu_check.sh          # any machine: collect each part's cases, run none
#
# Wheels of packages the machine lacks (PyAV, soundfile, flash-attn, ...) are installed from
# .whl/ when that folder exists; vatt_fast itself is installed in editable mode when it is
# not importable yet (no network needed).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/results.md"
PY=${PYTHON:-python3}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-120}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-100}
LARGEST_TIMEOUT=${LARGEST_TIMEOUT:-70}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-100}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-60}
DRY_RUN=${DRY_RUN:-0}
START=$SECONDS
FAILED=0

say() { echo "$@" | tee -a "$OUT/results.md"; }

# --- environment ----------------------------------------------------------------------
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    || { echo "installing the wheels in .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import vatt_fast.kernels" 2> /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . > /tmp/vatt_install.log 2>&1 \
    || { cat /tmp/vatt_install.log; echo "pip install -e . failed"; exit 1; }
fi
$PY - "$DRY_RUN" > "$OUT/env.txt" 2>&1 <<'PYEOF'
import importlib.util, os, platform, subprocess, sys
import torch
if sys.argv[1] != "1":
    assert torch.cuda.is_available(), "no CUDA device: run this on a GPU machine (or DRY_RUN=1 to check the script)"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"{gpu} | torch {torch.__version__} (CUDA {torch.version.cuda}) | python {platform.python_version()} | {os.cpu_count()} CPUs")
print("optional packages:", ", ".join(f"{m} {'yes' if importlib.util.find_spec(m) else 'no'}"
      for m in ("triton", "flash_attn", "xformers", "av", "soundfile", "nvidia")))
try:
    print("TF32: matmul", torch.backends.cuda.matmul.allow_tf32, "| cuDNN", torch.backends.cudnn.allow_tf32)
except Exception as exc:  # noqa: BLE001 - newer torch refuses the legacy flags once the new API was used
    print("TF32 flags:", exc)
try:
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip())
except Exception as exc:  # noqa: BLE001
    print("nvidia-smi:", exc)
PYEOF
rc=$?
cat "$OUT/env.txt"
[ $rc -eq 0 ] || exit 1
say "# GPU check: $(head -1 "$OUT/env.txt")"

PYTEST=($PY -m pytest -p no:cacheprovider -q -rfEs)
if $PY -c "import pytest_timeout" 2> /dev/null; then
  PYTEST+=(--timeout 120)  # one hung case cannot eat its part
fi
if [ "$DRY_RUN" = 1 ]; then
  PYTEST+=(--collect-only)
fi

# Print the figures of the benchmark cases that finished (one JSON line each).
figures() {
  $PY - "$1" <<'PYEOF'
import json, os, sys
path = sys.argv[1]
rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
if not rows:
    print("(no finished benchmark case)")
cols = ("median_ms", "clips_per_s", "mfu", "peak_mem_gb", "tflops", "gbps")
print("| case | " + " | ".join(cols) + " |")
print("|---" * (len(cols) + 1) + "|")
for r in rows:
    name = r["test"].split("::")[-1]
    print(f"| {name} | " + " | ".join("" if r.get(c) is None else f"{r[c]:.4g}" for c in cols) + " |")
PYEOF
}

# part NAME LIMIT_S ARGS...: run pytest with ARGS under LIMIT_S, then print its outcome.
part() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  rm -f "$OUT/$name.jsonl"
  echo "--- $name: running (limit ${limit}s)"
  VATT_BENCH_LOG="$OUT/$name.jsonl" timeout -s INT -k 15 "$limit" "${PYTEST[@]}" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local verdict="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    verdict="TIMED OUT after ${limit}s"
  elif [ $rc -ne 0 ] && ! { [ "$DRY_RUN" = 1 ] && [ $rc -eq 5 ]; }; then
    verdict="FAILED (rc $rc)"
  fi
  [ "$verdict" = ok ] || FAILED=1
  say ""
  say "## $name: $verdict, $((SECONDS - t0)) s"
  grep -E "^(FAILED|ERROR) " "$OUT/$name.log" | cut -c1-300 | tee -a "$OUT/results.md"
  tail -n 1 "$OUT/$name.log" | tee -a "$OUT/results.md"
}

# 0. The card's ceilings: a 1 GiB copy (GB/s, read + write) and an 8192^3 bf16 product (TFLOP/s),
#    the denominators of the summary's "of ceiling" column.
if [ "$DRY_RUN" != 1 ]; then
  timeout -k 5 60 $PY - "$OUT/ceilings.json" <<'PYEOF' 2>&1 | tee -a "$OUT/results.md"
import json, sys, torch
dev = torch.device("cuda")
def best_ms(fn, reps=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return min(times)
src = torch.empty(2 ** 30, dtype=torch.uint8, device=dev); dst = torch.empty_like(src)
copy_gbps = 2 * src.numel() / best_ms(lambda: dst.copy_(src)) / 1e6
del src, dst
n = 8192
a = torch.randn(n, n, device=dev, dtype=torch.bfloat16); b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
bf16_tflops = 2 * n ** 3 / best_ms(lambda: a @ b) / 1e9
res = dict(device=torch.cuda.get_device_name(), copy_gbps=round(copy_gbps, 1), bf16_tflops=round(bf16_tflops, 1))
json.dump(res, open(sys.argv[1], "w"))
print(f"## ceilings: {res}")
PYEOF
fi

# 1. Training step: bf16 base and medium at batch 32 and 64 (fast path), reference at 32;
#    each case checks loss and gradients against float64 before it is timed.
part train_step "$TRAIN_TIMEOUT" benchmarks/test_bench_train_step.py -k "cuda and not largest" --benchmark-only
figures "$OUT/train_step.jsonl" | tee -a "$OUT/results.md"

# 2. Kernel benchmarks on CUDA (attention, DropToken, NCE, patch embedding; not the loaders).
part benchmarks "$BENCH_TIMEOUT" benchmarks -k "cuda and not loader and not dali and not train_step" --benchmark-only
figures "$OUT/benchmarks.jsonl" | tee -a "$OUT/results.md"

# 2b. The largest medium batch that fits, with and without activation checkpointing.
part largest_batch "$LARGEST_TIMEOUT" benchmarks/test_bench_train_step.py -k largest --benchmark-only
figures "$OUT/largest_batch.jsonl" | tee -a "$OUT/results.md"

# 3. The CUDA-parametrised tests (modules whose optional packages are missing are reported
#    as collection errors; the others still run).
part tests "$TESTS_TIMEOUT" tests -k cuda -m "not distributed" --continue-on-collection-errors

# 4. Whole-model fullgraph torch.compile with Inductor and the Triton ops on CUDA, forward and
#    backward against eager (the InductorError that torch 2.11 raised on the whole model).
part compile "$COMPILE_TIMEOUT" tests/test_compile.py -k triton

say ""
# The summary tables, and the results page of this run ($OUT/RESULTS.md). To publish it: copy the
# *.jsonl files into benchmarks/results/ and regenerate benchmarks/RESULTS.md from that folder.
$PY scripts/gpu_summary.py "$OUT" --page "$OUT/RESULTS.md" | tee -a "$OUT/results.md"

say ""
say "total $((SECONDS - START)) s; $([ $FAILED = 0 ] && echo 'every part passed' || echo 'SOME PART FAILED')"
exit $FAILED
